"""``cascade-gateway manual-checks`` without a gateway: configuration, masking, formatting.

The command against a live gateway: tests/integration/test_manual_checks_cli.py.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from gateway.cli import build_parser
from gateway.manual_checks import (
    OpsClient,
    OpsError,
    Refused,
    _refusal,
    duration,
    printable,
    run,
)
from gateway.ops_wire import mask_account, mask_holder, masked_destination, provider_answer
from orchestrator.store.views import ProviderAnswerRow, is_provider_answer


@pytest.mark.parametrize(
    ("env", "url", "token"),
    [
        ({}, "http://127.0.0.1:8080", "ops-token"),
        ({"OPS_API_TOKENS": " first , second"}, "http://127.0.0.1:8080", "first"),
        ({"OPS_API_TOKENS": ",,"}, "http://127.0.0.1:8080", "ops-token"),
        ({"OPS_API_TOKEN": "mine", "OPS_API_TOKENS": "first"}, "http://127.0.0.1:8080", "mine"),
        ({"GATEWAY_URL": "https://gw.example/"}, "https://gw.example", "ops-token"),
    ],
)
def test_the_gateway_and_the_token_come_from_the_environment(
    env: dict[str, str], url: str, token: str
) -> None:
    assert OpsClient.from_env(env) == OpsClient(url=url, token=token)


def test_a_gateway_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(OpsError, match="GATEWAY_URL must be an http:// or https:// URL"):
        OpsClient.from_env({"GATEWAY_URL": "file:///etc/passwd"})


def _envelope(code: str, message: str, **extra: object) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


def test_http_errors_become_one_line() -> None:
    assert str(_refusal(404, _envelope("not_found", "No such task."))) == (
        "No such task. (404 not_found)"
    )
    assert "set OPS_API_TOKEN" in str(_refusal(401, _envelope("unauthorized", "Missing.")))
    assert "without an ops API error" in str(_refusal(502, b"<html>bad gateway</html>"))
    refused = _refusal(409, _envelope("provider_paid", "paid", evidence={"source": "poll"}))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.exit_status) == ("provider_paid", 3)
    assert refused.envelope["error"]["evidence"] == {"source": "poll"}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (192, "3m12s"), (7500, "2h05m"), (97200, "1d03h"), (-3, "0s")],
)
def test_durations_read_at_a_glance(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("account", "masked"),
    [
        ("DE89370400440532013000", "DE89**************3000"),
        ("4111111111111111", "4111********1111"),
        ("12345678", "****5678"),
        ("1234567", "*******"),
        ("", ""),
    ],
)
def test_accounts_show_only_their_ends(account: str, masked: str) -> None:
    assert mask_account(account) == masked


def test_the_destination_is_masked_holder_included() -> None:
    assert mask_holder("Jane  van Doe") == "J. v. D."
    shown = masked_destination({"type": "card", "account": "4111111111111111", "holder": " "})
    assert (shown.type, shown.account, shown.holder) == ("card", "4111********1111", None)


def test_a_provider_answer_as_support_reads_it() -> None:
    at = datetime(2026, 12, 6, 6, 30, tzinfo=UTC)
    definitive: dict[str, object] = {
        "provider_status": "pending",
        "reference": "r-1",
        "code": None,
        "source": "poll",
    }
    unclear: dict[str, object] = {"ambiguous": "timeout after 10s", "timer": "status_tick"}
    assert is_provider_answer(definitive)
    assert is_provider_answer(unclear)
    assert not is_provider_answer({"timer": "status_tick"})
    answer = provider_answer(ProviderAnswerRow(at=at, event="status.pending", details=definitive))
    assert (answer.source, answer.status, answer.reference, answer.detail) == (
        "poll",
        "pending",
        "r-1",
        None,
    )
    assert answer.at == "2026-12-06T06:30:00+00:00"
    none = provider_answer(ProviderAnswerRow(at=at, event="recheck.unknown", details=unclear))
    assert (none.source, none.status, none.detail) == (None, "no_answer", "timeout after 10s")


# --- answers that are not the ops API's, and text a terminal must not interpret -------------


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the JSON its server was given for the path, else 404."""

    server: _CannedServer

    def do_GET(self) -> None:  # http.server's name
        body = json.dumps(self.server.answers.get(self.path, {"error": "none"})).encode()
        self.send_response(200 if self.path in self.server.answers else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # http.server's name
        pass


class _CannedServer(http.server.ThreadingHTTPServer):
    answers: dict[str, object]


class _NotHttp(socketserver.StreamRequestHandler):
    """What an SSH server (or anything else that is not HTTP) says on connect."""

    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")


@contextlib.contextmanager
def _serving(server: socketserver.TCPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _gateway(answers: dict[str, object]) -> Iterator[str]:
    server = _CannedServer(("127.0.0.1", 0), _Canned)
    server.answers = answers
    with _serving(server) as url:
        yield url


def _command(url: str, *args: str) -> int:
    parsed = build_parser().parse_args(["manual-checks", *args])
    return run(parsed, {"GATEWAY_URL": url, "OPS_API_TOKEN": "ops-token"})


def test_a_gateway_url_that_is_not_http_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _NotHttp)
    with _serving(server) as url:
        assert _command(url, "list") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"the gateway at {url} did not answer as an HTTP server does (BadStatusLine)" in err


CHECK: dict[str, object] = {
    "task_id": "1ba5d4dc-a9d8-480f-93a8-8014b785e06c",
    "withdrawal_id": "wd_1",
    "merchant_id": "m_1",
    "provider_id": "sbx_a",
    "provider_reference": "ref-1",
    "amount": "1.00",
    "currency": "EUR",
    "waited_seconds": 5,
    "provider_answers": [],
}


@pytest.mark.parametrize(
    ("args", "answers", "missing"),
    [
        (["list"], {"/ops/manual-checks": {"status": "ok"}}, "missing required field"),
        (
            ["list"],
            {"/ops/manual-checks": {"manual_checks": [{**CHECK, "task_id": 7}]}},
            "Expected `str`, got `int` - at `$.manual_checks[0].task_id`",
        ),
        (
            ["show", "wd_1"],
            {"/ops/manual-checks": {"manual_checks": []}, "/ops/withdrawals/wd_1": {"id": 1}},
            "GET /ops/withdrawals/wd_1 without the ops API's fields",
        ),
        (
            [
                *("resolve", "wd_1", "--provider", "sbx_a", "--decision", "positive"),
                *("--operator", "alice", "--reason", "statement"),
            ],
            {"/ops/manual-checks": {"checks": []}},
            "GET /ops/manual-checks without the ops API's fields",
        ),
    ],
)
def test_a_json_answer_without_the_ops_apis_fields_is_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], answers: dict[str, object], missing: str
) -> None:
    with _gateway(answers) as url:
        assert _command(url, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert missing in err
    assert "is GATEWAY_URL the gateway?" in err


ESCAPES = "\x1b[2J\x1b[31mPAID\x1b[0m\r\n\u202e"


def test_text_from_the_provider_is_shown_escaped_never_interpreted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    answer = {"at": "2026-12-06T06:30:00+00:00", "event": "status.pending", "status": "pending"}
    tricked = {**answer, "source": "poll", "reference": ESCAPES, "code": ESCAPES, "detail": ESCAPES}
    check = {**CHECK, "provider_reference": ESCAPES, "provider_answers": [tricked]}
    task = {
        "task_id": CHECK["task_id"],
        "position": 0,
        "provider_id": "sbx_a",
        "state": "MANUAL_CHECK",
        "provider_order_id": "cg-1",
        "provider_reference": ESCAPES,
        "provider_answers": [tricked],
    }
    event = {
        "event": "manual.refused.provider_pending",
        "actor": "ops:bob",
        "created_at": "2026-12-06T06:31:00+00:00",
        "task_id": CHECK["task_id"],
        "details": {"decision": "negative", "reason": ESCAPES, "provider_check": ESCAPES},
    }
    queue = {"state": "ACTIVE", "cancel_requested": False, "failure_code": None}
    detail = {
        **{k: CHECK[k] for k in ("withdrawal_id", "merchant_id", "amount", "currency")},
        "cohort": "cascade",
        "queue": {**queue, "created_at": "2026-12-06T06:29:00+00:00"},
        "tasks": [task],
        "events": [event],
    }
    answers = {"/ops/manual-checks": {"manual_checks": [check]}, "/ops/withdrawals/wd_1": detail}
    with _gateway(answers) as url:
        assert _command(url, "list") == 0
        assert _command(url, "show", "wd_1") == 0
        assert _command(url, "list", "--json") == 0
    out = capsys.readouterr().out
    shown, as_json = out.split("\n{", 1)
    for character in ("\x1b", "\r", "\u202e"):
        assert character not in shown
    escaped = r"\x1b[2J\x1b[31mPAID\x1b[0m\r\n\u202e"
    assert shown.count(escaped) == 8, shown  # list: reference; show: reference, answer x3, event x2
    assert json.loads("{" + as_json)["manual_checks"][0]["provider_reference"] == ESCAPES
    assert printable("plain text: 250.00 EUR") == "plain text: 250.00 EUR"
