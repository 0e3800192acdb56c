"""Provider health as the engine uses it: the breakers' cached copy, the calls it counts,
and the gate every new attempt passes before it starts.

Each worker refreshes its copy of the breakers (:mod:`orchestrator.breaker`) every
:data:`REFRESH_SECONDS` (:meth:`ProviderHealth.refresh`, a worker loop): it adds the calls it
counted since the last refresh to the fleet's window table, reads every breaker with its
window, and writes the transitions that are due (a version-checked update: one worker wins).
A probe's outcome wakes the loop at once.

:meth:`ProviderHealth.gate` runs inside the transaction that starts an attempt: the breaker
from the copy (no I/O), then the fleet-wide limits from Postgres (in-flight count under a
provider lock, a GCRA rate token), then, for a half-open breaker, the one probe lease. A start
that rolls back gives back what it took. Attempts in flight are never gated: their polls,
cancels and webhooks carry on whatever the breaker says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta

from contracts.providers_file import ProviderConfig
from orchestrator import metrics as m
from orchestrator.breaker import Breaker, CallResult, on_probe, on_window
from orchestrator.domain import Gate, OrderTask
from orchestrator.ports import Clock, UnitOfWork
from orchestrator.store import Pool
from orchestrator.store import breakers as store

log = logging.getLogger("cascade.health")

REFRESH_SECONDS = 1.0
"""How old a worker's copy of the breakers may get (the issue allows 2 s)."""
IN_FLIGHT_RETRY = timedelta(seconds=1)
"""How soon an attempt waiting for an in-flight slot asks again (a slot frees when another
attempt's order is proven, at no time known in advance)."""
HALF_OPEN_RETRY = timedelta(seconds=5)
"""How soon a withdrawal passed over by a half-open breaker (whose probe another attempt
holds) may find it closed."""
RATE_HORIZON_SECONDS = 1.0
"""A rate-limited start due within this long is admitted and paced in-process (the broker's
timers have one-second resolution); a later one waits on its hold timer."""
PROBE_MARGIN = timedelta(seconds=5)
"""Added to a provider's connect and read timeouts for its probe lease: the longest a probe's
create can take, after which another attempt may probe."""
_PRUNE_EVERY = 60
_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class ProviderHealth:
    """One process's view of provider health (see the module docstring)."""

    def __init__(self, configs: Mapping[str, ProviderConfig], clock: Clock) -> None:
        self.configs = configs
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}
        # (provider, second) → [ok, technical], counted since the last refresh.
        self._calls: dict[tuple[str, datetime], list[int]] = {}
        # Probe leases this process took: task → (technical outcome once known, lease end).
        self._probes: dict[uuid.UUID, tuple[bool | None, datetime]] = {}
        self._refreshes = 0
        self.wake = asyncio.Event()

    def breaker(self, provider_id: str) -> Breaker | None:
        """The provider's breaker as last read (None: not read yet, or no breaker)."""
        return self._breakers.get(provider_id)

    def seen(self, breaker: Breaker) -> None:
        """Take ``breaker`` as the provider's current state (as a refresh read it)."""
        self._breakers[breaker.provider_id] = breaker
        m.provider_breaker_state.labels(provider=breaker.provider_id).set(
            _STATE_VALUE[breaker.state]
        )

    def closed(self, provider_id: str) -> bool:
        """Whether the provider's breaker lets attempts go (closed, none, or not read yet)."""
        breaker = self._breakers.get(provider_id)
        return breaker is None or breaker.state == "closed"

    def unguarded(self, provider_id: str) -> bool:
        """Whether starting an attempt at the provider needs no gate: no limit configured and
        its breaker closed (the start may then take the engine's one-statement path)."""
        config = self.configs.get(provider_id)
        if config is None or config.rate_limit is not None or config.max_in_flight is not None:
            return False
        return config.breaker is None or self.closed(provider_id)

    def observe(self, provider_id: str, task_id: uuid.UUID, result: CallResult) -> None:
        """Count one call's result towards the provider's window (and a probe's outcome)."""
        m.provider_attempts.labels(provider=provider_id, result=result).inc()
        second = self.clock().replace(microsecond=0)
        counts = self._calls.setdefault((provider_id, second), [0, 0])
        counts[1 if result == "technical" else 0] += 1
        probe = self._probes.get(task_id)
        if probe is not None and probe[0] is None:
            self._probes[task_id] = (result == "technical", probe[1])
            self.wake.set()

    async def gate(
        self,
        uow: UnitOfWork,
        task: OrderTask,
        config: ProviderConfig,
        now: datetime,
        *,
        breaker: bool = True,
    ) -> Gate:
        """Whether ``task``'s attempt may start now (see :class:`~orchestrator.domain.Gate`);
        ``breaker=False``: the hold is over, the breaker no longer stops it."""
        provider_id = task.provider_id
        probe = False
        if breaker and config.breaker is not None:
            state = self._breakers.get(provider_id)
            if state is not None and state.state == "open":
                m.provider_passed_over.labels(provider=provider_id).inc()
                return Gate(verdict="pass_over", reason="breaker_open", retry_at=state.open_until)
            probe = state is not None and state.state == "half_open"
        limit = config.max_in_flight
        if limit is not None and await uow.in_flight(provider_id) >= limit:
            m.provider_limit_waits.labels(provider=provider_id, kind="in_flight").inc()
            return Gate(verdict="wait", reason="in_flight", retry_at=now + IN_FLIGHT_RETRY)
        not_before = None
        rate = config.rate_limit
        if rate is not None:
            wait = await uow.take_rate(
                provider_id, rate.per_second, rate.burst, now, RATE_HORIZON_SECONDS
            )
            if wait > 0:
                m.provider_limit_waits.labels(provider=provider_id, kind="rate").inc()
                if wait > RATE_HORIZON_SECONDS:
                    retry_at = now + timedelta(seconds=wait - RATE_HORIZON_SECONDS)
                    return Gate(verdict="wait", reason="rate_limit", retry_at=retry_at)
                not_before = now + timedelta(seconds=wait)
        if probe:
            until = now + _probe_lease(config)
            if not await uow.take_probe(provider_id, task.task_id, now, until):
                m.provider_passed_over.labels(provider=provider_id).inc()
                return Gate(
                    verdict="pass_over", reason="breaker_half_open", retry_at=now + HALF_OPEN_RETRY
                )
            self._probes[task.task_id] = (None, until)
            return Gate(verdict="admit", reason="probe", probe=True, not_before=not_before)
        return Gate(verdict="admit", not_before=not_before)

    async def refresh(self, pool: Pool) -> None:
        """Add the counted calls, read the breakers, write the transitions due."""
        guarded = {p: c.breaker for p, c in self.configs.items() if c.breaker is not None}
        now = self.clock()
        self.wake.clear()
        calls, self._calls = self._calls, {}
        async with pool.acquire() as conn:
            if self._refreshes % _PRUNE_EVERY == 0:
                await store.ensure_breakers(conn, list(self.configs), now)
                longest = max((b.window_seconds for b in guarded.values()), default=60.0)
                await store.prune_calls(conn, now - timedelta(seconds=2 * longest))
            self._refreshes += 1
            if calls:
                rows = [(p, second, ok, bad) for (p, second), (ok, bad) in calls.items()]
                await store.add_calls(conn, rows)
            windows = [(p, now - timedelta(seconds=b.window_seconds)) for p, b in guarded.items()]
            for read, window in await store.load_breakers(conn, windows):
                policy = guarded[read.provider_id]
                after = self._probe_outcome(read, now) or on_window(read, window, policy, now)
                if after is not None and await store.save_breaker(conn, read, after):
                    _log_transition(read, after)
                    self.seen(after)
                else:
                    self.seen(read)
        self._forget_probes(now)

    def _probe_outcome(self, breaker: Breaker, now: datetime) -> Breaker | None:
        """The transition this process's probe of ``breaker`` makes, once its outcome is in."""
        if breaker.probe_task is None:
            return None
        probe = self._probes.get(breaker.probe_task)
        if probe is None or probe[0] is None:
            return None
        del self._probes[breaker.probe_task]
        config = self.configs[breaker.provider_id]
        assert config.breaker is not None
        return on_probe(breaker, breaker.probe_task, probe[0], config.breaker, now)

    def _forget_probes(self, now: datetime) -> None:
        """Drop leases past their end: their outcome no longer decides anything (another
        attempt may probe), e.g. a probe whose freeze failed before any provider call."""
        for task_id, (_, until) in list(self._probes.items()):
            if until < now:
                del self._probes[task_id]

    async def run(self, pool: Pool) -> None:
        """Refresh every :data:`REFRESH_SECONDS`, or at once when a probe's outcome is in."""
        while True:
            try:
                await self.refresh(pool)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("provider health refresh failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), REFRESH_SECONDS)


def _probe_lease(config: ProviderConfig) -> timedelta:
    seconds = config.timeouts.connect_seconds + config.timeouts.read_seconds
    return timedelta(seconds=seconds) + PROBE_MARGIN


def _log_transition(before: Breaker, after: Breaker) -> None:
    extra = {
        "provider_id": after.provider_id,
        "from": before.state,
        "to": after.state,
        "failure_rate": after.failure_rate,
        "calls": after.calls,
    }
    level = logging.WARNING if after.state == "open" else logging.INFO
    log.log(level, "provider breaker changed state", extra=extra)
