"""``cascade-gateway manual-checks``: support works the manual checks from a terminal.

``list`` the tasks waiting for a human, ``show`` one case (a task id or a withdrawal id) with
every answer its provider gave, ``resolve`` one with a decision: by task id, or by withdrawal
id with ``--provider``, the provider support checked (refused when the withdrawal's cascade
has moved on to another since, so a word about one attempt never decides another). Text from
the gateway or a provider is printed with its control characters escaped (``--json`` aside).
Every call goes to the
gateway's ops API over HTTP, so that the provider check of a negative decision, the task lock
and the audit row are the gateway's one path, as for any other client:

- ``GATEWAY_URL`` (default ``http://127.0.0.1:8080``) says where the gateway is;
- ``OPS_API_TOKEN`` is the ops token to present; without it, the first token of
  ``OPS_API_TOKENS`` (the variable the gateway accepts them from), else ``ops-token``.

Under ``make run`` (no ``DATABASE_URL``/``NATS_URL`` set) those unset come from the running
stack (``DATA_DIR/stack.json``).

Exit status: 0 done; 2 the request was bad or the gateway could not be asked (unreachable,
not HTTP, an answer without the ops API's fields, 401, 404, 422, 503: one line on stderr
saying which); 3 the gateway refused the decision
(409: nothing was applied, or for ``provider_paid`` the provider's success was), with the
provider's answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN = "ops-token"  # noqa: S105 — the documented development default, as the gateway's
EXIT_ERROR = 2
EXIT_REFUSED = 3
# A resolution may wait for the provider's status and a cancel: longer than a plain read.
TIMEOUT_SECONDS = 60.0
MAX_OPERATOR = 64
MAX_REASON = 500

ENVIRONMENT = (
    "GATEWAY_URL (default http://127.0.0.1:8080); OPS_API_TOKEN, else the first token of"
    " OPS_API_TOKENS, else ops-token. Without DATABASE_URL and NATS_URL, those unset come"
    " from the running make run stack (DATA_DIR/stack.json)"
)
SUMMARIES = {
    "manual-checks": "list, show and resolve the withdrawals waiting for support"
    " (MANUAL_CHECK), through the gateway's ops API",
    "manual-checks list": "the tasks waiting in MANUAL_CHECK, the longest waiting first",
    "manual-checks show": "one case: the withdrawal, each attempt and every answer of its"
    " provider (by task id or withdrawal id)",
    "manual-checks resolve": "apply support's decision to a task in MANUAL_CHECK (by task id, or"
    " by withdrawal id with --provider): positive"
    " (the provider paid: commit) or negative (it did not: roll back, the cascade moves on,"
    " once the provider confirms it)",
}


class OpsError(Exception):
    """The gateway could not be asked, or refused the request; ``str`` is the line to print."""

    exit_status = EXIT_ERROR


class Refused(OpsError):
    """A 409: the decision was not applied (``code`` says why), with the provider's answer."""

    exit_status = EXIT_REFUSED

    def __init__(self, message: str, code: str, envelope: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.envelope = envelope


# --- what the commands read of the ops API's answers ----------------------------------------
# Only the fields printed, with their types: an answer without them (another service behind
# GATEWAY_URL, say) is one line of error, not a traceback. The full answers are gateway.ops_wire.


class _Answer(msgspec.Struct):
    at: str
    event: str
    status: str
    source: str | None = None
    code: str | None = None
    reference: str | None = None
    detail: str | None = None


class _Destination(msgspec.Struct):
    type: str
    account: str
    holder: str | None = None


class _Check(msgspec.Struct):
    task_id: str
    withdrawal_id: str
    merchant_id: str
    provider_id: str
    provider_reference: str | None
    amount: str
    currency: str
    waited_seconds: float = 0
    provider_order_id: str | None = None
    destination: _Destination | None = None
    provider_answers: list[_Answer] = []


class _Checks(msgspec.Struct):
    manual_checks: list[_Check]


class _Queue(msgspec.Struct):
    state: str
    cancel_requested: bool
    failure_code: str | None
    created_at: str


class _Task(msgspec.Struct):
    task_id: str
    position: int
    provider_id: str
    state: str
    provider_order_id: str
    provider_reference: str | None = None
    status_polls: int = 0
    recheck_attempts: int = 0
    provider_answers: list[_Answer] = []


class _Event(msgspec.Struct):
    event: str
    actor: str
    created_at: str
    task_id: str | None = None
    details: dict[str, Any] | None = None


class _Detail(msgspec.Struct):
    withdrawal_id: str
    merchant_id: str
    cohort: str
    amount: str
    currency: str
    queue: _Queue
    tasks: list[_Task]
    events: list[_Event]
    destination: _Destination | None = None


class _Resolved(msgspec.Struct):
    task_id: str
    state: str


@dataclass(frozen=True)
class OpsClient:
    """The ops API over HTTP, one request at a time (a person's pace)."""

    url: str
    token: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OpsClient:
        url = (env.get("GATEWAY_URL") or DEFAULT_URL).rstrip("/")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise OpsError(f"GATEWAY_URL must be an http:// or https:// URL, not {url!r}")
        token = (env.get("OPS_API_TOKEN") or "").strip()
        if not token:
            listed = [t.strip() for t in (env.get("OPS_API_TOKENS") or "").split(",")]
            token = next((t for t in listed if t), DEFAULT_TOKEN)
        return cls(url=url, token=token)

    def get(self, path: str, *, shape: type[msgspec.Struct] | None = None) -> Any:
        """The JSON answer; with ``shape``, refused unless it has that shape's fields."""
        return self._shaped("GET", path, self._call("GET", path, None, {}), shape)

    def post(
        self,
        path: str,
        body: dict[str, Any],
        operator: str,
        *,
        shape: type[msgspec.Struct] | None = None,
    ) -> Any:
        answer = self._call("POST", path, body, {"X-Operator": operator})
        return self._shaped("POST", path, answer, shape)

    def _shaped(
        self, method: str, path: str, answer: Any, shape: type[msgspec.Struct] | None
    ) -> Any:
        if shape is not None:
            try:
                msgspec.convert(answer, shape)
            except msgspec.ValidationError as exc:
                raise OpsError(
                    f"the gateway at {self.url} answered {method} {path} without the ops API's"
                    f" fields ({exc}); is GATEWAY_URL the gateway?"
                ) from exc
        return answer

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, extra: dict[str, str]
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(  # noqa: S310 — the scheme is checked in from_env
            self.url + path, data=data, headers={**headers, **extra}, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _refusal(exc.code, _error_body(exc)) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OpsError(
                f"cannot reach the gateway at {self.url} ({reason}); is it running?"
                " GATEWAY_URL says where it is"
            ) from exc
        except http.client.HTTPException as exc:
            raise OpsError(
                f"the gateway at {self.url} did not answer as an HTTP server does"
                f" ({type(exc).__name__}); is GATEWAY_URL the gateway's HTTP port?"
            ) from exc
        except ValueError as exc:
            raise OpsError(
                f"the gateway at {self.url} answered something that is not JSON"
            ) from exc


def _error_body(error: urllib.error.HTTPError) -> bytes:
    """An error answer's body, or nothing when it cannot be read to its end."""
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""


def _refusal(status: int, raw: bytes) -> OpsError:
    """The error an HTTP error answer of the ops API stands for."""
    try:
        envelope = json.loads(raw)
        code, message = envelope["error"]["code"], envelope["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return OpsError(f"the gateway answered {status} without an ops API error: {raw[:200]!r}")
    if status == 401:
        return OpsError(
            "the gateway refused the ops token (401): set OPS_API_TOKEN to one of the gateway's"
            " OPS_API_TOKENS"
        )
    if status == 409:
        return Refused(f"refused ({status} {code}): {message}", code, envelope)
    return OpsError(f"{message} ({status} {code})")


# --- the commands ------------------------------------------------------------------------


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run ``manual-checks <command>``; the exit status."""
    out: Callable[[str], None] = print
    try:
        client = OpsClient.from_env(env)
        if args.manual_checks_command == "list":
            return _list(client, as_json=args.json, out=out)
        if args.manual_checks_command == "show":
            return _show(client, args.case, as_json=args.json, out=out)
        return _resolve(client, args, out=out)
    except Refused as exc:
        if args.json:
            out(json.dumps(exc.envelope, indent=2))
        _err(str(exc))
        for line in _evidence_lines(exc):
            _err(line)
        return exc.exit_status
    except OpsError as exc:
        _err(str(exc))
        return exc.exit_status


def _err(line: str) -> None:
    print(f"cascade-gateway: {printable(line)}", file=sys.stderr)  # noqa: T201


def _list(client: OpsClient, *, as_json: bool, out: Callable[[str], None]) -> int:
    page = client.get("/ops/manual-checks", shape=_Checks)
    if as_json:
        out(json.dumps(page, indent=2))
        return 0
    checks = page["manual_checks"]
    if not checks:
        out("No withdrawal is waiting for a manual check.")
        return 0
    rows = [_list_row(check) for check in checks]
    out(_table(LIST_COLUMNS, rows))
    out(
        f"\n{len(checks)} waiting. A case with every answer of its provider:"
        " cascade-gateway manual-checks show WITHDRAWAL_ID"
    )
    return 0


LIST_COLUMNS = (
    "WAITED",
    "WITHDRAWAL",
    "MERCHANT",
    "AMOUNT",
    "DESTINATION",
    "PROVIDER",
    "ORDER ID / REFERENCE",
    "ANSWERS",
    "TASK",
)


def _list_row(check: dict[str, Any]) -> tuple[str, ...]:
    answers = check.get("provider_answers", [])
    last = f", last {_answer_status(answers[-1])}" if answers else ""
    return (
        duration(check.get("waited_seconds", 0)),
        check["withdrawal_id"],
        check["merchant_id"],
        f"{check['amount']} {check['currency']}",
        _destination(check.get("destination")),
        check["provider_id"],
        f"{check.get('provider_order_id', '?')} / {check['provider_reference'] or '-'}",
        f"{len(answers)}{last}",
        check["task_id"],
    )


def _show(client: OpsClient, case: str, *, as_json: bool, out: Callable[[str], None]) -> int:
    page = client.get("/ops/manual-checks", shape=_Checks)
    waiting: dict[str, dict[str, Any]] = {c["task_id"]: c for c in page["manual_checks"]}
    withdrawal_id = case
    if _is_uuid(case) and str(uuid.UUID(case)) in waiting:
        withdrawal_id = waiting[str(uuid.UUID(case))]["withdrawal_id"]
    try:
        path = "/ops/withdrawals/" + urllib.parse.quote(withdrawal_id, safe="")
        detail = client.get(path, shape=_Detail)
    except OpsError as exc:
        if "(404 " not in str(exc):
            raise
        raise OpsError(
            f"no task waiting in manual check and no withdrawal has the id {case!r}"
            " (a task no longer waiting is shown by its withdrawal id)"
        ) from exc
    if as_json:
        out(json.dumps(detail, indent=2))
        return 0
    for line in _case_lines(detail, waiting):
        out(line)
    return 0


def _case_lines(detail: dict[str, Any], waiting: dict[str, dict[str, Any]]) -> list[str]:
    """A withdrawal as support checks it against a provider statement (control characters of
    the gateway's or the provider's text escaped, for a terminal)."""
    queue = detail["queue"]
    lines = [
        f"withdrawal   {detail['withdrawal_id']}",
        f"merchant     {detail['merchant_id']} ({detail['cohort']} cohort)",
        f"amount       {detail['amount']} {detail['currency']}",
        f"destination  {_destination(detail.get('destination'))}",
        f"queue        {queue['state']}"
        + (" (cancel requested)" if queue["cancel_requested"] else "")
        + (f", failure {queue['failure_code']}" if queue["failure_code"] else ""),
        f"created      {utc_time(queue['created_at'])}",
    ]
    tasks = detail["tasks"]
    for task in tasks:
        decisions = [
            event
            for event in detail["events"]
            if event.get("task_id") == task["task_id"] and str(event["event"]).startswith("manual.")
        ]
        lines += ["", *_task_lines(task, len(tasks), waiting.get(task["task_id"]), decisions)]
    for task in tasks:
        if task["task_id"] in waiting:
            lines += [
                "",
                "Decide with: cascade-gateway manual-checks resolve"
                f" {shlex.quote(detail['withdrawal_id'])}"
                f" --provider {shlex.quote(task['provider_id'])} --decision positive|negative"
                " --operator NAME --reason TEXT",
            ]
    return [printable(line) for line in lines]


def _queue_state(queue: dict[str, Any]) -> str:
    text = str(queue["state"])
    if queue["cancel_requested"]:
        text += " (cancel requested)"
    if queue["failure_code"]:
        text += f", failure {queue['failure_code']}"
    return text


def _task_lines(
    task: dict[str, Any],
    count: int,
    check: dict[str, Any] | None,
    decisions: list[dict[str, Any]],
) -> list[str]:
    state = task["state"]
    if check is not None:
        state += f" for {duration(check['waited_seconds'])}"
    answers = task.get("provider_answers", [])
    lines = [
        f"attempt {task['position'] + 1} of {count}: {task['provider_id']}, {state}",
        f"  task                {task['task_id']}",
        f"  our order id        {task['provider_order_id']}",
        f"  provider reference  {task.get('provider_reference') or '-'}",
        f"  polls               {task.get('status_polls', 0)} status,"
        f" {task.get('recheck_attempts', 0)} recheck",
        f"  provider answers    {len(answers) or 'none'}",
    ]
    lines += [f"    {_answer_line(answer)}" for answer in answers]
    lines += [f"  decision            {_decision_line(event)}" for event in decisions]
    return lines


def _decision_line(event: dict[str, Any]) -> str:
    """Support's decision as its audit row keeps it: applied or refused, by whom, why."""
    details = event.get("details") or {}
    line = f"{details.get('decision', '?')} by {event['actor']} at {utc_time(event['created_at'])}"
    line += f": {details.get('reason', '')}  [{event['event']}]"
    if details.get("provider_check"):
        line += f" (provider check: {details['provider_check']})"
    return line


def _answer_line(answer: dict[str, Any]) -> str:
    parts = [
        utc_time(answer["at"]),
        f"{answer.get('source') or '-':<8}",
        f"{_answer_status(answer):<9}",
    ]
    if answer.get("reference"):
        parts.append(f"reference {answer['reference']}")
    if answer.get("detail"):
        parts.append(f"({answer['detail']})")
    parts.append(f"[{answer['event']}]")
    return "  ".join(parts)


def _answer_status(answer: dict[str, Any]) -> str:
    code = answer.get("code")
    return f"{answer['status']} ({code})" if code else str(answer["status"])


def _resolve(client: OpsClient, args: argparse.Namespace, *, out: Callable[[str], None]) -> int:
    body: dict[str, Any] = {"decision": args.decision, "reason": args.reason}
    if args.unverified:
        body["unverified"] = True
    task, provider = _waiting_task(client, args.case, args.provider)
    answer = client.post(f"/ops/tasks/{task}/resolve", body, args.operator, shape=_Resolved)
    if args.json:
        out(json.dumps(answer, indent=2))
        return 0
    how = " unverified" if args.unverified else ""
    out(
        printable(
            f"task {answer['task_id']} at {provider or '(provider not listed)'}"
            f" is {answer['state']}: {args.decision}{how} decision by {args.operator}, kept in"
            " the audit trail"
        )
    )
    return 0


def _waiting_task(client: OpsClient, case: str, provider: str | None) -> tuple[str, str | None]:
    """The task to decide and its provider: ``case`` itself (a task id), or the task of the
    withdrawal ``case`` that waits in manual check (a withdrawal has at most one: its attempts
    run one at a time), only when it is at ``provider``, the provider support checked: the
    cascade may have moved on to another since."""
    checks = client.get("/ops/manual-checks", shape=_Checks)["manual_checks"]
    task_id = str(uuid.UUID(case)) if _is_uuid(case) else case
    for check in checks:
        if check["task_id"] == task_id:
            if provider is not None and provider != check["provider_id"]:
                raise OpsError(
                    f"task {task_id} is the attempt at {check['provider_id']}, not at {provider}:"
                    " nothing was applied (see manual-checks show)"
                )
            return task_id, str(check["provider_id"])
    for check in checks:
        if check["withdrawal_id"] == case:
            return str(check["task_id"]), _same_provider(check, provider)
    if _is_uuid(case):
        return task_id, None  # not waiting (any more): the gateway says why
    raise OpsError(
        f"no task waiting in manual check has the id {case!r}, nor has a withdrawal"
        " waiting in one (see manual-checks list)"
    )


def _same_provider(check: dict[str, Any], provider: str | None) -> str:
    """The provider of the withdrawal's waiting task, when it is the one support named."""
    case, waiting = check["withdrawal_id"], str(check["provider_id"])
    if provider is None:
        raise OpsError(
            f"a decision by withdrawal id needs --provider, the provider whose statement you"
            f" checked (its cascade may have moved on since); or give the task id:"
            f" cascade-gateway manual-checks show {shlex.quote(case)}"
        )
    if provider != waiting:
        raise OpsError(
            f"withdrawal {case!r} waits on {waiting} now (task {check['task_id']}), not on"
            f" {provider}: nothing was applied; the attempt you checked no longer waits, see"
            f" cascade-gateway manual-checks show {shlex.quote(case)}"
        )
    return waiting


def _evidence_lines(refused: Refused) -> list[str]:
    """What the provider answered when a decision was refused, and what to do next."""
    evidence = refused.envelope["error"].get("evidence") or {}
    lines = []
    if evidence:
        shown = ("provider_status", "reference", "code", "source", "ambiguous", "provider_check")
        said = ", ".join(f"{k} {evidence[k]}" for k in shown if evidence.get(k) is not None)
        lines.append(f"  the provider's answer: {said}")
    hint = NEXT_STEP.get(refused.code)
    if hint:
        lines.append(f"  {hint}")
    return lines


NEXT_STEP = {
    "provider_paid": "the provider paid: the attempt is committed and the withdrawal succeeds;"
    " nothing else to do",
    "provider_pending": "the order is still pending at the provider: wait for its outcome"
    " (or for the cancel it accepted), then look again",
    "provider_unreachable": "the provider could not confirm: send the decision again later,"
    " or add --unverified to apply it on your word (audited as unverified)",
    "not_in_manual_check": "the task is no longer waiting (a colleague or the provider"
    " decided first): see cascade-gateway manual-checks show",
}


# --- formatting -----------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``, ``1d03h``: how long a case has waited."""
    whole = max(0, int(seconds))
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _destination(destination: dict[str, Any] | None) -> str:
    if not destination:
        return "-"
    holder = f" ({destination['holder']})" if destination.get("holder") else ""
    return f"{destination['type']} {destination['account']}{holder}"


def utc_time(text: str) -> str:
    """An ISO time as ``2026-12-06 06:40:01Z`` (UTC, to the second)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def printable(text: str) -> str:
    """``text`` with each control or other unprintable character escaped (``\\x1b``,
    ``\\n``, ``\\u202e``): what a provider or the gateway sent is shown, never interpreted by
    the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    rows = [tuple(printable(text) for text in row) for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(text.ljust(w) for text, w in zip(row, widths, strict=True)).rstrip()
        for row in [columns, *rows]
    ]
    return "\n".join(lines)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# --- the parser -------------------------------------------------------------------------------


def operator(text: str) -> str:
    """Who decides, for the audit row: printable ASCII (it travels in ``X-Operator``)."""
    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError("must name who decides (it is kept in the audit row)")
    if len(name) > MAX_OPERATOR or not (name.isascii() and name.isprintable()):
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_OPERATOR} printable ASCII characters, not {text!r}"
        )
    return name


def reason(text: str) -> str:
    """Why, for the audit row: not blank, at most 500 characters (the API's limit)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must say why (it is kept in the audit row)")
    if len(text) > MAX_REASON:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_REASON} characters")
    return text


def configure_parser(
    parser: argparse.ArgumentParser,
    describe: Callable[[str], str],
    formatter: type[argparse.HelpFormatter],
) -> None:
    """The ``list``, ``show`` and ``resolve`` subcommands under ``manual-checks``;
    ``describe(name)`` is a command's ``--help`` description."""
    commands = parser.add_subparsers(dest="manual_checks_command", required=True)
    parsers = {}
    for name in ("list", "show", "resolve"):
        full = f"manual-checks {name}"
        parsers[name] = commands.add_parser(
            name, help=SUMMARIES[full], description=describe(full), formatter_class=formatter
        )
        parsers[name].add_argument(
            "--json", action="store_true", help="print the ops API's JSON answer instead"
        )
    parsers["show"].add_argument(
        "case", metavar="TASK_OR_WITHDRAWAL_ID", help="a task id from list, or a withdrawal id"
    )
    resolve = parsers["resolve"]
    resolve.add_argument(
        "case",
        metavar="TASK_OR_WITHDRAWAL_ID",
        help="the task waiting (from list), or its withdrawal's id",
    )
    resolve.add_argument(
        "--provider",
        help="the provider whose statement you checked: required with a withdrawal id (refused"
        " when the withdrawal waits on another provider now); with a task id, checked if given",
    )
    resolve.add_argument(
        "--decision",
        required=True,
        choices=("positive", "negative"),
        help="positive: the provider paid (commit); negative: it did not (roll back; the"
        " provider is asked first)",
    )
    resolve.add_argument(
        "--operator",
        required=True,
        type=operator,
        help="who decides (sent as X-Operator, kept in the audit row)",
    )
    resolve.add_argument(
        "--reason", required=True, type=reason, help="why, e.g. the provider statement's line"
    )
    resolve.add_argument(
        "--unverified",
        action="store_true",
        help="apply a negative decision the provider could not confirm, on your word",
    )
