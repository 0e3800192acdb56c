"""Schemathesis over ``contracts/openapi.json`` against the live app, in both cohorts.

Every operation of the document gets positive and negative generated cases (the real bearer
token most of the time, otherwise none, a wrong one or a non-bearer scheme), sent over real HTTP
to the real app (real Postgres, real NATS) with every withdrawal routed legacy, then cascade.
Every response must pass schemathesis' checks (no 5xx, documented status, content type,
headers and body schema) and the README's wire rules the document can only state in prose
(``schemathesis_support.wire_problems``). On top of schemathesis' own data the run adds, per
case, what a generator would never find: existing withdrawals in every status for read and
cancel, sandbox providers that really execute, a replayed or conflicting create after a 201,
a wrong media type (415) and an oversized body (413). Unknown paths and methods are checked
against the document's ``x-unrouted-responses``.

Generated ``withdrawal_id``s and ``Idempotency-Key``s are made unique (see
``schemathesis_support.make_unique``), so 409s come from the deliberate follow-ups and the
seeded ids rather than from collisions between random values.

The app runs in the test's event loop, so the synchronous schemathesis calls run in a worker
thread (``asyncio.to_thread``). Problems are collected rather than raised, so one run reports
all of them, each with a curl command to reproduce it. ``CONFORMANCE_EXAMPLES`` scales the run.

Bugs the run found (NUL characters reaching Postgres, Litestar's automatic OPTIONS) are fixed;
the focused tests at the end of this file pin them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import requests
import requests.structures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, Response
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup

from tests.conftest import Stack, StackFactory, flags_document, new_id, withdrawal_body
from tests.contract import schemathesis_support as sts

if TYPE_CHECKING:
    from schemathesis.specs.openapi.schemas import OpenApiCase

COHORTS = {
    "legacy": flags_document(enabled=False),
    "cascade": flags_document(enabled=True),
}
EXAMPLES = int(os.environ.get("CONFORMANCE_EXAMPLES", "50"))
SCHEMA = sts.load_schema()
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}
CREATE = "POST /v1/withdrawals"
READ = "GET /v1/withdrawals/{withdrawal_id}"
CANCEL = "POST /v1/withdrawals/{withdrawal_id}/cancel"
HEALTH = "GET /healthz"

# Per case with a body: mostly as generated, sometimes with a wrong media type or too big.
PROBES = ("none", "none", "none", "none", "media", "size")
WRONG_MEDIA_TYPES = (
    "text/plain",
    "application/xml",
    "application/x-www-form-urlencoded",
    "application/json; charset=latin-1",
    "application/jsonx",
)
# After a 201: nothing, the same request again, another key, or the same key with another body.
FOLLOW_UPS = ("none", "none", "again", "other-key", "changed-body")

DUPLICATE = "duplicate_withdrawal"
CONFLICT = "idempotency_conflict"


@dataclass
class Run:
    url: str
    known_ids: list[str]
    session: requests.Session = field(default_factory=requests.Session)
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def cases(self) -> int:
        return sum(self.statuses.values())


@dataclass(frozen=True)
class Expect:
    status: int
    code: str | None = None


def request_of(
    case: OpenApiCase, url: str, forced: Mapping[str, str | None] | None = None
) -> dict[str, Any]:
    """The request schemathesis would send for ``case``, with the ``forced`` headers on the wire
    (``None`` removes one). Forced here, after serialisation, because schemathesis drops a
    header a negative case had removed even when it is set again on the case."""
    kwargs = case.as_transport_kwargs(base_url=url)
    sent = requests.structures.CaseInsensitiveDict(kwargs["headers"])
    for name, value in (forced or {}).items():
        sent.pop(name, None)
        if value is not None:
            sent[name] = value
    kwargs["headers"] = dict(sent)
    return kwargs


def _sent_header(response: Response, name: str) -> str | None:
    """A header of the request that got ``response``, as it went on the wire."""
    value = response.request.headers.get(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _sent_json(response: Response) -> Any:
    """The JSON body of the request that got ``response``, as it went on the wire."""
    body = response.request.body
    assert isinstance(body, str | bytes), f"expected a JSON body, sent {body!r}"
    return json.loads(body)


def _problems(case: OpenApiCase, response: Response, expect: Expect | None) -> list[str]:
    """Everything wrong with ``response`` to ``case``; empty when it is as documented.

    What was sent is read from the request on the wire, not from the case.
    """
    label = case.operation.label
    problems = []
    try:
        case.validate_response(response, checks=list(sts.CHECKS))
    except FailureGroup as group:
        problems += [f"{failure.title}: {failure.message}" for failure in group.exceptions]
    sent_rid = _sent_header(response, "X-Request-Id")
    problems += sts.wire_problems(response, sent_rid, may_replay=label == CREATE)
    if case.path.startswith("/v1/"):
        if _sent_header(response, "Authorization") != sts.TOKEN_HEADER:
            expect = Expect(401, "unauthorized")
        elif response.status_code == 401:
            problems.append("the configured API token must be accepted")
    try:
        body = json.loads(response.content)
    except ValueError:
        return problems  # already reported by wire_problems
    if expect is not None:
        code = body.get("error", {}).get("code") if response.status_code >= 400 else None
        if response.status_code != expect.status or (expect.code and code != expect.code):
            problems.append(f"must be {expect}, got {response.status_code} {code}")
    if label == CREATE and response.status_code in (200, 201):
        problems += sts.created_problems(_sent_json(response), body)
    return problems


def _send(
    run: Run,
    case: OpenApiCase,
    mode: GenerationMode,
    request: dict[str, Any],
    expect: Expect | None = None,
) -> Response:
    response = Response.from_any(run.session.request(**request, timeout=15))
    run.statuses[(case.operation.label, mode.value, response.status_code)] += 1
    problems = _problems(case, response, expect)
    if problems:
        curl = case.as_curl_command(headers=dict(response.request.headers))
        run.problems.append(
            f"{case.operation.label} [{mode.value}] -> {response.status_code}"
            f" {response.content[:300]!r}\n  "
            + "\n  ".join(problems)
            + f"\n  reproduce: {curl[:1500]}"
        )
    return response


def _exercise(run: Run, case: OpenApiCase, data: st.DataObject, mode: GenerationMode) -> None:
    label = case.operation.label
    forced: dict[str, str | None] = {}
    if case.path.startswith("/v1/"):
        choice = data.draw(st.sampled_from(sts.AUTH_CHOICES), label="auth")
        forced["Authorization"] = sts.auth_header(choice)
    if label == CREATE:
        sts.make_unique(case)
        if mode.is_positive and data.draw(st.booleans(), label="sandbox provider"):
            provider = data.draw(st.sampled_from(sts.SANDBOX_PROVIDERS), label="provider")
            sts.use_sandbox_provider(case, provider)
    elif "withdrawal_id" in case.path_parameters and data.draw(st.booleans(), label="existing"):
        existing = data.draw(st.sampled_from(run.known_ids), label="existing id")
        case.path_parameters["withdrawal_id"] = existing
    expect = None
    if not isinstance(case.body, NotSet) and case.body != b"":
        probe = data.draw(st.sampled_from(PROBES), label="probe")
        if probe == "media":
            forced["Content-Type"] = data.draw(st.sampled_from(WRONG_MEDIA_TYPES), label="type")
            expect = Expect(415, "unsupported_media_type")
        elif probe == "size" and isinstance(case.body, dict):
            case.body["padding"] = "x" * 65536  # an unknown field: only the size is wrong
            expect = Expect(413, "payload_too_large")
    request = request_of(case, run.url, forced)
    response = _send(run, case, mode, request, expect)
    if label == CREATE and response.status_code == 201:
        run.known_ids.append(_sent_json(response)["withdrawal_id"])
        kind = data.draw(st.sampled_from(FOLLOW_UPS), label="follow-up")
        _follow_up(run, case, mode, request, kind)


def _follow_up(
    run: Run, case: OpenApiCase, mode: GenerationMode, request: dict[str, Any], kind: str
) -> None:
    """The created withdrawal asked for again: replay, duplicate or key conflict."""
    headers = requests.structures.CaseInsensitiveDict(request["headers"])
    keyed = "Idempotency-Key" in headers
    if kind == "again":
        expect = Expect(200) if keyed else Expect(409, DUPLICATE)
    elif kind == "other-key":
        headers["Idempotency-Key"] = f"other-{secrets.token_hex(8)}"
        expect = Expect(409, DUPLICATE)
    elif kind == "changed-body" and "json" in request:
        # An unknown field is ignored, but the bytes differ.
        request = {**request, "json": {**request["json"], "unknown_field": secrets.token_hex(4)}}
        expect = Expect(409, CONFLICT if keyed else DUPLICATE)
    else:
        return
    _send(run, case, mode, {**request, "headers": dict(headers)}, expect)


def _property(run: Run, label: str, mode: GenerationMode) -> Callable[[], None]:
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode), data=st.data())
    def check(case: OpenApiCase, data: st.DataObject) -> None:
        _exercise(run, case, data, mode)

    return check


# --- unknown paths and methods ---------------------------------------------------------------

ROUTES = {
    "/v1/withdrawals": {"POST"},
    "/v1/withdrawals/{id}": {"GET"},
    "/v1/withdrawals/{id}/cancel": {"POST"},
    "/healthz": {"GET"},
}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # OPTIONS: test_options_is_method_not_allowed
UNKNOWN_PATHS = (
    "/v1/{seg}",
    "/v1/withdrawals/{id}/{seg}",
    "/v1/withdrawals/{id}/cancel/{seg}",
    "/v2/withdrawals",
    "/v1/Withdrawals",
    # The contract's paths with an empty segment: Litestar would normalise these onto them.
    "/v1/withdrawals/",
    "/v1/withdrawals/{id}/",
    "/v1/withdrawals/{id}/cancel/",
    "//v1/withdrawals",
    "/v1//withdrawals/{id}",
    "/healthz/",
)
SEGMENT = st.text(string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=24).filter(
    lambda s: s not in (".", "..")
)
REQUEST_IDS = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True))


@st.composite
def unrouted_requests(draw: st.DrawFn) -> tuple[str, str, int]:
    wid = draw(SEGMENT)
    if draw(st.booleans()):
        template = draw(st.sampled_from(sorted(ROUTES)))
        method = draw(st.sampled_from([m for m in METHODS if m not in ROUTES[template]]))
        return method, template.replace("{id}", wid), 405
    seg = draw(SEGMENT.filter(lambda s: s not in ("withdrawals", "cancel")))
    path = draw(st.sampled_from(UNKNOWN_PATHS)).replace("{id}", wid).replace("{seg}", seg)
    return draw(st.sampled_from((*METHODS, "OPTIONS"))), path, 404


def _unrouted(run: Run, client: httpx.Client) -> None:
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(
        request=unrouted_requests(),
        auth=st.sampled_from(sts.AUTH_CHOICES),
        rid=st.one_of(REQUEST_IDS, st.text(string.printable.strip(), max_size=140)),
    )
    def check(request: tuple[str, str, int], auth: str, rid: str | None) -> None:
        method, path, status = request
        headers = {"Authorization": sts.TOKEN_HEADER} if auth == "token" else {}
        if rid is not None:
            headers["X-Request-Id"] = rid
        response = Response.from_any(client.request(method, path, headers=headers))
        run.statuses[("unrouted", method, response.status_code)] += 1
        problems = sts.unrouted_problems(response, rid)
        if response.status_code != status:
            problems.append(f"must be {status} (answered before authentication)")
        if problems:
            run.problems.append(
                f"unrouted {method} {path} -> {response.status_code} {response.content[:300]!r}"
                "\n  " + "\n  ".join(problems)
            )

    check()


def _anchors(run: Run, seeds: dict[str, str]) -> None:
    """Read and cancel every seeded status once, so each documented answer is checked on every
    run whatever the generator draws."""
    token = {"Authorization": sts.TOKEN_HEADER}
    for wid in seeds.values():
        case = OPERATIONS[READ].Case(path_parameters={"withdrawal_id": wid}, headers=token)
        _send(run, case, GenerationMode.POSITIVE, request_of(case, run.url), Expect(200))
    for status, wid in seeds.items():
        case = OPERATIONS[CANCEL].Case(path_parameters={"withdrawal_id": wid}, headers=token)
        final = status in ("succeeded", "failed")
        expect = Expect(409, "not_cancellable") if final else Expect(200)
        _send(run, case, GenerationMode.POSITIVE, request_of(case, run.url), expect)


def _fuzz(run: Run) -> None:
    for label in OPERATIONS:
        _property(run, label, GenerationMode.POSITIVE)()
        if label != HEALTH:  # nothing in it to make invalid
            _property(run, label, GenerationMode.NEGATIVE)()
    with httpx.Client(base_url=run.url, timeout=15) as client:
        _unrouted(run, client)


async def _seed(stack: Stack) -> dict[str, str]:
    """A withdrawal in every status, by status."""
    ids = {}
    for status, provider in [
        ("cancelled", "sbx_silent"),
        ("processing", "sbx_silent"),
        ("succeeded", "sbx_ok"),
        ("failed", "sbx_decline"),
    ]:
        wid = new_id()
        response = await stack.client.post(
            "/v1/withdrawals", json=withdrawal_body(wid, [provider]), headers=stack.headers
        )
        assert response.status_code == 201, response.text
        ids[status] = wid
    response = await stack.client.post(
        f"/v1/withdrawals/{ids['cancelled']}/cancel", headers=stack.headers
    )
    assert response.status_code == 200, response.text
    for status, wid in ids.items():
        if status != "processing":
            assert (await stack.wait_final(wid))["status"] == status
    assert (await stack.withdrawal(ids["processing"]))["status"] == "processing"
    return ids


def test_the_document_has_the_operations_under_test() -> None:
    assert sorted(OPERATIONS) == sorted([CREATE, READ, CANCEL, HEALTH])
    assert sorted(sts.DOCUMENT["x-unrouted-responses"]) == ["404", "405"]


@pytest.mark.parametrize("cohort", COHORTS)
async def test_generated_cases_conform(make_stack: StackFactory, cohort: str) -> None:
    stack = await make_stack(flags=COHORTS[cohort])
    seeds = await _seed(stack)
    run = Run(url=stack.url, known_ids=list(seeds.values()))
    started = time.monotonic()
    try:
        await asyncio.to_thread(_anchors, run, seeds)
        await asyncio.to_thread(_fuzz, run)
    finally:
        run.session.close()
    elapsed = time.monotonic() - started
    table = "\n".join(f"  {key}: {count}" for key, count in sorted(run.statuses.items()))
    print(f"\n[{cohort}] {run.cases()} requests in {elapsed:.1f}s\n{table}")
    assert not run.problems, f"{len(run.problems)} problems:\n\n" + "\n\n".join(run.problems)
    # The run reached what it is meant to exercise (each is near-certain at this size).
    seen = {(label, status) for (label, _, status) in run.statuses}
    for label in (CREATE, READ, CANCEL):
        for mode in ("positive", "negative"):
            sent = sum(n for (lb, m, _), n in run.statuses.items() if (lb, m) == (label, mode))
            assert sent, f"no {mode} case for {label}"
    for expected in [(CREATE, 201), (CREATE, 401), (CREATE, 422), (READ, 200), (READ, 404)]:
        assert expected in seen, f"{expected} never answered"
    for expected in [(CANCEL, 200), (CANCEL, 404), (CANCEL, 409), ("unrouted", 404)]:
        assert expected in seen, f"{expected} never answered"
    async with stack.runtime.pool.acquire() as conn:
        routed = {r["cohort"] for r in await conn.fetch("SELECT cohort FROM withdrawals")}
    assert routed == {cohort}


# --- bugs the run found: pinned, strict ------------------------------------------------------


async def _call(stack: Stack, label: str, **kwargs: Any) -> tuple[OpenApiCase, Response]:
    kwargs.setdefault("headers", {"Authorization": sts.TOKEN_HEADER})
    case = OPERATIONS[label].Case(**kwargs)
    request = request_of(case, stack.url)
    raw = await asyncio.to_thread(requests.request, **request, timeout=15)
    return case, Response.from_any(raw)


@pytest.mark.parametrize("where", ["account", "holder"])
async def test_nul_in_destination_is_accepted(make_stack: StackFactory, where: str) -> None:
    stack = await make_stack(flags=COHORTS["legacy"])
    body = withdrawal_body(new_id(), ["sbx_ok"])
    body["destination"][where] = "Jane\x00Doe"
    case, response = await _call(stack, CREATE, body=body, media_type="application/json")
    assert response.status_code == 201, response.content
    assert _problems(case, response, Expect(201)) == []


@pytest.mark.parametrize("label", [READ, CANCEL])
async def test_nul_in_path_id_is_not_found(make_stack: StackFactory, label: str) -> None:
    stack = await make_stack(flags=COHORTS["legacy"])
    case, response = await _call(stack, label, path_parameters={"withdrawal_id": "wd\x00x"})
    assert "wd%00x" in str(response.request.url)
    assert response.status_code == 404, response.content
    assert _problems(case, response, Expect(404, "not_found")) == []


@pytest.mark.parametrize("cohort", COHORTS)
async def test_nul_in_cancel_reason_is_accepted(make_stack: StackFactory, cohort: str) -> None:
    stack = await make_stack(flags=COHORTS[cohort])
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals", json=withdrawal_body(wid, ["sbx_silent"]), headers=stack.headers
    )
    assert created.status_code == 201, created.text
    case, response = await _call(
        stack,
        CANCEL,
        path_parameters={"withdrawal_id": wid},
        body={"reason": "no\x00way"},
        media_type="application/json",
    )
    assert response.status_code == 200, response.content
    assert _problems(case, response, Expect(200)) == []


@pytest.mark.parametrize("template", sorted(ROUTES))
async def test_options_is_method_not_allowed(make_stack: StackFactory, template: str) -> None:
    stack = await make_stack(flags=COHORTS["legacy"])
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        raw = await client.options(template.replace("{id}", "wd_1"), headers=stack.headers)
    response = Response.from_any(raw)
    assert response.status_code == 405, (response.status_code, dict(raw.headers))
    assert sts.unrouted_problems(response, None) == []


async def test_a_path_with_an_empty_segment_executes_nothing(make_stack: StackFactory) -> None:
    """``POST /v1/withdrawals/`` is not the create and ``…/cancel/`` not the cancel: 404 each."""
    stack = await make_stack(flags=COHORTS["legacy"])
    wid = new_id()
    refused = await stack.client.post(
        "/v1/withdrawals/", json=withdrawal_body(wid, ["sbx_silent"]), headers=stack.headers
    )
    assert refused.status_code == 404, refused.text
    assert sts.unrouted_problems(Response.from_any(refused), None) == []
    assert (
        await stack.client.get(f"/v1/withdrawals/{wid}", headers=stack.headers)
    ).status_code == 404

    created = await stack.client.post(
        "/v1/withdrawals", json=withdrawal_body(wid, ["sbx_silent"]), headers=stack.headers
    )
    assert created.status_code == 201, created.text
    for path in (f"/v1/withdrawals/{wid}/cancel/", f"/v1//withdrawals/{wid}/cancel"):
        refused = await stack.client.post(path, headers=stack.headers)
        assert refused.status_code == 404, (path, refused.text)
    read = await stack.client.get(f"/v1/withdrawals/{wid}", headers=stack.headers)
    assert read.json()["status"] == "processing"


async def _raw_exchange(stack_url: str, *requests: bytes) -> bytes:
    url = httpx.URL(stack_url)
    assert url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        for request in requests:
            writer.write(request)
        return await asyncio.wait_for(reader.read(-1), 10)  # until the server closes
    finally:
        writer.close()


def _refusal(raw: bytes) -> tuple[dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 405 Method Not Allowed", raw
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    rid = headers[b"x-request-id"]
    assert body == (
        b'{"error":{"code":"method_not_allowed","message":"Method not allowed.","request_id":"'
        + rid
        + b'"}}'
    )
    return headers, body


async def test_a_method_the_http_parser_does_not_know_is_405(make_stack: StackFactory) -> None:
    """``FOO`` never reaches the app (the HTTP parser refuses it): still the contract's 405,
    its X-Request-Id rule included."""
    stack = await make_stack(flags=COHORTS["legacy"])
    # After a request on the same connection, and with a valid id: echoed.
    raw = await _raw_exchange(
        stack.url,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"FOO /v1/withdrawals HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-1\r\n\r\n",
    )
    first, _, second = raw.partition(b'{"status":"ok"}')
    assert first.startswith(b"HTTP/1.1 200 "), raw
    headers, _ = _refusal(second)
    assert headers[b"x-request-id"] == b"r-1"
    # Alone, with an id the rule refuses: a fresh one.
    raw = await _raw_exchange(
        stack.url, b"FOO /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: bad id!\r\n\r\n"
    )
    headers, _ = _refusal(raw)
    assert re.fullmatch(rb"[0-9a-f]{32}", headers[b"x-request-id"]), headers
