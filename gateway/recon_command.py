"""``cascade-gateway recon``: the reconciliation job on demand, and its alerts from a terminal.

- ``recon run`` runs the job once, now, from this process (the database and cascade-core, as
  a worker would; under the same fleet-wide lock, so never beside a worker's run) and prints
  its report as JSON. Exit status 0 ran, 1 another process was running it (nothing done).
- ``recon alerts``, ``recon ack``, ``recon resolve``, ``recon accept`` are clients of the
  gateway's ops API, like ``manual-checks`` (``GATEWAY_URL``, ``OPS_API_TOKEN``): exit status
  0 done, 2 the request was bad or the gateway could not be asked, 3 the lifecycle refused
  the move (409).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from gateway.manual_checks import ENVIRONMENT as CLIENT_ENVIRONMENT
from gateway.manual_checks import OpsClient, OpsError, operator, reason
from gateway.settings import Settings

EXIT_NOT_RUN = 1
SUMMARIES = {
    "recon": "reconciliation: run it now, list and work its alerts (ops API)",
    "recon run": "run the reconciliation job once, now, and print its report as JSON",
    "recon alerts": "list reconciliation alerts, the newest first",
    "recon ack": "acknowledge an open alert (someone is on it)",
    "recon resolve": "resolve an alert as fixed, with a reference (a ticket, a correction)",
    "recon accept": "accept an alert as not to be fixed, with a note saying why",
}
RUN_ENVIRONMENT = (
    "DATABASE_URL, and CORE_URL unless SANDBOX_ENABLED=true; optional: PROVIDERS_FILE,"
    " CORE_TOKEN, RECON_INTERVAL_SECONDS, RECON_WINDOW_SECONDS, RECON_STALE_MARGIN_SECONDS,"
    " RECON_NOTIFY_AFTER_SECONDS, RECON_LEDGER_BUDGET, RECON_PROVIDER_BUDGET,"
    " RECON_MAX_NEW_ALERTS"
)
NEEDS = {
    "recon": CLIENT_ENVIRONMENT,
    "recon run": RUN_ENVIRONMENT,
    **dict.fromkeys(
        ("recon alerts", "recon ack", "recon resolve", "recon accept"), CLIENT_ENVIRONMENT
    ),
}
_ACTIONS = ("ack", "resolve", "accept")


async def run_now(settings: Settings, out: Callable[[str], None] = print) -> int:
    """``recon run``: one run from this process; its report as JSON."""
    from orchestrator.core_client import HttpCascadeCore  # noqa: PLC0415
    from orchestrator.provider_client import HttpProviderAdapter  # noqa: PLC0415
    from orchestrator.reconciliation import Reconciler  # noqa: PLC0415
    from orchestrator.store import create_pool  # noqa: PLC0415

    if settings.database_url is None:
        raise ValueError("DATABASE_URL is not set")
    if settings.core_url is None:
        raise ValueError("CORE_URL is not set (and SANDBOX_ENABLED is not true)")
    pool = await create_pool(settings.asyncpg_dsn, min_size=1, max_size=2)
    core = HttpCascadeCore(settings.core_url, settings.core_token)
    providers = HttpProviderAdapter()
    try:
        reconciler = Reconciler(pool, core, settings.providers, settings.recon, providers=providers)
        report = await reconciler.run_once()
    finally:
        await providers.aclose()
        await core.aclose()
        await pool.close()
    out(json.dumps(report.as_dict(), indent=2))
    if not report.ran:
        _err("another process is running reconciliation now: nothing was done")
        return EXIT_NOT_RUN
    return 0


def run_client(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``recon alerts|ack|resolve|accept``: the exit status."""
    try:
        client = OpsClient.from_env(env)
        if args.recon_command == "alerts":
            return _alerts(client, args)
        body = {}
        if args.recon_command == "resolve":
            body["reference"] = args.reference
        if args.recon_command == "accept":
            body["note"] = args.note
        path = f"/ops/recon/alerts/{args.alert_id}/{args.recon_command}"
        alert = client.post(path, body, args.operator)
    except OpsError as exc:  # a Refused (409) exits 3, any other 2
        _err(str(exc))
        return exc.exit_status
    print(json.dumps(alert, indent=2) if args.json else _line(alert))  # noqa: T201
    return 0


def _alerts(client: OpsClient, args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("state", args.state), ("rule", args.rule)) if v}
    page: dict[str, Any] = client.get("/ops/recon/alerts?" + urllib.parse.urlencode(query))
    if args.json:
        print(json.dumps(page, indent=2))  # noqa: T201
        return 0
    alerts = page["alerts"]
    for alert in alerts:
        print(_line(alert))  # noqa: T201
    print(f"{len(alerts)} alert(s).")  # noqa: T201
    return 0


def _line(alert: dict[str, Any]) -> str:
    return (
        f"#{alert['alert_id']}  {alert['state']:<12}  {alert['severity']:<8}  {alert['rule']:<19}"
        f"  seen {alert['detections']}x, last {alert['last_seen_at']}  {alert['summary']}"
    )


def _err(line: str) -> None:
    print(f"cascade-gateway: {line}", file=sys.stderr)  # noqa: T201


def _alert_id(text: str) -> str:
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError(f"must be an alert id (a number), not {text!r}")
    return text


def configure_parser(
    parser: argparse.ArgumentParser,
    describe: Callable[[str], str],
    formatter: type[argparse.HelpFormatter],
) -> None:
    """``run``, ``alerts``, ``ack``, ``resolve``, ``accept`` under ``recon``."""
    commands = parser.add_subparsers(dest="recon_command", required=True)
    parsers = {}
    for name in ("run", "alerts", *_ACTIONS):
        full = f"recon {name}"
        parsers[name] = commands.add_parser(
            name, help=SUMMARIES[full], description=describe(full), formatter_class=formatter
        )
    parsers["alerts"].add_argument(
        "--state", help="comma-separated: open, acknowledged, resolved, accepted (default all)"
    )
    parsers["alerts"].add_argument("--rule", help="only this rule, e.g. ledger_parity")
    for name in ("alerts", *_ACTIONS):
        parsers[name].add_argument(
            "--json", action="store_true", help="print the ops API's JSON answer instead"
        )
    for name in _ACTIONS:
        parsers[name].add_argument("alert_id", type=_alert_id, help="the alert's id (#N)")
        parsers[name].add_argument(
            "--operator", required=True, type=operator, help="who acts (sent as X-Operator)"
        )
    parsers["resolve"].add_argument(
        "--reference", required=True, type=reason, help="the fix: a ticket, a correction's id"
    )
    parsers["accept"].add_argument(
        "--note", required=True, type=reason, help="why it is accepted and not fixed"
    )
