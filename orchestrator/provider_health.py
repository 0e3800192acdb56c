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
from orchestrator.store import Connection, Pool
from orchestrator.store import breakers as store

log = logging.getLogger("cascade.health")

REFRESH_SECONDS = 1.0
"""How old a worker's copy of the breakers may get (the issue allows 2 s)."""
IN_FLIGHT_RETRY_MIN = 1.0
IN_FLIGHT_RETRY_MAX = 15.0
"""How soon an attempt waiting for an in-flight slot asks again, in seconds: a quarter of how
long it has waited, within these bounds (a slot frees when another attempt's order is proven,
at no time known in advance)."""
HALF_OPEN_RETRY = timedelta(seconds=5)
"""How soon a withdrawal passed over by a half-open breaker (whose probe another attempt
holds) may find it closed."""
RATE_HORIZON_SECONDS = 1.0
"""A rate-limited start due within this long is admitted and paced in-process (the broker's
timers have one-second resolution); a later one waits on its hold timer."""
PROBE_MARGIN = timedelta(seconds=10)
"""Added to a provider's connect and read timeouts and the rate pause for its probe lease:
room for the freeze at cascade-core before the create; after the lease another attempt may
probe."""
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
        # Whether a refresh loop runs here (a worker): only then are calls counted.
        self._flushing = False
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
        if not self._flushing:
            return  # a process without the refresh loop (the gateway's) counts nothing
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
        waiting_since: datetime,
        breaker: bool = True,
    ) -> Gate:
        """Whether ``task``'s attempt may start now (see :class:`~orchestrator.domain.Gate`);
        ``waiting_since``: when its withdrawal began waiting for it; ``breaker=False``: the
        hold is over, the breaker no longer stops it.

        A gate that passes the attempt over takes nothing (no lock, no slot), so the walk
        over a cascade holds locks at most at the provider where it stops: two withdrawals
        walking their providers in opposite orders cannot deadlock."""
        probe = False
        if breaker and config.breaker is not None:
            passed, probe = await self._breaker_gate(uow, task, config, now)
            if passed is not None:
                m.provider_passed_over.labels(provider=task.provider_id).inc()
                return passed
        return await self._limits_gate(uow, task, config, now, waiting_since, probe=probe)

    async def _breaker_gate(
        self, uow: UnitOfWork, task: OrderTask, config: ProviderConfig, now: datetime
    ) -> tuple[Gate | None, bool]:
        """A pass-over when the breaker stops the attempt, else None and whether the attempt
        is the half-open breaker's probe (it holds the fleet's one probe lease now)."""
        state = self._breakers.get(task.provider_id)
        if state is None or state.state == "closed":
            return None, False
        # Held withdrawals are spread over a second, and never asked again before this
        # worker can have read the breaker's next state.
        spread = timedelta(milliseconds=task.task_id.int % 1000)
        soon = now + timedelta(seconds=REFRESH_SECONDS) + spread
        if state.state == "open":
            retry_at = max(state.open_until or now, soon)
            return Gate(verdict="pass_over", reason="breaker_open", retry_at=retry_at), False
        busy = Gate(verdict="pass_over", reason="breaker_half_open", retry_at=now + HALF_OPEN_RETRY)
        # A probe only where it could go at once: a provider with every in-flight slot taken
        # (rechecks of the outage's victims) is passed over, not waited for.
        limit = config.max_in_flight
        if limit is not None and await uow.in_flight(task.provider_id, lock=False) >= limit:
            return busy, False
        until = now + _probe_lease(config)
        if not await uow.take_probe(task.provider_id, task.task_id, now, until):
            return busy, False
        self._probes[task.task_id] = (None, until)
        return None, True

    async def _limits_gate(
        self,
        uow: UnitOfWork,
        task: OrderTask,
        config: ProviderConfig,
        now: datetime,
        waiting_since: datetime,
        *,
        probe: bool,
    ) -> Gate:
        """The provider's fleet-wide limits: admitted, or a wait (never a pass-over)."""
        provider_id = task.provider_id
        limit = config.max_in_flight
        if limit is not None and await uow.in_flight(provider_id) >= limit:
            m.provider_limit_waits.labels(provider=provider_id, kind="in_flight").inc()
            # No telling when a slot frees: ask again soon at first, then less often.
            waited = (now - waiting_since).total_seconds()
            pause = min(max(waited / 4, IN_FLIGHT_RETRY_MIN), IN_FLIGHT_RETRY_MAX)
            retry_at = now + timedelta(seconds=pause)
            return Gate(verdict="wait", reason="in_flight", retry_at=retry_at)
        not_before = None
        rate = config.rate_limit
        if rate is not None:
            wait = await uow.take_rate(
                provider_id, rate.per_second, rate.burst, now, RATE_HORIZON_SECONDS
            )
            if wait > RATE_HORIZON_SECONDS:
                m.provider_limit_waits.labels(provider=provider_id, kind="rate").inc()
                retry_at = now + timedelta(seconds=wait - RATE_HORIZON_SECONDS)
                return Gate(verdict="wait", reason="rate_limit", retry_at=retry_at)
            if wait > 0:
                m.provider_limit_waits.labels(provider=provider_id, kind="rate").inc()
                not_before = now + timedelta(seconds=wait)
        reason = "probe" if probe else ""
        return Gate(verdict="admit", reason=reason, probe=probe, not_before=not_before)

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
                await self._add_calls(conn, calls)
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

    async def _add_calls(
        self, conn: Connection, calls: dict[tuple[str, datetime], list[int]]
    ) -> None:
        """Add counted calls to the fleet's window; kept for the next refresh if that fails.
        In key order, so that two workers' upserts lock the rows in the same order."""
        rows = [(p, second, ok, bad) for (p, second), (ok, bad) in sorted(calls.items())]
        try:
            await store.add_calls(conn, rows)
        except BaseException:
            for key, (ok, bad) in calls.items():
                counts = self._calls.setdefault(key, [0, 0])
                counts[0] += ok
                counts[1] += bad
            raise

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
        self._flushing = True
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
    return timedelta(seconds=seconds + RATE_HORIZON_SECONDS) + PROBE_MARGIN


def _log_transition(before: Breaker, after: Breaker) -> None:
    extra = {
        "provider_id": after.provider_id,
        "from": before.state,
        "to": after.state,
        "cause": after.change_cause,
        "failure_rate": after.failure_rate,
        "calls": after.calls,
    }
    level = logging.WARNING if after.state == "open" else logging.INFO
    log.log(level, "provider breaker changed state", extra=extra)
