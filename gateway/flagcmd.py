"""``cascade-gateway flags``: a release manager's everyday moves on ``withdrawals.cascade``.

``show``, ``allow``/``disallow MERCHANT`` (the allow-list), ``rollout PERCENT`` and
``kill on|off``, against the flags file the gateway reads (``FLAGS_FILE``, else the running
``make run`` stack's, else ``config/flags.json``) or, with ``UNLEASH_URL`` and
``UNLEASH_ADMIN_TOKEN``, against Unleash's Admin API. A change prints what it changed
(before → after) and when new withdrawals see it. The moves themselves are in
:mod:`flags.admin`, the places in :mod:`flags.stores`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from flags.admin import (
    FlagsEditError,
    Plan,
    Toggle,
    apply,
    check_merchant,
    check_percent,
    plan_allow,
    plan_disallow,
    plan_kill,
    plan_rollout,
    summarize,
)
from flags.router import TOGGLE
from flags.stores import FlagsFile, FlagsStore, UnleashFlags
from gateway import stackfile
from gateway.settings import DEFAULT_FLAGS_FILE

EXIT_USAGE = 2
DEFAULT_REFRESH_SECONDS = 5

ENVIRONMENT = (
    "FLAGS_FILE (default: the running make run stack's, else config/flags.json), or"
    " UNLEASH_URL with UNLEASH_ADMIN_TOKEN (an Unleash admin API token) to use Unleash's"
    " Admin API; there UNLEASH_ENVIRONMENT (default: the environment of UNLEASH_API_TOKEN)"
    " and UNLEASH_PROJECT (default: its project, else default). UNLEASH_REFRESH_SECONDS"
    " (default 5): the gateway's refresh interval, for the line saying when new withdrawals"
    " see a change"
)
SUMMARIES = {
    "flags": "show or change who goes to the cascade: the withdrawals.cascade toggle in the"
    " flags file or in Unleash",
    "flags show": "the toggle: kill switch, allow-listed merchants, rollout percentage, strategies",
    "flags allow": "put a merchant on the allow-list (its new withdrawals go cascade)",
    "flags disallow": "take a merchant off the allow-list",
    "flags rollout": "send this percentage of merchants (always the same ones) to the cascade",
    "flags kill": "kill switch: on sends every new withdrawal legacy, off restores the strategies",
}


class _Usage(Exception):
    """The command's environment cannot work; one line, exit status 2."""


def configure_parser(
    parser: argparse.ArgumentParser,
    describe: Callable[[str], str],
    formatter: type[argparse.HelpFormatter],
) -> None:
    """The subcommands under ``flags``; ``describe(name)`` is a command's ``--help`` text."""
    commands = parser.add_subparsers(dest="flags_command", required=True)
    parsers = {}
    for name in ("show", "allow", "disallow", "rollout", "kill"):
        full = f"flags {name}"
        parsers[name] = commands.add_parser(
            name, help=SUMMARIES[full], description=describe(full), formatter_class=formatter
        )
    parsers["show"].add_argument("--json", action="store_true", help="print JSON instead")
    for name in ("allow", "disallow"):
        parsers[name].add_argument("merchant", metavar="MERCHANT", help="a merchant id")
    parsers["rollout"].add_argument(
        "percent", metavar="PERCENT", help="a whole percentage, 0-100 (0 ends the rollout)"
    )
    parsers["kill"].add_argument("switch", metavar="on|off", help="on: all legacy; off: undo")


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run ``flags <command>``; the exit status."""
    try:
        if args.flags_command != "show":
            _check_arguments(args)
        store, when = _store(env)
        if args.flags_command == "show":
            return asyncio.run(_show(store, as_json=args.json))
        return asyncio.run(_change(store, args, when))
    except (_Usage, FlagsEditError) as exc:
        print(f"cascade-gateway: flags {args.flags_command}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE


# --- where the toggle is --------------------------------------------------------------------


def _store(env: Mapping[str, str]) -> tuple[FlagsStore, str]:
    """The place of the toggle, and when the gateway sees a change made there."""
    refresh = _refresh_seconds(env)
    url, admin_token = env.get("UNLEASH_URL"), env.get("UNLEASH_ADMIN_TOKEN")
    keep = "withdrawals already created keep their cohort"
    if not url:
        if admin_token:
            raise _Usage("UNLEASH_ADMIN_TOKEN is set but UNLEASH_URL is not")
        path = _flags_file(env)
        return FlagsFile(path), (
            f"new withdrawals see it within {refresh} (the gateway re-reads FLAGS_FILE every"
            f" UNLEASH_REFRESH_SECONDS); {keep}"
        )
    if not url.startswith(("http://", "https://")):
        raise _Usage(f"UNLEASH_URL must start with http:// or https://, not {url!r}")
    if not admin_token:
        raise _Usage(
            "UNLEASH_URL is set, so the gateway reads the toggle from Unleash: set"
            " UNLEASH_ADMIN_TOKEN (an admin API token) to show or change it there"
        )
    project, environment = _unleash_scope(env)
    store = UnleashFlags(url, admin_token, project=project, environment=environment)
    return store, (
        f"new withdrawals see it within {refresh} (the gateway polls Unleash every"
        f" UNLEASH_REFRESH_SECONDS); {keep}"
    )


def _refresh_seconds(env: Mapping[str, str]) -> str:
    raw = env.get("UNLEASH_REFRESH_SECONDS", "").strip()
    if not raw:
        return f"{DEFAULT_REFRESH_SECONDS} s"
    if not raw.isdecimal() or not 1 <= int(raw) <= 3600:
        raise _Usage(f"UNLEASH_REFRESH_SECONDS must be a whole number from 1 to 3600, not {raw!r}")
    return f"{int(raw)} s"


def _flags_file(env: Mapping[str, str]) -> Path:
    """``FLAGS_FILE``, else the running make run stack's, else the default the gateway uses.

    A stack that routes from Unleash never re-reads its FLAGS_FILE: refused, not edited."""
    running = stackfile.running_stack(env)
    if running is None:
        return Path(env.get("FLAGS_FILE") or DEFAULT_FLAGS_FILE)
    stack_json, recorded = running
    stack_file = Path(recorded.get("FLAGS_FILE") or DEFAULT_FLAGS_FILE)
    path = Path(env["FLAGS_FILE"]) if env.get("FLAGS_FILE") else stack_file
    if recorded.get("UNLEASH_URL") and _same(path, stack_file):
        raise _Usage(
            f"the make run stack recorded in {stack_json} routes from Unleash at"
            f" {recorded['UNLEASH_URL']}, not from {path}: set UNLEASH_URL and"
            " UNLEASH_ADMIN_TOKEN (an admin API token) to show or change the toggle there"
        )
    return path


def _same(one: Path, other: Path) -> bool:
    try:
        return one.samefile(other)
    except OSError:
        return one.resolve() == other.resolve()


def _unleash_scope(env: Mapping[str, str]) -> tuple[str, str]:
    """Project and environment: set, else those of the gateway's client token.

    A client token reads ``<project>:<environment>.<secret>``: the environment it names is
    the one the gateway routes by, so the one to change."""
    scope = env.get("UNLEASH_API_TOKEN", "").partition(".")[0]
    token_project, _, token_environment = scope.partition(":") if ":" in scope else ("", "", "")
    project = env.get("UNLEASH_PROJECT") or (
        token_project if token_project not in ("", "*", "[]") else "default"
    )
    environment = env.get("UNLEASH_ENVIRONMENT") or token_environment
    if environment in ("", "*"):
        raise _Usage(
            "set UNLEASH_ENVIRONMENT to the Unleash environment the gateway reads"
            " (e.g. production), or UNLEASH_API_TOKEN to its client token"
        )
    return project, environment


# --- the commands ---------------------------------------------------------------------------


async def _show(store: FlagsStore, *, as_json: bool) -> int:
    toggle = await store.read()
    summary = summarize(toggle)
    if as_json:
        print(json.dumps({"where": store.where, **summary.as_json()}, indent=2))  # noqa: T201
        return 0
    lines = [f"{TOGGLE} in {store.where}"]
    lines += [f"  {label}: {text}" for label, text in summary.lines().items()]
    for number, strategy in enumerate(summary.strategies, 1):
        lines.append(f"  strategy {number}: {_strategy_line(strategy)}")
    if not summary.strategies:
        lines.append("  strategies: none")
    print("\n".join(lines))  # noqa: T201
    return 0


def _strategy_line(strategy: dict[str, object]) -> str:
    kind = strategy["kind"]
    if kind == "allow_list":
        detail = f"allow-list of {strategy['merchants']} merchant(s)"
    elif kind == "rollout":
        detail = f"rollout {strategy['rollout']} % (stickiness {strategy['stickiness']})"
    elif kind == "everyone":
        detail = "every merchant"
    else:
        detail = (
            f"other: rollout {strategy['rollout']} %, {strategy['constraints']} constraint(s),"
            f" segments {strategy['segments']}"
        )
    return f"{strategy['name']}, {detail}"


def _plan(args: argparse.Namespace, toggle: Toggle) -> Plan:
    command = args.flags_command
    if command == "allow":
        return plan_allow(toggle, check_merchant(args.merchant))
    if command == "disallow":
        return plan_disallow(toggle, check_merchant(args.merchant))
    if command == "rollout":
        return plan_rollout(toggle, check_percent(args.percent))
    return plan_kill(toggle, on=args.switch == "on")


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse a bad argument before anything is read."""
    command = args.flags_command
    if command in ("allow", "disallow"):
        check_merchant(args.merchant)
    elif command == "rollout":
        check_percent(args.percent)
    elif command == "kill" and args.switch not in ("on", "off"):
        raise _Usage(f"the kill switch is on or off, not {args.switch!r}")


async def _change(store: FlagsStore, args: argparse.Namespace, when: str) -> int:
    toggle = await store.read()
    plan = _plan(args, toggle)
    out = [f"{TOGGLE} in {store.where}"]
    if plan.unchanged is not None:
        out.append(f"  nothing changed: {plan.unchanged}")
        print("\n".join(out))  # noqa: T201
        return 0
    await store.write(toggle, plan)
    before = summarize(toggle).lines()
    after = summarize(apply(toggle, plan.edits)).lines()
    changes = [
        f"  {label}: {before.get(label, 'none')} → {after.get(label, 'none')}"
        for label in dict.fromkeys([*before, *after])
        if before.get(label) != after.get(label)
    ]
    out += changes or ["  strategies: changed (allow-list, rollout and kill switch read the same)"]
    out += [f"  note: {note}" for note in plan.notes]
    out.append(f"{when[0].upper()}{when[1:]}.")
    print("\n".join(out))  # noqa: T201
    return 0
