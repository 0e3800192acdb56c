"""Reconciliation: compares our record with cascade-core's ledger and raises alerts.

One run, under a fleet-wide Postgres advisory lock (one runner at a time), applies the rules:

1. ``stale_freeze`` — a freeze open longer than its provider's recheck backoff + webhook SLA
   + status-polling deadline (:func:`freeze_deadline`) + ``stale_margin``: ``critical``; in
   the band of ``stale_margin`` before that, ``warning``. An attempt in MANUAL_CHECK (a
   human deciding) stays a ``warning`` however old.
2. ``double_success`` — two attempts of one withdrawal SUCCEEDED (checked for the
   withdrawals of the newest 20,000 successes since the previous run); ``success_after_final`` —
   a verified success webhook for an attempt that had ended without success.
3. ``ledger_parity`` — an attempt's freeze as we recorded it (committed, rolled back) against
   cascade-core's ``GET /v1/balances/operations/{id}``, for up to ``ledger_budget`` attempts
   per run: those settled since the previous run first, then a random sample of the window.
4. ``provider_parity`` — our state of an attempt against its provider's status endpoint, for
   attempts the provider accepted that became final since the previous run and attempts
   waiting (EXECUTING, MANUAL_CHECK) past their webhook SLA: at most ``provider_budget``
   status calls per provider per run, one at a time, half of them for the waiting ones
   (:func:`plan_provider_checks`).
5. ``notification`` — a final withdrawal whose notification cascade-core has not acknowledged
   after ``notify_after`` seconds.
6. ``return`` — a provider reporting a paid order returned: every attempt that became
   RETURNED within the window (the engine records the return from the provider's verified
   webhook), with its audit row as evidence; and a SUCCEEDED attempt whose status poll
   (rule 4) answers ``returned`` (its webhook is late or lost), from the poll's answer. One
   alert per attempt (``return:<task_id>``): the poll's alert is the one the recorded
   return updates later. Cascade-core has no reversal, so finance settles each one by hand.

Each finding is a fingerprinted alert (:class:`orchestrator.store.recon.Finding`): the same
finding seen again updates its alert. At most ``max_new_alerts`` new alerts per run, the
critical ones first; the rest raise one ``alert_cap`` meta-alert naming how many were held
back. A rule whose query returns as many rows as it may read says so (``capped`` in the
run's report, a warning in the log, ``recon_rows_capped_total{rule}``): its findings that
run are partial.

Money safety: a run reads the engine's tables, cascade-core's read-only operation endpoint and
the providers' status endpoints (GET), and writes only the alert tables. It never changes a
withdrawal, a task or a balance: a return seen only by its poll raises the alert and leaves
the state change to the engine's verified webhook.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from contracts.providers_file import ProviderConfig
from orchestrator import metrics as m
from orchestrator.core_client import CoreRefused, CoreUnavailable, FreezeState
from orchestrator.domain import Ambiguous, recheck_delay
from orchestrator.provider_client import ProviderAdapter
from orchestrator.store import Connection, Pool
from orchestrator.store import recon as store
from orchestrator.store.recon import Finding

log = logging.getLogger("cascade.recon")

RULES = (
    "stale_freeze",
    "double_success",
    "success_after_final",
    "ledger_parity",
    "provider_parity",
    "notification",
    "return",
    "alert_cap",
)
ALERT_STATES = ("open", "acknowledged", "resolved", "accepted")
# The alert lifecycle as data: state → action → next state. Resolved and accepted are final.
ALERT_TRANSITIONS: dict[str, dict[str, str]] = {
    "open": {"ack": "acknowledged", "resolve": "resolved", "accept": "accepted"},
    "acknowledged": {"resolve": "resolved", "accept": "accepted"},
    "resolved": {},
    "accepted": {},
}
# How many rows one rule reads per run at most: the job stays bounded whatever the backlog.
_ROWS_PER_RULE = 5000
# How many successes since the previous run the double-success rule looks at (about 65 per
# second over a 300 s interval): a run after a long outage checks the newest that many.
_SUCCESSES_PER_RUN = 20_000


class IllegalAlertTransition(Exception):
    """An action the alert's state does not allow (an operator's 409)."""

    def __init__(self, state: str, action: str) -> None:
        allowed = ", ".join(ALERT_TRANSITIONS[state]) or "nothing"
        super().__init__(f"an alert in state {state} cannot take {action} (allowed: {allowed})")
        self.state = state
        self.action = action


def next_state(state: str, action: str) -> str:
    """The state ``action`` moves an alert in ``state`` to; raises IllegalAlertTransition."""
    target = ALERT_TRANSITIONS[state].get(action)
    if target is None:
        raise IllegalAlertTransition(state, action)
    return target


class LedgerReader(Protocol):
    async def operation(self, operation_id: str) -> FreezeState | None: ...


@dataclass(frozen=True, kw_only=True)
class ReconPolicy:
    """The job's knobs (see the README's configuration table)."""

    interval: float = 300.0
    window: float = 86400.0
    stale_margin: float = 600.0
    notify_after: float = 600.0
    ledger_budget: int = 500
    provider_budget: int = 20
    max_new_alerts: int = 200


@dataclass
class RunReport:
    """What one run did: alerts raised, re-detections, skipped checks; ``ran`` is False when
    another runner held the lock."""

    ran: bool
    seconds: float = 0.0
    new_alerts: list[int] = field(default_factory=list)
    detections: int = 0
    per_rule: dict[str, int] = field(default_factory=dict)
    held_back: int = 0
    ledger_checked: int = 0
    ledger_unreachable: int = 0
    provider_checked: int = 0
    provider_unreachable: int = 0
    # The rules whose query hit its row cap: their findings this run are partial.
    capped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "seconds": round(self.seconds, 3),
            "new_alerts": len(self.new_alerts),
            "detections": self.detections,
            "per_rule": self.per_rule,
            "held_back": self.held_back,
            "ledger_checked": self.ledger_checked,
            "ledger_unreachable": self.ledger_unreachable,
            "provider_checked": self.provider_checked,
            "provider_unreachable": self.provider_unreachable,
            "capped": self.capped,
        }


# The wait granted an accepted order of a provider with neither webhook SLA nor status
# polling (or one not in the providers file): the providers file's default SLA. Such an
# attempt waits in MANUAL_CHECK, so only a freeze stuck before it gets this far.
DEFAULT_WAIT_SECONDS = 900.0


def freeze_deadline(config: ProviderConfig | None) -> float:
    """Seconds a freeze may stay open on this provider before it is late: every recheck's
    backoff delay up to ``recheck.max_attempts`` (an ambiguous create), then the webhook SLA
    plus the status-polling deadline, or :data:`DEFAULT_WAIT_SECONDS` when the provider has
    neither (or is not configured)."""
    if config is None:
        config = ProviderConfig(base_url="http://unconfigured")
    rechecks = sum(recheck_delay(config, n) for n in range(config.recheck.max_attempts))
    waiting = config.webhook_sla_seconds or 0.0
    polling = config.status_polling
    if polling is not None:
        waiting += polling.timeout_seconds or polling.interval_seconds * polling.max_polls
    return rechecks + (waiting or DEFAULT_WAIT_SECONDS)


def plan_provider_checks(
    candidates: Sequence[store.ProviderCheck],
    configs: Mapping[str, ProviderConfig],
    budget: int,
    now: datetime,
) -> list[store.ProviderCheck]:
    """Which candidates to ask their provider about, at most ``budget`` per provider.

    Each provider's budget is shared: up to half (rounded up) for attempts in flight past
    their SLA, the rest for attempts that became final, and a share one kind leaves unused
    goes to the other. Neither kind starves the other: a busy provider's recent finals
    (hundreds per interval) would otherwise take every call, and an attempt stuck in
    EXECUTING or MANUAL_CHECK would never be compared. A provider not configured is skipped.
    """
    waiting: dict[str, list[store.ProviderCheck]] = {}
    final: dict[str, list[store.ProviderCheck]] = {}
    for check in candidates:
        config = configs.get(check.provider_id)
        if config is None:
            continue
        if check.state in _WAITING:
            # MANUAL_CHECK is past the SLA by definition; EXECUTING may still get its
            # webhook within it.
            executing_for = (now - check.since).total_seconds()
            if check.state == "EXECUTING" and executing_for <= (config.webhook_sla_seconds or 0):
                continue
            waiting.setdefault(check.provider_id, []).append(check)
        else:
            final.setdefault(check.provider_id, []).append(check)
    planned: list[store.ProviderCheck] = []
    for provider_id in dict.fromkeys([*waiting, *final]):
        stuck, settled = waiting.get(provider_id, []), final.get(provider_id, [])
        first = stuck[: (budget + 1) // 2]
        rest = settled[: budget - len(first)]
        more = stuck[len(first) : len(first) + budget - len(first) - len(rest)]
        planned += [*first, *more, *rest]
    return planned


def admit(fresh: Sequence[Finding], cap: int) -> tuple[list[Finding], list[Finding]]:
    """The new findings a run raises (at most ``cap``) and those it holds back: the critical
    ones first, whatever rule found them, so that a flood of warnings never holds back a
    double payout; in rule order within a severity."""
    ordered = sorted(fresh, key=lambda f: f.severity != "critical")
    return ordered[:cap], ordered[cap:]


class Reconciler:
    """Runs the rules; :meth:`run_once` is what the worker loop and ``recon run`` call."""

    def __init__(
        self,
        pool: Pool,
        ledger: LedgerReader,
        configs: Mapping[str, ProviderConfig],
        policy: ReconPolicy | None = None,
        providers: ProviderAdapter | None = None,
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.configs = configs
        self.policy = policy or ReconPolicy()
        # None: no provider is asked (rule 4 off).
        self.providers = providers
        for rule in RULES:  # every series at 0 from the start, for increase() alerts
            m.recon_rows_capped.labels(rule=rule)

    async def run_once(self) -> RunReport:
        """One run, if no other runner holds the lock.

        The lock is a session lock on one connection, held for the whole run; every read is a
        statement (or short transaction) of its own, the alerts and the run's record one
        transaction at the end: no transaction stays open while cascade-core or a provider
        takes its time to answer.
        """
        started = time.monotonic()
        now = datetime.now(UTC)
        async with self.pool.acquire() as conn:
            if not await store.try_lock(conn):
                # Another process runs it: the gauges show the fleet's view all the same.
                await self._measure(conn, await store.last_success(conn))
                return RunReport(ran=False)
            try:
                report = await self._locked_run(conn, now, started)
            finally:
                await _unlock(conn)
        m.recon_run_seconds.observe(report.seconds)
        log.info("reconciliation run", extra=report.as_dict())
        return report

    async def _locked_run(self, conn: Connection, now: datetime, started: float) -> RunReport:
        report = RunReport(ran=True)
        findings = await self.findings(conn, now, report)
        async with conn.transaction():
            await self._record(conn, findings, now, report)
            report.seconds = time.monotonic() - started
            await store.record_run(
                conn,
                started_at=now,
                finished_at=now + timedelta(seconds=report.seconds),
                new_alerts=len(report.new_alerts),
                detections=report.detections,
                details=report.as_dict(),
            )
        await self._measure(conn, now + timedelta(seconds=report.seconds))
        return report

    @staticmethod
    async def _measure(conn: Connection, last_success: datetime | None) -> None:
        open_now = await store.open_per_rule(conn)
        for rule in RULES:
            m.recon_alerts_open.labels(rule=rule).set(open_now.get(rule, 0))
        if last_success is not None:
            m.recon_last_success.set(last_success.timestamp())

    async def findings(self, conn: Connection, now: datetime, report: RunReport) -> list[Finding]:
        """Every rule's findings now (what a run records; the bench explains its queries)."""
        window = now - timedelta(seconds=self.policy.window)
        # What changed since the previous run (an interval's overlap, within the window): a
        # run after an outage catches up on everything the outage left unchecked.
        last = await store.last_success(conn)
        since = max(window, (last or window) - timedelta(seconds=self.policy.interval))
        findings = [
            *await self.stale_freezes(conn, now, report),
            *await self.double_successes(conn, since, report),
            *await self.successes_after_final(conn, window, report),
            *await self.ledger_parity(conn, now, since, report),
            *await self.provider_parity(conn, now, since, report),
            *await self.notifications(conn, now, report),
            *await self.returns(conn, window, report),
        ]
        report.per_rule = dict(Counter(f.rule for f in findings))
        report.detections = len(findings)
        return findings

    async def _record(
        self, conn: Connection, findings: Sequence[Finding], now: datetime, report: RunReport
    ) -> None:
        """Raise the new findings (up to the cap, then one meta-alert), update the others."""
        unique = list({f.fingerprint: f for f in findings}.values())
        known = await store.existing_alerts(conn, [f.fingerprint for f in unique])
        cap = self.policy.max_new_alerts
        kept, held = admit([f for f in unique if f.fingerprint not in known], cap)
        seen = [f for f in unique if f.fingerprint in known]
        if held:
            report.held_back = len(held)
            meta = _cap_finding(held, cap, now)
            (seen if meta.fingerprint in known else kept).append(meta)
        report.new_alerts = await store.raise_alerts(conn, kept, now)
        await store.update_alerts(conn, seen, now)

    @staticmethod
    def _capped(rule: str, rows: int, limit: int, report: RunReport) -> None:
        """Say so when a rule's query returned as many rows as it may: the rows past the cap
        were not looked at this run (the oldest open freezes first, the newest successes
        first...), which must not pass for a clean run."""
        if rows < limit:
            return
        report.capped.append(rule)
        m.recon_rows_capped.labels(rule=rule).inc()
        log.warning(
            "reconciliation rule hit its row cap: this run's findings are partial",
            extra={"rule": rule, "rows": rows, "limit": limit},
        )

    async def stale_freezes(
        self, conn: Connection, now: datetime, report: RunReport
    ) -> list[Finding]:
        """Rule 1: freezes open past their provider's deadline (warning within the margin).

        An attempt in MANUAL_CHECK waits for support's decision, not for the engine: its
        freeze is reported as a warning however old it is (support's queue has its own
        view, ``GET /ops/manual-checks``); only a freeze the engine itself should have
        settled turns critical.
        """
        margin = self.policy.stale_margin
        findings = []
        freezes = await store.open_freezes(conn, limit=_ROWS_PER_RULE)
        self._capped("stale_freeze", len(freezes), _ROWS_PER_RULE, report)
        for freeze in freezes:
            deadline = freeze_deadline(self.configs.get(freeze.provider_id))
            age = (now - freeze.frozen_since).total_seconds()
            if age <= deadline:
                continue
            manual = freeze.state == "MANUAL_CHECK"
            severity = "critical" if age > deadline + margin and not manual else "warning"
            waiting = " waiting for support's decision" if manual else ""
            findings.append(
                Finding(
                    fingerprint=f"stale_freeze:{freeze.task_id}",
                    rule="stale_freeze",
                    severity=severity,
                    summary=f"{freeze.amount} {freeze.currency} frozen on {freeze.provider_id}"
                    f" for {age:.0f} s (attempt in {freeze.state}{waiting})",
                    evidence={
                        "checked_at": now.isoformat(),
                        "frozen_since": freeze.frozen_since.isoformat(),
                        "age_seconds": round(age),
                        "deadline_seconds": deadline,
                        "margin_seconds": margin,
                        "task_state": freeze.state,
                        "awaiting_manual_check": manual,
                        "provider_id": freeze.provider_id,
                        "amount": freeze.amount,
                        "currency": freeze.currency,
                    },
                    withdrawal_id=freeze.withdrawal_id,
                    task_id=freeze.task_id,
                    reopens=True,
                )
            )
        return findings

    async def double_successes(
        self, conn: Connection, since: datetime, report: RunReport
    ) -> list[Finding]:
        """Rule 2: more than one attempt of a withdrawal succeeded (paid out twice), among
        the withdrawals with a success since the previous run."""
        queues = await store.recent_success_queues(conn, since, limit=_SUCCESSES_PER_RUN)
        self._capped("double_success", len(queues), _SUCCESSES_PER_RUN, report)
        unique = list(dict.fromkeys(queues))
        rows = await store.double_successes(conn, unique, limit=_ROWS_PER_RULE)
        return [
            Finding(
                fingerprint=f"double_success:{r['withdrawal_id']}",
                rule="double_success",
                severity="critical",
                summary=f"withdrawal {r['withdrawal_id']}: {len(r['task_ids'])} attempts"
                f" succeeded ({', '.join(r['providers'])})",
                evidence={
                    "checked_at": datetime.now(UTC).isoformat(),
                    "task_ids": r["task_ids"],
                    "providers": r["providers"],
                    "provider_references": r["references"],
                },
                withdrawal_id=r["withdrawal_id"],
            )
            for r in rows
        ]

    async def successes_after_final(
        self, conn: Connection, window: datetime, report: RunReport
    ) -> list[Finding]:
        """Rule 2b: a provider reported success for an attempt that had ended without one."""
        rows = await store.successes_after_final(conn, window, limit=_ROWS_PER_RULE)
        self._capped("success_after_final", len(rows), _ROWS_PER_RULE, report)
        return [
            Finding(
                fingerprint=f"success_after_final:{r['provider_id']}:{r['order_id']}",
                rule="success_after_final",
                severity="critical",
                summary=f"{r['provider_id']} reported order {r['order_id']} paid; our attempt"
                f" had ended {r['state'] or '(unknown)'}",
                evidence={
                    "webhook_received_at": r["received_at"].isoformat(),
                    "provider_id": r["provider_id"],
                    "order_id": r["order_id"],
                    "reference": r["reference"],
                    "provider_status": "succeeded",
                    "our_state": r["state"],
                    "unmatched_webhook_id": r["id"],
                },
                withdrawal_id=r["withdrawal_id"],
                task_id=r["task_id"],
            )
            for r in rows
        ]

    async def ledger_parity(
        self, conn: Connection, now: datetime, since: datetime, report: RunReport
    ) -> list[Finding]:
        """Rule 3: our settled freezes against cascade-core's view of each operation: those
        settled ``since`` the previous run first, then a sample of the window."""
        attempts = await store.settled_attempts(
            conn,
            recent_since=since,
            window_since=now - timedelta(seconds=self.policy.window),
            budget=self.policy.ledger_budget,
        )
        findings = []
        # The ledger's answers are the slow part: they get a third of the interval at most.
        stop_at = time.monotonic() + self.policy.interval / 3
        for attempt in attempts:
            if time.monotonic() > stop_at:
                report.ledger_unreachable += 1
                continue
            try:
                theirs = await self.ledger.operation(str(attempt.task_id))
            except (CoreUnavailable, CoreRefused) as exc:
                # No answer is no evidence: counted, checked again in a later run.
                report.ledger_unreachable += 1
                log.warning(
                    "ledger check failed",
                    extra={"task_id": str(attempt.task_id), "error": repr(exc)},
                )
                continue
            report.ledger_checked += 1
            if theirs == attempt.freeze_state:
                continue
            findings.append(_ledger_finding(attempt, theirs, datetime.now(UTC)))
        return findings

    async def provider_parity(
        self, conn: Connection, now: datetime, since: datetime, report: RunReport
    ) -> list[Finding]:
        """Rule 4: our state of an attempt against its provider's status endpoint."""
        if self.providers is None or self.policy.provider_budget == 0:
            return []
        candidates = await store.provider_checks(
            conn, final_since=since, in_flight_before=now, limit=_ROWS_PER_RULE
        )
        waiting = sum(1 for c in candidates if c.state in _WAITING)
        # Each of its two parts is capped on its own.
        larger = max(waiting, len(candidates) - waiting)
        self._capped("provider_parity", larger, _ROWS_PER_RULE, report)
        stop_at = time.monotonic() + self.policy.interval / 3
        findings = []
        for check in plan_provider_checks(
            candidates, self.configs, self.policy.provider_budget, now
        ):
            config = self.configs[check.provider_id]
            if time.monotonic() > stop_at:
                report.provider_unreachable += 1
                continue
            answer = await self.providers.status(config, check.provider_order_id)
            if isinstance(answer, Ambiguous):
                report.provider_unreachable += 1  # proves nothing: asked again later
                continue
            report.provider_checked += 1
            if check.state == "SUCCEEDED" and answer.status == "returned":
                # Rule 6 from the poll's evidence: the webhook that moves the task to
                # RETURNED may be lost; finance must hear of the return all the same.
                findings.append(_return_from_poll(check, answer.code, now))
                continue
            severity = provider_disagreement(check.state, answer.status)
            if severity is not None:
                findings.append(_provider_finding(check, answer.status, severity, now))
        return findings

    async def notifications(
        self, conn: Connection, now: datetime, report: RunReport
    ) -> list[Finding]:
        """Rule 5: final-status notifications cascade-core has not acknowledged in time."""
        older_than = now - timedelta(seconds=self.policy.notify_after)
        rows = await store.unacknowledged_notifications(conn, older_than, limit=_ROWS_PER_RULE)
        self._capped("notification", len(rows), _ROWS_PER_RULE, report)
        return [
            Finding(
                fingerprint=f"notification:{r['withdrawal_id']}:{r['status']}",
                rule="notification",
                severity="warning",
                summary=f"cascade-core has not acknowledged the {r['status']} notification of"
                f" {r['withdrawal_id']} after {r['attempts']} attempts",
                evidence={
                    "checked_at": now.isoformat(),
                    "status": r["status"],
                    "created_at": r["created_at"].isoformat(),
                    "attempts": r["attempts"],
                    "last_error": r["last_error"],
                    "next_attempt_at": r["next_attempt_at"].isoformat(),
                },
                withdrawal_id=r["withdrawal_id"],
                reopens=True,
            )
            for r in rows
        ]

    async def returns(self, conn: Connection, window: datetime, report: RunReport) -> list[Finding]:
        """Rule 6: every attempt its provider reported returned after paying it (RETURNED):
        finance must settle it by hand (cascade-core has no reversal, the public status
        stays succeeded)."""
        rows = await store.returned_attempts(conn, window, limit=_ROWS_PER_RULE)
        self._capped("return", len(rows), _ROWS_PER_RULE, report)
        return [_return_finding(r) for r in rows]


async def _unlock(conn: Connection) -> None:
    """Release the run's session lock before the connection goes back to the pool (which
    does not reset sessions): if that fails, the connection is closed, and the server
    releases the lock with the session; a lock left on a pooled connection would stop every
    later run of the fleet."""
    try:
        if not await store.unlock(conn):
            log.error("the reconciliation lock was not held at the end of the run")
    except BaseException:
        conn.terminate()
        raise


_WAITING = frozenset({"EXECUTING", "MANUAL_CHECK"})
_NOT_PAID = frozenset({"FAILED", "CANCELLED", "SKIPPED"})
# Our state → the provider's statuses that disagree with it → severity. Critical where money
# may be wrong (paid on one side only, or a payout still possible after we gave up); a
# warning where we merely wait for an outcome the provider already has.
_PAID_HERE_ONLY = {"failed": "critical", "cancelled": "critical", "absent": "critical"}
# SUCCEEDED against "returned" is not in the table: it is rule 6's (a ``return`` alert).
PROVIDER_DISAGREEMENTS: dict[str, dict[str, str]] = {
    "SUCCEEDED": {**_PAID_HERE_ONLY, "pending": "warning"},
    # The provider took its return back (paid again): we only lag behind it.
    "RETURNED": {**_PAID_HERE_ONLY, "pending": "critical", "succeeded": "warning"},
    **{
        state: {"succeeded": "critical", "pending": "critical", "returned": "critical"}
        for state in _NOT_PAID
    },
    **{
        state: {
            "succeeded": "warning",
            "failed": "warning",
            "cancelled": "warning",
            "absent": "warning",
            "returned": "warning",
        }
        for state in _WAITING
    },
}


def provider_disagreement(ours: str, theirs: str) -> str | None:
    """The severity of the provider answering ``theirs`` for an attempt in ``ours``; None
    when the two agree."""
    return PROVIDER_DISAGREEMENTS.get(ours, {}).get(theirs)


def _provider_finding(
    check: store.ProviderCheck, theirs: str, severity: str, at: datetime
) -> Finding:
    return Finding(
        fingerprint=f"provider_parity:{check.task_id}",
        rule="provider_parity",
        severity=severity,
        summary=f"attempt {check.task_id} on {check.provider_id}: we have {check.state},"
        f" the provider says {theirs}",
        evidence={
            "checked_at": at.isoformat(),
            "provider_id": check.provider_id,
            "order_id": check.provider_order_id,
            "ours": check.state,
            "provider_status": theirs,
            "state_since": check.since.isoformat(),
        },
        withdrawal_id=check.withdrawal_id or None,
        task_id=check.task_id,
        reopens=True,
    )


def _return_finding(r: Mapping[str, Any]) -> Finding:
    """Rule 6's alert for a RETURNED attempt, with the audit row that recorded the return."""
    task_id = r["task_id"]
    audit = None
    if r["event_id"] is not None:
        audit = {
            "event_id": r["event_id"],
            "event": r["event"],
            "actor": r["actor"],
            "trace_id": r["trace_id"],
            "details": r["details"],
            "at": r["event_at"].isoformat(),
        }
    amount = f"{r['amount']:.2f}"
    currency = r["currency"].strip()
    return Finding(
        fingerprint=f"return:{task_id}",
        rule="return",
        severity="critical",
        summary=f"{r['provider_id']} returned the payout of {r['withdrawal_id']}"
        f" ({amount} {currency}, order {r['provider_order_id']},"
        f" code {r['provider_code'] or '(none)'}): settle it by hand at cascade-core",
        evidence={
            "source": "recorded",
            "provider_id": r["provider_id"],
            "order_id": r["provider_order_id"],
            "reference": r["provider_reference"],
            "return_code": r["provider_code"],
            "returned_at": r["state_entered_at"].isoformat(),
            "amount": amount,
            "currency": currency,
            "our_state": "RETURNED",
            "audit": audit,
        },
        withdrawal_id=r["withdrawal_id"],
        task_id=task_id,
    )


def _return_from_poll(check: store.ProviderCheck, code: str | None, at: datetime) -> Finding:
    """Rule 6's alert from a status poll: the provider reports returned an attempt we still
    have SUCCEEDED (its webhook has not moved it, or was lost). The same alert as the
    recorded return's, which updates it once the task is RETURNED."""
    return Finding(
        fingerprint=f"return:{check.task_id}",
        rule="return",
        severity="critical",
        summary=f"{check.provider_id} reports order {check.provider_order_id} returned"
        f" (code {code or '(none)'}); we have it SUCCEEDED: settle it by hand at cascade-core",
        evidence={
            "source": "provider_status",
            "checked_at": at.isoformat(),
            "provider_id": check.provider_id,
            "order_id": check.provider_order_id,
            "reference": check.provider_reference,
            "return_code": code,
            "provider_status": "returned",
            "our_state": check.state,
            "succeeded_at": check.since.isoformat(),
        },
        withdrawal_id=check.withdrawal_id or None,
        task_id=check.task_id,
    )


def _ledger_finding(
    attempt: store.SettledAttempt, theirs: FreezeState | None, at: datetime
) -> Finding:
    core = theirs or "absent"
    return Finding(
        fingerprint=f"ledger_parity:{attempt.task_id}",
        rule="ledger_parity",
        severity="critical",
        summary=f"attempt {attempt.task_id} on {attempt.provider_id}: we recorded"
        f" {attempt.freeze_state}, cascade-core says {core}",
        evidence={
            "checked_at": at.isoformat(),
            "operation_id": str(attempt.task_id),
            "ours": attempt.freeze_state,
            "cascade_core": core,
            "task_state": attempt.state,
            "settled_at": attempt.settled_at.isoformat(),
            "provider_id": attempt.provider_id,
        },
        withdrawal_id=attempt.withdrawal_id or None,
        task_id=attempt.task_id,
        reopens=True,
    )


def _cap_finding(held: Sequence[Finding], cap: int, now: datetime) -> Finding:
    per_rule = dict(Counter(f.rule for f in held))
    return Finding(
        fingerprint="alert_cap",
        rule="alert_cap",
        severity="critical",
        summary=f"{len(held)} more findings than the {cap} new alerts a run raises were held"
        " back: they are raised by the next runs",
        evidence={
            "checked_at": now.isoformat(),
            "cap": cap,
            "held_back": len(held),
            "per_rule": per_rule,
            "sample": [f.fingerprint for f in held[:20]],
        },
        reopens=True,
    )
