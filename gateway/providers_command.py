"""``cascade-gateway providers``: provider health from a terminal, for operators.

- ``providers list``: every configured provider's breaker, window, work and limits, a table;
- ``providers show ID``: one of them, in full;
- ``providers open ID --seconds N --reason R --operator NAME``: drain a provider for a known
  maintenance (new attempts pass it over, or hold; then the usual half-open probe);
- ``providers close ID --reason R --operator NAME``: bring it back after a fix.

A client of the gateway's ops API (``GET /ops/providers``, ``POST
/ops/providers/{id}/breaker``), like ``manual-checks`` and ``recon alerts``: ``GATEWAY_URL``,
``OPS_API_TOKEN``. Exit status: 0 done; 2 the request was bad or the gateway could not be
asked (unreachable, 401, 404, 422, 503: one line on stderr saying which); 3 the gateway
refused the override (409: the provider has no breaker).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from gateway.manual_checks import (
    ENVIRONMENT,
    OpsClient,
    OpsError,
    operator,
    printable,
    reason,
    utc_time,
)

SUMMARIES = {
    "providers": "provider health: each breaker, window, work and limits; open or close a"
    " breaker by hand (ops API)",
    "providers list": "every configured provider's breaker state, failure rate, in-flight and"
    " waiting attempts, limits",
    "providers show": "one provider's breaker, window, last transition, probe, work, limits and"
    " breaker policy",
    "providers open": "open a provider's breaker for N seconds (drain it for a maintenance)",
    "providers close": "close a provider's breaker (bring it back after a fix)",
}
NEEDS = dict.fromkeys(SUMMARIES, ENVIRONMENT)
MAX_OPEN_SECONDS = 7 * 86_400


# What the commands read of the ops API's answers: the fields printed, with their types (the
# full answer is gateway.ops_providers.ProviderHealthView).
class _Window(msgspec.Struct):
    seconds: float
    since: str
    calls: int
    technical: int
    failure_rate: float


class _Provider(msgspec.Struct):
    provider_id: str
    state: str
    window: _Window | None
    open_until: str | None
    in_flight: int
    waiting: int
    limits: dict[str, Any]
    last_transition: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    breaker: dict[str, Any] | None = None


class _Providers(msgspec.Struct):
    providers: list[_Provider]


def run(
    args: argparse.Namespace, env: Mapping[str, str], out: Callable[[str], None] = print
) -> int:
    """Run ``providers <command>``; the exit status."""
    try:
        client = OpsClient.from_env(env)
        command = args.providers_command
        if command == "list":
            page = client.get("/ops/providers", shape=_Providers)
            out(json.dumps(page, indent=2) if args.json else _table(page["providers"]))
            return 0
        path = "/ops/providers/" + urllib.parse.quote(args.provider_id, safe="")
        if command == "show":
            provider = client.get(path, shape=_Provider)
        else:
            body: dict[str, Any] = {"action": command, "reason": args.reason}
            if command == "open":
                body["seconds"] = args.seconds
            provider = client.post(path + "/breaker", body, args.operator, shape=_Provider)
    except OpsError as exc:  # a Refused (409) exits 3, any other 2
        print(f"cascade-gateway: {printable(str(exc))}", file=sys.stderr)  # noqa: T201
        return exc.exit_status
    if args.json:
        out(json.dumps(provider, indent=2))
    else:
        if command != "show":
            out(f"{provider['provider_id']}: breaker {_state(provider)}, by {args.operator}")
        out("\n".join(_lines(provider)))
    return 0


COLUMNS = ("PROVIDER", "BREAKER", "FAILURES", "SINCE", "IN FLIGHT", "WAITING", "LIMITS")


def _table(providers: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [
        (
            p["provider_id"],
            _state(p),
            _failures(p["window"]),
            utc_time(p["last_transition"]["changed_at"]) if p.get("last_transition") else "-",
            str(p["in_flight"]),
            str(p["waiting"]),
            _limits(p["limits"]),
        )
        for p in providers
    ]
    rows = [tuple(printable(text) for text in row) for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    return "\n".join(
        "  ".join(text.ljust(w) for text, w in zip(row, widths, strict=True)).rstrip()
        for row in [COLUMNS, *rows]
    )


def _state(provider: dict[str, Any]) -> str:
    state = str(provider["state"])
    if state == "open" and provider.get("open_until"):
        return f"open until {utc_time(provider['open_until'])}"
    return state


def _failures(window: dict[str, Any] | None) -> str:
    """``3/40 (7.5%) in 60s``: technical failures of the calls in the breaker's window."""
    if window is None:
        return "-"
    share = f"{window['failure_rate']:.1%}"
    return f"{window['technical']}/{window['calls']} ({share}) in {window['seconds']:g}s"


def _limits(limits: dict[str, Any]) -> str:
    parts = []
    rate = limits.get("rate_limit")
    if rate:
        parts.append(f"{rate['per_second']:g}/s burst {rate['burst']}")
    if limits.get("max_in_flight") is not None:
        parts.append(f"in flight {limits['max_in_flight']}")
    parts.append(f"hold {limits['hold_seconds']:g}s")
    return ", ".join(parts)


def _lines(p: dict[str, Any]) -> list[str]:
    """One provider, in full."""
    last = p.get("last_transition")
    probe = p.get("probe")
    policy = p.get("breaker")
    lines = [
        f"provider         {p['provider_id']}",
        f"breaker          {_state(p)}",
        f"window           {_failures(p['window'])}"
        + (f", since {utc_time(p['window']['since'])}" if p["window"] else ""),
        "last transition  " + (_transition(last) if last else "none yet"),
        f"in flight        {p['in_flight']} (CREATING or RECHECKING)",
        f"waiting          {p['waiting']} withdrawal(s) held or waiting to start here",
        f"limits           {_limits(p['limits'])}",
        "policy           "
        + (
            "none (breaker disabled)"
            if policy is None
            else f"open at {policy['failure_rate']:.0%} of at least {policy['min_calls']} calls"
            f" in {policy['window_seconds']:g}s, for {policy['open_seconds']:g}s;"
            f" {policy['half_open_probes']} probe(s) to close"
        ),
    ]
    if probe:
        lines.append(
            f"probe            task {probe.get('task_id') or '-'} until"
            f" {utc_time(probe['until']) if probe.get('until') else '-'},"
            f" {probe['successes']} success(es) so far"
        )
    return [printable(line) for line in lines]


def _transition(last: dict[str, Any]) -> str:
    """When, why (an override: by whom, with their reason), and the window then."""
    cause = last.get("cause") or "cause not recorded"
    if cause == "operator":
        cause = f"by {last.get('operator')}: {last.get('reason')}"  # _lines escapes it
    return f"{utc_time(last['changed_at'])}, {cause} (window then: {_rate(last)})"


def _rate(transition: dict[str, Any]) -> str:
    if transition.get("calls") is None:
        return "-"
    return f"{transition['failure_rate']:.1%} of {transition['calls']} calls"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_OPEN_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_OPEN_SECONDS} (7 days),"
            f" not {text!r}"
        )
    return value


def configure_parser(
    parser: argparse.ArgumentParser,
    describe: Callable[[str], str],
    formatter: type[argparse.HelpFormatter],
) -> None:
    """``list``, ``show``, ``open``, ``close`` under ``providers``."""
    commands = parser.add_subparsers(dest="providers_command", required=True)
    parsers = {}
    for name in ("list", "show", "open", "close"):
        full = f"providers {name}"
        parsers[name] = commands.add_parser(
            name, help=SUMMARIES[full], description=describe(full), formatter_class=formatter
        )
        parsers[name].add_argument(
            "--json", action="store_true", help="print the ops API's JSON answer instead"
        )
    for name in ("show", "open", "close"):
        parsers[name].add_argument("provider_id", metavar="ID", help="a provider's id")
    parsers["open"].add_argument(
        "--seconds",
        required=True,
        type=_seconds,
        help="how long no new attempt goes to it, before one half-open probe (up to 7 days)",
    )
    for name in ("open", "close"):
        parsers[name].add_argument(
            "--reason", required=True, type=reason, help="why (logged with the operator)"
        )
        parsers[name].add_argument(
            "--operator", required=True, type=operator, help="who acts (sent as X-Operator)"
        )
