"""Ops API for provider health (operators; bearer tokens from ``OPS_API_TOKENS``).

- ``GET /ops/providers`` — every configured provider: its fleet-wide breaker (state, the
  window the workers judge it by, the last transition, open until, the half-open probe), its
  attempts in flight, the withdrawals waiting to start at it, its limits and breaker policy.
- ``GET /ops/providers/{id}`` — one of them.
- ``POST /ops/providers/{id}/breaker`` ``{"action": "open", "seconds": 600, "reason": "…"}``
  or ``{"action": "close", "reason": "…"}`` — an operator's override: drain a provider for a
  known maintenance (open: new attempts pass it over, then the usual half-open probe), or
  bring it back after a fix (closed, its window restarting now). With ``X-Operator`` (422
  without it), logged with the operator and the reason. A version-checked write of the
  breaker row, as the workers' transitions; every worker sees it at its next refresh (≤ 1 s).
  Attempts already in flight are never touched.

The breaker's window is computed as the workers compute it
(:func:`orchestrator.store.breakers.load_breakers`): the last ``window_seconds``, from when it
last closed at the earliest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, get_args

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath

from contracts.providers_file import ProviderConfig
from gateway.api import runtime_of
from gateway.ops import _OPS_ERRORS, _denied, _error, _operator
from gateway.ops_wire import Timestamp
from gateway.protocol import json_response, read_body
from gateway.service import Unavailable
from orchestrator import store
from orchestrator.breaker import Breaker, ChangeCause, Window, forced
from orchestrator.store import Connection
from orchestrator.store import breakers as health_store

AnyRequest = Request[Any, Any, Any]
log = logging.getLogger("cascade.health")

MAX_OPEN_SECONDS = 7 * 86_400
MAX_REASON = 500
STATES = ("closed", "open", "half_open", "disabled")
CAUSES: tuple[str, ...] = get_args(ChangeCause)


class BreakerPolicyView(msgspec.Struct, frozen=True, kw_only=True):
    """The providers file's ``breaker`` settings of the provider."""

    failure_rate: float
    min_calls: int
    window_seconds: float
    open_seconds: float
    half_open_probes: int


class RateLimitView(msgspec.Struct, frozen=True, kw_only=True):
    per_second: Annotated[float, msgspec.Meta(description="New orders per second, fleet-wide.")]
    burst: int


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    rate_limit: RateLimitView | None
    max_in_flight: Annotated[
        int | None, msgspec.Meta(description="Attempts in CREATING or RECHECKING at once.")
    ]
    hold_seconds: Annotated[
        float,
        msgspec.Meta(
            description="How long a withdrawal whose every remaining provider is open waits"
            " before its next attempt is made anyway."
        ),
    ]


class WindowView(msgspec.Struct, frozen=True, kw_only=True):
    """The calls the breaker is judged by now, as the workers count them."""

    seconds: float
    since: Annotated[
        Timestamp,
        msgspec.Meta(description="window_seconds back, or when it last closed if later."),
    ]
    calls: int
    technical: Annotated[int, msgspec.Meta(description="Calls that failed technically.")]
    failure_rate: Annotated[float, msgspec.Meta(description="technical / calls (0 without).")]


class TransitionView(msgspec.Struct, frozen=True, kw_only=True):
    """The breaker's last change of state, with the window that made it."""

    changed_at: Timestamp
    failure_rate: float | None
    calls: int | None
    cause: Annotated[
        str | None,
        msgspec.Meta(
            description="tripped (its window), open_time_up, probe_failed, probes_succeeded,"
            " or operator (an override); null for a change recorded before causes were kept.",
            extra_json_schema={"enum": [*CAUSES, None]},
        ),
    ]
    operator: Annotated[
        str | None, msgspec.Meta(description="An override's operator (ops:<X-Operator>).")
    ]
    reason: Annotated[str | None, msgspec.Meta(description="An override's reason.")]


class ProbeView(msgspec.Struct, frozen=True, kw_only=True):
    """A half-open breaker's probe: the one attempt of the fleet allowed to try it."""

    task_id: Annotated[str | None, msgspec.Meta(description="null: no probe running now.")]
    until: Timestamp | None
    successes: Annotated[int, msgspec.Meta(description="Probes in a row that succeeded.")]


class ProviderHealthView(msgspec.Struct, frozen=True, kw_only=True):
    provider_id: str
    state: Annotated[
        str,
        msgspec.Meta(
            description="The fleet-wide breaker: closed, open, half_open, or disabled (the"
            " providers file sets breaker to null).",
            extra_json_schema={"enum": list(STATES)},
        ),
    ]
    window: WindowView | None
    last_transition: TransitionView | None
    open_until: Annotated[
        Timestamp | None, msgspec.Meta(description="Open: when one probe may go.")
    ]
    probe: ProbeView | None
    in_flight: Annotated[int, msgspec.Meta(description="Attempts in CREATING or RECHECKING.")]
    waiting: Annotated[
        int,
        msgspec.Meta(
            description="Withdrawals whose next attempt, at this provider, waits on a hold"
            " timer (the breakers held it, or a rate or in-flight limit made it wait)."
        ),
    ]
    limits: Limits
    breaker: Annotated[
        BreakerPolicyView | None, msgspec.Meta(description="null: no breaker (disabled).")
    ]


class Providers(msgspec.Struct, frozen=True, kw_only=True):
    providers: list[ProviderHealthView]


class BreakerOverrideBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``open`` needs ``seconds`` (up to 7 days); ``close`` takes none."""

    action: Literal["open", "close"]
    reason: Annotated[
        str, msgspec.Meta(description="Why; logged with the operator (up to 500 characters).")
    ]
    seconds: Annotated[
        float | None, msgspec.Meta(description="open: how long before the half-open probe.")
    ] = None


def _view(
    provider_id: str,
    config: ProviderConfig,
    read: tuple[Breaker, Window] | None,
    work: tuple[int, int],
    now: datetime,
) -> ProviderHealthView:
    policy = config.breaker
    breaker, window = read if read is not None else (None, Window())
    state = "disabled" if policy is None else breaker.state if breaker else "closed"
    window_view = None
    if policy is not None:
        since = now - timedelta(seconds=policy.window_seconds)
        if breaker is not None and breaker.state == "closed":
            since = max(since, breaker.changed_at)
        window_view = WindowView(
            seconds=policy.window_seconds,
            since=since.isoformat(),
            calls=window.calls,
            technical=window.technical,
            failure_rate=window.failure_rate,
        )
    rate = config.rate_limit
    return ProviderHealthView(
        provider_id=provider_id,
        state=state,
        window=window_view,
        last_transition=None if breaker is None else _transition(breaker),
        open_until=_time(breaker.open_until) if breaker and state == "open" else None,
        probe=_probe(breaker) if breaker and state == "half_open" else None,
        in_flight=work[0],
        waiting=work[1],
        limits=Limits(
            rate_limit=None
            if rate is None
            else RateLimitView(per_second=rate.per_second, burst=rate.burst),
            max_in_flight=config.max_in_flight,
            hold_seconds=config.hold_seconds,
        ),
        breaker=None
        if policy is None
        else msgspec.convert(policy, BreakerPolicyView, from_attributes=True),
    )


def _transition(breaker: Breaker) -> TransitionView:
    return TransitionView(
        changed_at=breaker.changed_at.isoformat(),
        failure_rate=breaker.failure_rate,
        calls=breaker.calls,
        cause=breaker.change_cause,
        operator=breaker.changed_by,
        reason=breaker.change_reason,
    )


def _probe(breaker: Breaker) -> ProbeView:
    return ProbeView(
        task_id=None if breaker.probe_task is None else str(breaker.probe_task),
        until=_time(breaker.probe_until),
        successes=breaker.probe_successes,
    )


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


async def _views(
    conn: Connection, configs: Mapping[str, ProviderConfig], now: datetime
) -> list[ProviderHealthView]:
    """The providers given, as the workers see them now (one read each for the breakers and
    the work; a provider whose breaker row the workers have not written yet is closed)."""
    windows = [
        (p, now - timedelta(seconds=c.breaker.window_seconds))
        for p, c in configs.items()
        if c.breaker is not None
    ]
    reads = {b.provider_id: (b, w) for b, w in await health_store.load_breakers(conn, windows)}
    work = await health_store.waiting_work(conn, list(configs))
    return [_view(p, c, reads.get(p), work.get(p, (0, 0)), now) for p, c in sorted(configs.items())]


def _configs(request: AnyRequest) -> Mapping[str, ProviderConfig]:
    return runtime_of(request).engine.configs


@get("/ops/providers", exception_handlers=_OPS_ERRORS)
async def list_providers(request: AnyRequest) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    try:
        async with runtime_of(request).pool.acquire() as conn:
            views = await _views(conn, _configs(request), datetime.now(UTC))
    except store.DATABASE_UNAVAILABLE as exc:
        raise Unavailable from exc
    return json_response(msgspec.json.encode(Providers(providers=views)))


@get("/ops/providers/{provider_id:str}", exception_handlers=_OPS_ERRORS)
async def show_provider(request: AnyRequest, provider_id: FromPath[str]) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    config = _configs(request).get(provider_id)
    if config is None:
        return _unknown(provider_id)
    try:
        async with runtime_of(request).pool.acquire() as conn:
            (view,) = await _views(conn, {provider_id: config}, datetime.now(UTC))
    except store.DATABASE_UNAVAILABLE as exc:
        raise Unavailable from exc
    return json_response(msgspec.json.encode(view))


def _unknown(provider_id: str) -> Response[bytes]:
    shown = provider_id[:64].encode("unicode_escape").decode()
    return _error(404, "not_found", f"No provider {shown!r} in the providers file.")


class _BadOverride(ValueError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _override_body(raw: bytes) -> BreakerOverrideBody:
    """The body, checked beyond its type: an open's seconds, a reason."""
    try:
        body = msgspec.json.decode(raw, type=BreakerOverrideBody)
    except msgspec.ValidationError as exc:
        raise _BadOverride(422, "validation_failed", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise _BadOverride(400, "malformed_json", "Request body is not valid JSON.") from exc
    if not body.reason.strip():
        raise _BadOverride(422, "validation_failed", "reason must not be empty")
    if "\x00" in body.reason:  # kept in a text column, which cannot hold NUL
        raise _BadOverride(422, "validation_failed", "reason must not contain a NUL character")
    if len(body.reason) > MAX_REASON:
        raise _BadOverride(
            422, "validation_failed", f"reason must be at most {MAX_REASON} characters"
        )
    if body.action == "close" and body.seconds is not None:
        raise _BadOverride(422, "validation_failed", "seconds applies to open only, not to close")
    if body.action == "open" and (body.seconds is None or not 0 < body.seconds <= MAX_OPEN_SECONDS):
        raise _BadOverride(
            422,
            "validation_failed",
            f"open needs seconds, greater than 0 and at most {MAX_OPEN_SECONDS} (7 days),"
            f" not {body.seconds!r}",
        )
    return body


@post("/ops/providers/{provider_id:str}/breaker", status_code=200, exception_handlers=_OPS_ERRORS)
async def override_breaker(request: AnyRequest, provider_id: FromPath[str]) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    config = _configs(request).get(provider_id)
    if config is None:
        return _unknown(provider_id)
    try:
        body = _override_body(await read_body(request))
    except _BadOverride as exc:
        return _error(exc.status, exc.code, str(exc))
    if config.breaker is None:
        return _error(
            409,
            "no_breaker",
            f"{provider_id} has no breaker (breaker is null in the providers file); nothing"
            " changed.",
        )
    operator = _operator(request)
    if operator is None:
        return _error(
            422,
            "validation_failed",
            "X-Operator header is required: name who acts (it is logged with the override)",
        )
    try:
        view = await _override(request, provider_id, config, body, "ops:" + operator)
    except store.DATABASE_UNAVAILABLE as exc:
        raise Unavailable from exc
    return json_response(msgspec.json.encode(view))


async def _override(
    request: AnyRequest,
    provider_id: str,
    config: ProviderConfig,
    body: BreakerOverrideBody,
    actor: str,
) -> ProviderHealthView:
    """Move the breaker as the operator says, under its row lock: a worker's transition
    racing it waits, then finds the version moved and keeps the operator's."""
    policy = config.breaker
    assert policy is not None
    now = datetime.now(UTC)
    async with runtime_of(request).pool.acquire() as conn:
        async with conn.transaction():
            await health_store.ensure_breakers(conn, [provider_id], now)
            before = await health_store.breaker_for_update(conn, provider_id)
            assert before is not None  # ensured just above, in this transaction
            since = now - timedelta(seconds=policy.window_seconds)
            ((_, window),) = await health_store.load_breakers(conn, [(provider_id, since)])
            state: Literal["open", "closed"] = "open" if body.action == "open" else "closed"
            after = forced(
                before,
                state,
                now,
                window,
                operator=actor,
                reason=body.reason,
                open_seconds=body.seconds,
            )
            saved = await health_store.save_breaker(conn, before, after)
            assert saved  # the row is locked: no other writer between the read and the write
            # Withdrawals held for the provider wait until when it was expected back; now it
            # may be sooner.
            moved = await health_store.bring_holds_forward(
                conn, provider_id, after.open_until or now
            )
        log.warning(
            "provider breaker overridden by an operator",
            extra={
                "provider_id": provider_id,
                "from": before.state,
                "to": after.state,
                "open_until": _time(after.open_until),
                "operator": actor,
                "reason": body.reason,
                "failure_rate": window.failure_rate,
                "calls": window.calls,
                "holds_brought_forward": moved,
            },
        )
        (view,) = await _views(conn, {provider_id: config}, now)
    return view
