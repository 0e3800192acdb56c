"""``cascade-gateway``: serve, worker, migrate, sandbox, dev (``make run``), dlq, report,
transitions, manual-checks (a client of the gateway's ops API, for support), flags (the
release manager's moves, on the flags file or Unleash), recon (reconciliation: run it now,
work its alerts) and providers (provider health: breakers, limits, overrides).

Bad configuration fails fast with one line on stderr naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import os
import signal
import sys
import textwrap
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from flags.router import FlagsError
from gateway import flagcmd, logs, manual_checks, providers_command, recon_command, stackfile
from gateway.listen import port_free
from gateway.runtime import DependencyError
from gateway.settings import Settings, SettingsError, load_settings, migration_url

EXIT_CONFIG = 2
# Young-generation threshold of the cyclic garbage collector in servers (default 700).
GC_YOUNG_THRESHOLD = 20_000


def fail(message: str) -> int:
    print(f"cascade-gateway: {message}", file=sys.stderr)  # noqa: T201
    return EXIT_CONFIG


def _serve(settings: Settings) -> int:
    import uvicorn  # noqa: PLC0415

    from gateway.app import create_app  # noqa: PLC0415
    from gateway.runtime import open_runtime  # noqa: PLC0415
    from gateway.serving import server_config  # noqa: PLC0415

    if not port_free(settings.http_host, settings.http_port):
        return fail(f"HTTP_PORT {settings.http_port} on {settings.http_host} is already in use")

    async def main() -> int:
        # Open dependencies before listening: a bad DATABASE_URL is one line, not a traceback.
        try:
            runtime = await open_runtime(settings, name="gateway", with_router=True)
        except (DependencyError, FlagsError) as exc:
            return fail(str(exc))
        logs.configure(settings.log_level, "serve")  # the Unleash client installs its own
        try:
            app = create_app(settings, runtime=runtime)
        except SettingsError as exc:  # SANDBOX_ENABLED where the sandbox is not installed
            await runtime.close()
            return fail(str(exc))
        _settle_heap()
        config = server_config(app, host=settings.http_host, port=settings.http_port)
        server = uvicorn.Server(config)
        try:
            await server.serve()
        finally:
            await runtime.close()
        return 0

    return _run(main())


def _worker(settings: Settings) -> int:
    from gateway.runtime import open_runtime  # noqa: PLC0415
    from orchestrator.reconciliation import Reconciler  # noqa: PLC0415
    from orchestrator.worker import Worker  # noqa: PLC0415

    async def main() -> int:
        try:
            runtime = await open_runtime(settings, name="worker", with_router=False)
        except DependencyError as exc:
            return fail(str(exc))
        health: asyncio.Task[None] | None = None
        if settings.worker_metrics_port:
            from orchestrator.health import serve_health  # noqa: PLC0415

            health = serve_health(
                runtime.pool, runtime.nc, settings.http_host, settings.worker_metrics_port
            )
        worker = Worker(
            engine=runtime.engine,
            js=runtime.js,
            core=runtime.core,
            concurrency=settings.worker_concurrency,
            reconciler=Reconciler(
                runtime.pool,
                runtime.core,
                settings.providers,
                settings.recon,
                providers=runtime.provider_adapter,
            ),
        )
        _settle_heap()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await worker.start()
        try:
            await stop.wait()
        finally:
            try:
                await asyncio.wait_for(worker.stop(), 10)
            finally:
                if health is not None:
                    health.cancel()
                await runtime.close()
        return 0

    return _run(main())


def _run(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop  # noqa: PLC0415

    return uvloop.run(coro)


def _settle_heap() -> None:
    """Once a server is set up: move what start-up allocated out of the collector's sight
    and collect young objects less often. A request allocates thousands of short-lived
    objects that reference counting frees; with the default threshold (700) the cyclic
    collector ran several times per withdrawal and rescanned the start-up heap (about 6 %
    of the gateway's CPU in the cascade bench)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)  # older generations: the defaults


def _migrate() -> int:
    """Needs only DATABASE_URL (and LOG_LEVEL): the migration Job carries no other setting."""
    from gateway.migrate import upgrade  # noqa: PLC0415

    try:
        url = migration_url(os.environ)
    except SettingsError as exc:
        return fail(str(exc))
    try:
        upgrade(url)
    except (OSError, ConnectionError) as exc:
        return fail(f"cannot connect to DATABASE_URL ({exc})")
    except Exception as exc:  # noqa: BLE001 — surfaced as one line; details in --verbose
        return fail(f"migration failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    print("migrations applied")  # noqa: T201
    return 0


def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.dlq import list_dead_letters, replay_dead_letters  # noqa: PLC0415

    if settings.nats_url is None:
        return fail("NATS_URL is not set")
    if args.dlq_command == "list":
        return _run(list_dead_letters(settings))
    return _run(replay_dead_letters(settings, limit=args.limit))


def _report(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.report_command import run_report  # noqa: PLC0415

    if settings.database_url is None:
        return fail("DATABASE_URL is not set")
    return _run(
        run_report(
            settings,
            as_json=args.json,
            since=args.since,
            until=args.until,
            merchant=args.merchant,
            html=args.html,
            png=args.png,
        )
    )


def _sandbox(settings: Settings) -> int:
    """The sandbox as its own process; it lives in the repository, not in the package."""
    try:
        from sandbox.server import (  # noqa: PLC0415 — dev and test only, never in production
            SandboxUnavailableError,
            serve_sandbox,
        )
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "sandbox":
            raise
        return fail("`sandbox` runs from a repository checkout; this installation has no sandbox")
    if settings.deployment_env == "production":
        return fail("the sandbox cannot run when DEPLOYMENT_ENV is production")
    if not port_free(settings.http_host, settings.sandbox_port):
        return fail(
            f"SANDBOX_PORT {settings.sandbox_port} on {settings.http_host} is already in use"
        )
    try:
        return _run(serve_sandbox(settings))
    except (SettingsError, SandboxUnavailableError) as exc:
        return fail(str(exc))


def _dev() -> int:
    """``make run``'s supervisor, which lives in the repository, not in the installed package."""
    try:
        from devstack.supervisor import run_dev  # noqa: PLC0415 — dev-only, never in production
    except ModuleNotFoundError as exc:
        if exc.name not in ("devstack", "devstack.supervisor"):
            raise
        return fail(
            "`dev` runs the stack from a repository checkout (make run);"
            " this installation has no dev stack"
        )
    return run_dev()


def _positive(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, once installed)."""
    try:
        return importlib.metadata.version("cascade-gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout never installed
        return "unknown (not installed)"


_FORMAT = argparse.RawDescriptionHelpFormatter
_SERVE_ENV = (
    "DATABASE_URL, NATS_URL, and CORE_URL unless SANDBOX_ENABLED=true;"
    " optional: HTTP_HOST, HTTP_PORT, PUBLIC_URL, NATS_NAMESPACE, FLAGS_FILE,"
    " UNLEASH_URL with UNLEASH_API_TOKEN, PROVIDERS_FILE, GATEWAY_API_TOKENS, OPS_API_TOKENS,"
    " CORE_TOKEN, DATABASE_POOL_SIZE, LOG_LEVEL"
)
# Each command: its one-line summary. _NEEDS: the environment it reads.
COMMANDS = {
    "serve": "run the HTTP gateway (API, webhooks, ops, sandbox)",
    "worker": "run the orchestrator workers",
    "migrate": "apply database migrations",
    "dev": "start the whole stack on embedded defaults (make run)",
    "sandbox": "run the sandbox (simulated cascade-core and providers) as its own process",
    "transitions": "print the task and queue transition tables",
    "dlq": "inspect or replay dead-lettered messages",
    "dlq list": "print dead letters as JSON lines",
    "dlq replay": "send dead letters back to their subjects",
    **manual_checks.SUMMARIES,
    **flagcmd.SUMMARIES,
    **recon_command.SUMMARIES,
    **providers_command.SUMMARIES,
    "report": "compare the cohorts: a table, JSON (--json), a page of charts (--html, --png)",
}
_NEEDS = {
    "serve": _SERVE_ENV,
    "worker": "DATABASE_URL, NATS_URL, and CORE_URL unless SANDBOX_ENABLED=true;"
    " optional: NATS_NAMESPACE, PROVIDERS_FILE, CORE_TOKEN, WORKER_CONCURRENCY,"
    " WORKER_METRICS_PORT, JETSTREAM_ACK_WAIT_SECONDS, LOG_LEVEL",
    "migrate": "DATABASE_URL",
    "sandbox": "DATABASE_URL (its state: the schema sandbox there, created at start);"
    " PUBLIC_URL, the gateway that receives the webhooks (default"
    " http://127.0.0.1:<HTTP_PORT>); PROVIDERS_FILE for the webhook secrets; optional:"
    " SANDBOX_PORT (default 8090), HTTP_HOST, CORE_TOKEN, SANDBOX_WEBHOOK_DELAY_SECONDS,"
    " SANDBOX_FAIL_DELAY_SECONDS, SANDBOX_FLAKY_TIMEOUT_SECONDS,"
    " SANDBOX_FLAKY_SUCCESS_DELAY_SECONDS, LOG_LEVEL",
    "dev": "nothing: it starts embedded Postgres and NATS in a data folder of the checkout"
    " and sets the variables for the gateway and workers it runs",
    "transitions": "nothing: it reads no environment and connects to nothing",
    "dlq": "NATS_URL, NATS_NAMESPACE (optional, empty by default)",
    "dlq list": "NATS_URL, NATS_NAMESPACE (optional, empty by default)",
    "dlq replay": "NATS_URL, NATS_NAMESPACE (optional, empty by default)",
    **dict.fromkeys(manual_checks.SUMMARIES, manual_checks.ENVIRONMENT),
    **dict.fromkeys(flagcmd.SUMMARIES, flagcmd.ENVIRONMENT),
    **recon_command.NEEDS,
    **providers_command.NEEDS,
    "report": "DATABASE_URL, else the running make run stack's database (DATA_DIR/stack.json)",
}


def _describe(name: str, summary: str) -> str:
    """The ``--help`` description: what the command does, then the environment it needs."""
    what = f"{summary[0].upper()}{summary[1:]}."
    needs = textwrap.fill(f"Environment: {_NEEDS[name]}.", width=78)
    return f"{what}\n\n{needs}"


_REPORT_UNITS = """\
The table's first lines name the database read (password hidden) and the
window covered.
Units: rates in %, differences of rates in percentage points (pp), times in ms
below a second, else s, min or h. --json keeps plain numbers (rates as fractions
of 1, times in seconds); --html draws the same numbers.

Example: cascade-gateway report --since 2026-11-01 --html cohorts.html"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-gateway", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary in COMMANDS.items():
        if " " in name:  # a subcommand, added under its command below
            continue
        sub.add_parser(
            name, help=summary, description=_describe(name, summary), formatter_class=_FORMAT
        )
    dlq = sub.choices["dlq"]
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    for name in ("list", "replay"):
        summary = COMMANDS[f"dlq {name}"]
        dlq_sub.add_parser(
            name,
            help=summary,
            description=_describe(f"dlq {name}", summary),
            formatter_class=_FORMAT,
        )
    replay = dlq_sub.choices["replay"]
    replay.add_argument(
        "--limit",
        type=_positive,
        default=1000,
        help="replay at most this many, oldest first (default 1000)",
    )
    report = sub.choices["report"]
    report.epilog = _REPORT_UNITS
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.add_argument(
        "--since",
        help="ISO date/time, inclusive (created_at); a date alone is midnight UTC,"
        " a date/time must carry its zone (e.g. +00:00)",
    )
    report.add_argument(
        "--until",
        help="ISO date/time, exclusive (created_at); a date alone is midnight UTC,"
        " a date/time must carry its zone (e.g. +00:00)",
    )
    report.add_argument("--merchant", help="only this merchant")
    report.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="also write the comparison as a self-contained HTML page of charts (success rate"
        " with its 95%% interval, attempts, time to final, per merchant) to FILE",
    )
    report.add_argument(
        "--png",
        type=Path,
        metavar="FILE",
        help="also write that page as a PNG picture to FILE (needs chromium on PATH)",
    )
    manual_checks.configure_parser(
        sub.choices["manual-checks"], lambda name: _describe(name, COMMANDS[name]), _FORMAT
    )
    flagcmd.configure_parser(
        sub.choices["flags"], lambda name: _describe(name, COMMANDS[name]), _FORMAT
    )
    recon_command.configure_parser(
        sub.choices["recon"], lambda name: _describe(name, COMMANDS[name]), _FORMAT
    )
    providers_command.configure_parser(
        sub.choices["providers"], lambda name: _describe(name, COMMANDS[name]), _FORMAT
    )
    return parser


# Commands run beside a stack: without DATABASE_URL and NATS_URL they use the running
# `make run` stack's (see gateway/stackfile.py).
CLIENT_COMMANDS = ("report", "dlq", "manual-checks", "recon", "providers")


def _use_running_stack() -> None:
    """Complete this process's environment from the running dev stack, and say so."""
    env, source = stackfile.with_running_stack(os.environ)
    if source is None:
        return
    os.environ.update(env)
    print(  # noqa: T201
        f"cascade-gateway: using the make run stack recorded in {source}"
        f" (database {stackfile.redact_dsn(env.get('DATABASE_URL', '?'))},"
        f" nats {env.get('NATS_URL', '?')}, gateway {env.get('GATEWAY_URL', '?')})",
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "transitions":
        from orchestrator.domain import transition_table  # noqa: PLC0415

        print(transition_table())  # noqa: T201
        return 0
    if args.command == "dev":
        return _dev()
    if args.command == "migrate":
        return _migrate()
    if args.command in CLIENT_COMMANDS:
        _use_running_stack()
    if args.command == "manual-checks":  # a client of the gateway's ops API: no settings
        return manual_checks.run(args, os.environ)
    if args.command == "flags":  # the flags file or Unleash's Admin API: no settings
        return flagcmd.run(args, os.environ)
    if args.command == "recon" and args.recon_command != "run":  # an ops API client
        return recon_command.run_client(args, os.environ)
    if args.command == "providers":  # an ops API client
        return providers_command.run(args, os.environ)
    try:
        settings = load_settings()
    except SettingsError as exc:
        return fail(str(exc))
    logs.configure(settings.log_level, args.command)
    with contextlib.suppress(KeyboardInterrupt):
        if args.command in ("dlq", "report"):
            try:
                return _dlq(settings, args) if args.command == "dlq" else _report(settings, args)
            except (OSError, TimeoutError) as exc:
                return fail(f"cannot reach a dependency ({type(exc).__name__}: {exc})")
            except ValueError as exc:
                return fail(str(exc))
        if args.command == "serve":
            return _serve(settings)
        if args.command == "sandbox":
            return _sandbox(settings)
        if args.command == "worker":
            return _worker(settings)
        if args.command == "recon":
            try:
                return _run(recon_command.run_now(settings))
            except (OSError, TimeoutError) as exc:
                return fail(f"cannot reach a dependency ({type(exc).__name__}: {exc})")
            except ValueError as exc:
                return fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
