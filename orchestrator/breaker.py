"""The fleet-wide circuit breaker of a provider, as pure data and functions.

One :class:`Breaker` per provider lives in Postgres (``provider_breakers``); every worker keeps
a copy at most a second or two old (:mod:`orchestrator.provider_health`) and writes only
transitions, each a version-checked update, so the whole fleet sees one state:

- ``closed``: attempts go. It opens when its window (the last ``window_seconds``, from the
  moment it last closed at the earliest, so the calls that opened it cannot open it again:
  :func:`orchestrator.store.breakers.load_breakers`) holds at least ``min_calls`` calls of
  which at least ``failure_rate`` failed technically.
- ``open``: no new attempt goes to the provider (they are passed over, or held); attempts in
  flight carry on. After ``open_seconds`` it turns half-open.
- ``half_open``: exactly one attempt in the fleet may probe it at a time, by a lease taken
  with one conditional update. A probe that fails technically opens it again; after
  ``half_open_probes`` probes in a row succeed, it closes.

Only technical failures count (no answer, a timeout, a 5xx, an answer that does not decode):
a business decline is the provider working.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from contracts.providers_file import BreakerPolicy

BreakerState = Literal["closed", "open", "half_open"]
ChangeCause = Literal["tripped", "open_time_up", "probe_failed", "probes_succeeded", "operator"]
"""Why a breaker last changed state: its window tripped it, its open time ran out, its probe
failed or enough probes succeeded, or an operator overrode it."""
CallResult = Literal["ok", "declined", "technical"]
"""How a provider call ended, for health: answered, answered with a business refusal, or not
answered usably (the only one that counts against the provider)."""


@dataclass(frozen=True, kw_only=True)
class Window:
    """The calls a provider got in its breaker's window."""

    ok: int = 0
    technical: int = 0

    @property
    def calls(self) -> int:
        return self.ok + self.technical

    @property
    def failure_rate(self) -> float:
        return self.technical / self.calls if self.calls else 0.0


@dataclass(frozen=True, kw_only=True)
class Breaker:
    """One provider's breaker as the record keeps it."""

    provider_id: str
    state: BreakerState = "closed"
    changed_at: datetime
    open_until: datetime | None = None
    probe_task: uuid.UUID | None = None
    probe_until: datetime | None = None
    probe_successes: int = 0
    # The window when it last changed state: what tripped or closed it.
    failure_rate: float | None = None
    calls: int | None = None
    # Why it last changed state (None: a row written before causes were kept), and for an
    # operator's override, who ("ops:<X-Operator>") and the reason they gave.
    change_cause: ChangeCause | None = None
    changed_by: str | None = None
    change_reason: str | None = None
    version: int = 1


def tripped(window: Window, policy: BreakerPolicy) -> bool:
    return window.calls >= policy.min_calls and window.failure_rate >= policy.failure_rate


def on_window(
    breaker: Breaker, window: Window, policy: BreakerPolicy, now: datetime
) -> Breaker | None:
    """The transition the window or the clock makes, if any: closed → open when tripped,
    open → half-open when its time is up."""
    if breaker.state == "closed" and tripped(window, policy):
        return _moved(breaker, "open", now, window, "tripped", open_until=now + _open_for(policy))
    if breaker.state == "open" and (breaker.open_until is None or now >= breaker.open_until):
        return _moved(breaker, "half_open", now, window, "open_time_up")
    return None


def on_probe(
    breaker: Breaker, task_id: uuid.UUID, technical: bool, policy: BreakerPolicy, now: datetime
) -> Breaker | None:
    """The transition a probe's outcome makes; None when ``task_id`` is not the breaker's
    probe (any more: its lease ran out and another took it, or the breaker moved)."""
    if breaker.state != "half_open" or breaker.probe_task != task_id:
        return None
    if technical:
        return _moved(
            breaker, "open", now, None, "probe_failed", open_until=now + _open_for(policy)
        )
    successes = breaker.probe_successes + 1
    if successes >= policy.half_open_probes:
        return _moved(breaker, "closed", now, None, "probes_succeeded")
    return dataclasses.replace(
        breaker,
        probe_task=None,
        probe_until=None,
        probe_successes=successes,
        version=breaker.version + 1,
    )


def _open_for(policy: BreakerPolicy) -> timedelta:
    return timedelta(seconds=policy.open_seconds)


def _moved(
    breaker: Breaker,
    state: BreakerState,
    now: datetime,
    window: Window | None,
    cause: ChangeCause,
    *,
    open_until: datetime | None = None,
    changed_by: str | None = None,
    change_reason: str | None = None,
) -> Breaker:
    return Breaker(
        provider_id=breaker.provider_id,
        state=state,
        changed_at=now,
        open_until=open_until,
        failure_rate=window.failure_rate if window is not None else breaker.failure_rate,
        calls=window.calls if window is not None else breaker.calls,
        change_cause=cause,
        changed_by=changed_by,
        change_reason=change_reason,
        version=breaker.version + 1,
    )


def forced(
    breaker: Breaker,
    state: Literal["open", "closed"],
    now: datetime,
    window: Window,
    *,
    operator: str,
    reason: str,
    open_seconds: float | None = None,
) -> Breaker:
    """An operator's override (``POST /ops/providers/{id}/breaker``): open for
    ``open_seconds`` (then half-open with its one probe, as after a trip), or closed with its
    window restarting now. Any probe lease is dropped: a probe's outcome no longer decides.
    The breaker keeps who made it and why until its next transition."""
    open_until = now + timedelta(seconds=open_seconds or 0.0) if state == "open" else None
    return _moved(
        breaker,
        state,
        now,
        window,
        "operator",
        open_until=open_until,
        changed_by=operator,
        change_reason=reason,
    )
