"""cascade-core simulator: the balance ledger and the withdrawal-notification sink.

Serves the endpoints of ``legacy-api/README.md`` ("What the gateway calls on cascade-core")
under ``/sandbox/core`` and checks the money-safety invariants of DESIGN.md as it goes. Every
breach it sees is kept as a :class:`Violation`, so a test (or a person reading
``GET /sandbox/core/ledger``) can assert that a run left none.

The ledger itself (:class:`Ledger`) lives in the sandbox's Postgres schema
(:mod:`sandbox.database`): it outlives the process, and several processes may share it. Each
operation checks and mutates in one transaction under row and advisory locks. The HTTP layer
(:class:`CoreSimulator`) adds authentication, fault injection and the wire format.

Floats are per provider and currency-blind: a sandbox provider holds one number.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeVar

import asyncpg
import msgspec
from litestar import Request, Response, Router, get, post, put
from litestar.params import FromPath

from sandbox.database import Connection, SandboxDb

log = logging.getLogger("sandbox.core")
_T = TypeVar("_T")

OperationState = Literal["frozen", "committed", "rolled_back"]
FINAL_NOTIFICATION_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# Violation kinds the ledger detects. The first six are the invariants DESIGN.md names; the
# others are gateway bugs that are cheap to see here and expensive to find anywhere else.
COMMIT_AFTER_ROLLBACK = "commit_after_rollback"
ROLLBACK_AFTER_COMMIT = "rollback_after_commit"
DOUBLE_COMMIT = "double_commit"
UNKNOWN_OPERATION = "unknown_operation"
FREEZE_OPEN_TOO_LONG = "freeze_open_too_long"
CONFLICTING_NOTIFICATIONS = "conflicting_notifications"
FREEZE_CONFLICT = "freeze_conflict"
NOTIFICATION_KEY_MISMATCH = "notification_key_mismatch"
NON_FINAL_NOTIFICATION = "non_final_notification"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Violation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One invariant breach the simulator saw."""

    kind: str
    detail: str
    operation_id: str | None = None
    withdrawal_id: str | None = None
    at: str = ""


class LedgerError(Exception):
    """A balance call the ledger refuses; ``status`` and ``code`` go on the wire as they are."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_HISTORY = msgspec.json.Encoder()


def _entry(action: str, result: str) -> str:
    """One ``history`` entry as a one-element JSON array, to append with ``||``."""
    return _HISTORY.encode([{"action": action, "result": result, "at": _now_iso()}]).decode()


class Ledger:
    """Balances and notifications of one simulated cascade-core, kept in Postgres.

    Each call is one transaction. Calls on one ``operation_id`` take turns on an advisory lock
    on it, calls that judge a whole withdrawal (double commit, conflicting notifications) on
    one on the withdrawal, taken second; a provider's float row is locked last. Every process
    sharing the schema takes them in this order, so they cannot deadlock.

    ``clock`` is wall-clock seconds (freezes outlive the process, so no monotonic clock);
    tests may inject one to age freezes without sleeping.
    """

    def __init__(
        self,
        db: SandboxDb,
        *,
        floats: Mapping[str, Decimal] | None = None,
        default_float: Decimal = Decimal("1000000"),
        open_freeze_bound_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._initial_floats = dict(floats or {})
        self._default_float = default_float
        self.open_freeze_bound_seconds = open_freeze_bound_seconds
        self._clock = clock

    async def seed_floats(self) -> None:
        """Give every configured provider its float, unless the ledger already holds one."""
        await self._db.pool.execute(
            "INSERT INTO floats (provider_id, amount)"
            " SELECT * FROM unnest($1::text[], $2::numeric[]) ON CONFLICT DO NOTHING",
            list(self._initial_floats),
            list(self._initial_floats.values()),
        )

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        async with self._db.pool.acquire() as conn, conn.transaction():
            yield conn

    async def _lock(self, conn: Connection, kind: str, key: str) -> None:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"{self._db.schema}:{kind}:{key}",
        )

    # -- floats ----------------------------------------------------------------------------

    async def available(self, provider_id: str) -> Decimal:
        """The float minus the provider's open freezes."""
        row = await self._db.pool.fetchrow(
            "SELECT amount - held FROM floats WHERE provider_id = $1", provider_id
        )
        return self._default_float if row is None else Decimal(row[0])

    # -- balance operations ----------------------------------------------------------------

    async def freeze(
        self,
        operation_id: str,
        withdrawal_id: str,
        provider_id: str,
        amount: Decimal,
        currency: str,
    ) -> OperationState:
        """Hold ``amount`` on the provider's float; a repeat answers the current state."""
        terms = (withdrawal_id, provider_id, amount, currency)
        async with self._transaction() as conn:
            existing = await self._operation(conn, operation_id)
            outcome = (
                await self._hold(conn, operation_id, terms)
                if existing is None
                else await self._replay_freeze(conn, operation_id, existing, terms)
            )
        # Raised once the transaction committed: the violation and history it wrote stay.
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    async def _replay_freeze(
        self,
        conn: Connection,
        operation_id: str,
        existing: asyncpg.Record,
        terms: tuple[str, str, Decimal, str],
    ) -> OperationState | LedgerError:
        same = (
            existing["withdrawal_id"],
            existing["provider_id"],
            existing["amount"],
            existing["currency"],
        ) == terms
        if not same:
            await self._record(conn, operation_id, "freeze", "409 operation_conflict")
            await self._violate(
                conn,
                FREEZE_CONFLICT,
                "freeze repeated with a different withdrawal, provider, amount or currency",
                operation_id=operation_id,
                withdrawal_id=terms[0],
            )
            return LedgerError(
                409, "operation_conflict", "operation_id was already used for a different freeze"
            )
        # Idempotent replay: never a second hold for one operation_id.
        state: OperationState = existing["state"]
        await self._record(conn, operation_id, "freeze", state)
        return state

    async def _operation(self, conn: Connection, operation_id: str) -> asyncpg.Record | None:
        """The operation, locked until the transaction ends: calls on it take turns (the
        advisory lock covers an operation that does not exist yet)."""
        await self._lock(conn, "operation", operation_id)
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT * FROM operations WHERE operation_id = $1 FOR UPDATE", operation_id
        )
        return row

    async def _hold(
        self, conn: Connection, operation_id: str, terms: tuple[str, str, Decimal, str]
    ) -> OperationState | LedgerError:
        _, provider_id, amount, currency = terms
        held = await self._take_hold(conn, operation_id, terms)
        if not held and await conn.fetchval(
            # A provider the configuration did not name gets the default float, then a try.
            "INSERT INTO floats (provider_id, amount) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING true",
            provider_id,
            self._default_float,
        ):
            held = await self._take_hold(conn, operation_id, terms)
        if held:
            return "frozen"
        await conn.execute(
            "INSERT INTO refusals (operation_id, detail) VALUES ($1, $2)"
            " ON CONFLICT (operation_id) DO UPDATE SET detail = excluded.detail",
            operation_id,
            f"freeze of {amount} {currency} on {provider_id} refused: insufficient_balance",
        )
        return LedgerError(
            409, "insufficient_balance", f"provider {provider_id} cannot cover {amount}"
        )

    async def _take_hold(
        self, conn: Connection, operation_id: str, terms: tuple[str, str, Decimal, str]
    ) -> bool:
        """Hold the amount if the float covers it, and create the operation: one statement.

        The conditional UPDATE locks the provider's float row until the transaction ends (the
        next round trip): two freezes on one provider never both see the same available amount.
        """
        held: int = await conn.fetchval(
            "WITH hold AS (UPDATE floats SET held = held + $4"
            " WHERE provider_id = $3 AND amount - held >= $4 RETURNING provider_id),"
            " op AS (INSERT INTO operations (operation_id, withdrawal_id, provider_id, amount,"
            " currency, state, frozen_at, history)"
            " SELECT $1::text, $2::text, provider_id, $4, $5::text, 'frozen',"
            " $6::double precision, $7::jsonb FROM hold),"
            " cleared AS (DELETE FROM refusals"
            " WHERE operation_id = $1 AND EXISTS (SELECT FROM hold))"
            " SELECT count(*) FROM hold",
            operation_id,
            *terms,
            self._clock(),
            _entry("freeze", "frozen"),
        )
        return held == 1

    async def commit(self, operation_id: str) -> OperationState:
        """Debit the provider's float for a frozen operation; a repeat answers committed."""
        return await self._settle(operation_id, "commit")

    async def rollback(self, operation_id: str) -> OperationState:
        """Release a frozen operation's hold; a repeat answers rolled_back."""
        return await self._settle(operation_id, "rollback")

    async def _settle(
        self, operation_id: str, action: Literal["commit", "rollback"]
    ) -> OperationState:
        async with self._transaction() as conn:
            op = await self._operation(conn, operation_id)
            outcome = (
                await self._unknown(conn, operation_id, action)
                if op is None
                else await self._apply(conn, op, action)
            )
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    async def _apply(
        self, conn: Connection, op: asyncpg.Record, action: Literal["commit", "rollback"]
    ) -> OperationState | LedgerError:
        target: OperationState = "committed" if action == "commit" else "rolled_back"
        state: OperationState = op["state"]
        if state == target:
            await self._record(conn, op["operation_id"], action, state)
            return state
        if state != "frozen":
            await self._record(conn, op["operation_id"], action, "409 invalid_state")
            kind = COMMIT_AFTER_ROLLBACK if action == "commit" else ROLLBACK_AFTER_COMMIT
            await self._violate(
                conn,
                kind,
                f"{action} of an operation that was {state.replace('_', ' ')}",
                operation_id=op["operation_id"],
                withdrawal_id=op["withdrawal_id"],
            )
            return LedgerError(409, "invalid_state", f"operation was {state.replace('_', ' ')}")
        if action == "commit":
            await self._judge_commit(conn, op)
        await self._close(conn, op, target, action)
        return target

    async def _judge_commit(self, conn: Connection, op: asyncpg.Record) -> None:
        """A commit that is a double commit is recorded as one (and still made)."""
        # Withdrawal-wide: two operations of one withdrawal committed at once must not both
        # find the other still frozen.
        await self._lock(conn, "withdrawal", op["withdrawal_id"])
        others = await conn.fetch(
            "SELECT operation_id FROM operations"
            " WHERE withdrawal_id = $1 AND state = 'committed' ORDER BY seq",
            op["withdrawal_id"],
        )
        if others:
            # Still committed: each operation is a separate hold, and recording what really
            # happened (the money moved twice) is the point of the violation.
            await self._violate(
                conn,
                DOUBLE_COMMIT,
                "withdrawal already has committed operation(s) "
                + ", ".join(r["operation_id"] for r in others),
                operation_id=op["operation_id"],
                withdrawal_id=op["withdrawal_id"],
            )

    async def _close(
        self, conn: Connection, op: asyncpg.Record, state: OperationState, action: str
    ) -> None:
        """End a freeze: release its hold (a commit also debits the float) and record it; one
        closed after the bound was open too long even if nobody read the ledger meanwhile."""
        seconds = self._clock() - op["frozen_at"]
        late = seconds > self.open_freeze_bound_seconds and not op["flagged_open"]
        debit = op["amount"] if state == "committed" else Decimal(0)
        await conn.execute(
            "WITH released AS (UPDATE floats SET amount = amount - $5, held = held - $6"
            " WHERE provider_id = $7)"
            " UPDATE operations SET state = $2, flagged_open = flagged_open OR $3,"
            " history = history || $4::jsonb WHERE operation_id = $1",
            op["operation_id"],
            state,
            late,
            _entry(action, state),
            debit,
            op["amount"],
            op["provider_id"],
        )
        if late:
            await self._flag_open_too_long(conn, op["operation_id"], op["withdrawal_id"], seconds)

    async def state_of(self, operation_id: str) -> OperationState | None:
        state: OperationState | None = await self._db.pool.fetchval(
            "SELECT state FROM operations WHERE operation_id = $1", operation_id
        )
        return state

    async def _unknown(self, conn: Connection, operation_id: str, action: str) -> LedgerError:
        refused = await conn.fetchval(
            "SELECT detail FROM refusals WHERE operation_id = $1", operation_id
        )
        detail = f"{action} of an operation that was never frozen"
        if refused is not None:
            detail += f" ({refused})"
        await self._violate(conn, UNKNOWN_OPERATION, detail, operation_id=operation_id)
        return LedgerError(404, "not_found", "unknown operation_id")

    async def _record(self, conn: Connection, operation_id: str, action: str, result: str) -> None:
        await conn.execute(
            "UPDATE operations SET history = history || $2::jsonb WHERE operation_id = $1",
            operation_id,
            _entry(action, result),
        )

    # -- notifications ---------------------------------------------------------------------

    async def notify(self, idempotency_key: str, body: Any) -> bool:
        """Record a withdrawal notification once per key; ``True`` when it is the first."""
        async with self._transaction() as conn:
            deliveries = await conn.fetchval(
                "INSERT INTO notifications (idempotency_key, body, deliveries)"
                " VALUES ($1, $2, 1) ON CONFLICT (idempotency_key)"
                " DO UPDATE SET deliveries = notifications.deliveries + 1 RETURNING deliveries",
                idempotency_key,
                msgspec.json.encode(body).decode(),
            )
            if deliveries == 1:
                await self._judge_notification(conn, idempotency_key, body)
        return bool(deliveries == 1)

    async def _judge_notification(self, conn: Connection, idempotency_key: str, body: Any) -> None:
        withdrawal_id = body.get("withdrawal_id") if isinstance(body, dict) else None
        status = body.get("status") if isinstance(body, dict) else None
        if not isinstance(withdrawal_id, str) or not isinstance(status, str):
            key_wid, _, key_status = idempotency_key.rpartition(":")
            withdrawal_id = withdrawal_id if isinstance(withdrawal_id, str) else key_wid
            status = status if isinstance(status, str) else key_status
        if idempotency_key != f"{withdrawal_id}:{status}":
            await self._violate(
                conn,
                NOTIFICATION_KEY_MISMATCH,
                f"Idempotency-Key {idempotency_key!r} does not match body {withdrawal_id}:{status}",
                withdrawal_id=withdrawal_id,
            )
        if status not in FINAL_NOTIFICATION_STATUSES:
            await self._violate(
                conn,
                NON_FINAL_NOTIFICATION,
                f"notification with non-final status {status!r}",
                withdrawal_id=withdrawal_id,
            )
            return
        await self._lock(conn, "withdrawal", withdrawal_id)
        seen = [
            r["status"]
            for r in await conn.fetch(
                "SELECT status FROM final_statuses WHERE withdrawal_id = $1 ORDER BY seq",
                withdrawal_id,
            )
        ]
        if status in seen:
            return
        if seen:
            await self._violate(
                conn,
                CONFLICTING_NOTIFICATIONS,
                f"final status {status} after {', '.join(seen)}",
                withdrawal_id=withdrawal_id,
            )
        await conn.execute(
            "INSERT INTO final_statuses (withdrawal_id, status) VALUES ($1, $2)",
            withdrawal_id,
            status,
        )

    # -- invariants and reading ------------------------------------------------------------

    async def check_open_freezes(self) -> None:
        """Flag (once each) freezes open longer than the bound; runs on every read."""
        now = self._clock()
        async with self._transaction() as conn:
            # One conditional UPDATE: however many readers race, each freeze is flagged once.
            late = await conn.fetch(
                "UPDATE operations SET flagged_open = true"
                " WHERE state = 'frozen' AND NOT flagged_open AND frozen_at < $1"
                " RETURNING operation_id, withdrawal_id, frozen_at",
                now - self.open_freeze_bound_seconds,
            )
            for op in late:
                await self._flag_open_too_long(
                    conn, op["operation_id"], op["withdrawal_id"], now - op["frozen_at"]
                )

    async def _flag_open_too_long(
        self, conn: Connection, operation_id: str, withdrawal_id: str, seconds: float
    ) -> None:
        await self._violate(
            conn,
            FREEZE_OPEN_TOO_LONG,
            f"freeze open {seconds:.3f}s, bound {self.open_freeze_bound_seconds}s",
            operation_id=operation_id,
            withdrawal_id=withdrawal_id,
        )

    async def _violate(
        self,
        conn: Connection,
        kind: str,
        detail: str,
        *,
        operation_id: str | None = None,
        withdrawal_id: str | None = None,
    ) -> None:
        violation = Violation(
            kind=kind,
            detail=detail,
            operation_id=operation_id,
            withdrawal_id=withdrawal_id,
            at=_now_iso(),
        )
        log.warning("sandbox ledger violation: %s", msgspec.json.encode(violation).decode())
        await conn.execute(
            "INSERT INTO violations (kind, detail, operation_id, withdrawal_id, at)"
            " VALUES ($1, $2, $3, $4, $5)",
            kind,
            detail,
            operation_id,
            withdrawal_id,
            violation.at,
        )

    async def violations(self) -> list[Violation]:
        rows = await self._db.pool.fetch(
            "SELECT kind, detail, operation_id, withdrawal_id, at FROM violations ORDER BY seq"
        )
        return [Violation(**dict(r)) for r in rows]

    async def snapshot(self) -> dict[str, Any]:
        """The ledger as ``GET /sandbox/core/ledger`` shows it (open freezes checked first)."""
        await self.check_open_freezes()
        async with (
            self._db.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            operations = await conn.fetch("SELECT * FROM operations ORDER BY seq")
            refusals = await conn.fetch("SELECT operation_id, detail FROM refusals ORDER BY seq")
            notifications = await conn.fetch(
                "SELECT idempotency_key, body, deliveries FROM notifications ORDER BY seq"
            )
            violations = await conn.fetch(
                "SELECT kind, detail, operation_id, withdrawal_id, at FROM violations ORDER BY seq"
            )
            floats = await conn.fetch("SELECT * FROM floats ORDER BY provider_id")
        return {
            "operations": {op["operation_id"]: op["state"] for op in operations},
            "operation_details": {op["operation_id"]: _details(op) for op in operations},
            "refusals": {r["operation_id"]: r["detail"] for r in refusals},
            "notifications": [msgspec.json.decode(n["body"]) for n in notifications],
            "notification_deliveries": {
                n["idempotency_key"]: n["deliveries"] for n in notifications
            },
            "violations": [msgspec.to_builtins(Violation(**dict(v))) for v in violations],
            "floats": {f["provider_id"]: _decimal(f["amount"]) for f in floats},
            "available": {f["provider_id"]: _decimal(f["amount"] - f["held"]) for f in floats},
        }


def _decimal(value: Decimal) -> str:
    """Positional notation: asyncpg may decode ``1000000`` as ``Decimal('1.00E+6')``."""
    return format(value, "f")


def _details(op: asyncpg.Record) -> dict[str, Any]:
    return {
        "withdrawal_id": op["withdrawal_id"],
        "provider_id": op["provider_id"],
        "amount": _decimal(op["amount"]),
        "currency": op["currency"],
        "state": op["state"],
        "history": msgspec.json.decode(op["history"]),
    }


# -- fault injection -----------------------------------------------------------------------


@dataclass
class CoreFaults:
    """Seeded fault injection for the balance endpoints; drawn before anything is applied."""

    fault_500_ratio: float = 0.0
    timeout_ratio: float = 0.0
    timeout_seconds: float = 5.0
    rng: random.Random = field(default_factory=random.Random)

    def draw(self) -> Literal["none", "500", "timeout"]:
        if self.fault_500_ratio <= 0 and self.timeout_ratio <= 0:
            return "none"
        roll = self.rng.random()
        if roll < self.fault_500_ratio:
            return "500"
        if roll < self.fault_500_ratio + self.timeout_ratio:
            return "timeout"
        return "none"


OperationFault = Literal["lose", "flip", "delay"]
_FLIPPED: dict[str, OperationState] = {
    "committed": "rolled_back",
    "rolled_back": "committed",
    "frozen": "committed",
}


@dataclass(frozen=True)
class OperationView:
    """A distortion of what ``GET /v1/balances/operations/{id}`` answers about one operation,
    so that reconciliation's ledger-parity rule can be triggered on purpose. The ledger itself
    is untouched: only the answer lies. ``lose``: 404; ``flip``: committed and rolled back
    swapped (a hold reads committed); ``delay``: still ``frozen`` until ``until`` (monotonic)."""

    fault: OperationFault
    until: float = 0.0

    def apply(self, state: OperationState, now: float) -> OperationState | None:
        if self.fault == "lose":
            return None
        if self.fault == "flip":
            return _FLIPPED[state]
        return "frozen" if now < self.until else state


# -- HTTP ----------------------------------------------------------------------------------


def json_response(status: int, body: Any) -> Response[bytes]:
    """A JSON response from bytes we encoded ourselves (no framework serialisation)."""
    return Response(
        content=msgspec.json.encode(body), status_code=status, media_type="application/json"
    )


def error_response(status: int, code: str, message: str) -> Response[bytes]:
    return json_response(status, {"error": {"code": code, "message": message}})


class _FreezeBody(msgspec.Struct, frozen=True):
    operation_id: str
    withdrawal_id: str
    provider_id: str
    amount: str
    currency: str


class _OperationBody(msgspec.Struct, frozen=True):
    operation_id: str


class _OperationFaultBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    fault: Literal["lose", "flip", "delay", "none"]
    seconds: float = 60.0


class _FaultsBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    fault_500_ratio: float = 0.0
    timeout_ratio: float = 0.0
    timeout_seconds: float | None = None


class BadRequestError(Exception):
    """Input the handler rejects with a 4xx; converted to a response by the handler itself."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> Response[bytes]:
        return error_response(self.status, self.code, self.message)


def decode_body(raw: bytes, type_: type[_T]) -> _T:
    """Decode a JSON body strictly; malformed JSON is 400, a wrong shape 422."""
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        raise BadRequestError(422, "validation_failed", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise BadRequestError(400, "malformed_json", "request body is not valid JSON") from exc


def parse_amount(text: str) -> Decimal:
    try:
        amount = Decimal(text)
    except InvalidOperation as exc:
        raise BadRequestError(422, "validation_failed", "amount must be a decimal string") from exc
    if not amount.is_finite() or amount <= 0:
        raise BadRequestError(422, "validation_failed", "amount must be a positive decimal")
    return amount


def _require_ids(**values: str) -> None:
    for name, value in values.items():
        if not value or len(value) > 255:
            raise BadRequestError(422, "validation_failed", f"{name} must be 1..255 characters")


class CoreSimulator:
    """The HTTP face of the ledger: auth, fault injection and the ``/core`` routes."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        tokens: tuple[str, ...],
        faults: CoreFaults,
    ) -> None:
        self.ledger = ledger
        self.faults = faults
        self._tokens = tokens
        # Per operation, in this process only (like ``faults``): operation_id → distortion.
        self.views: dict[str, OperationView] = {}

    def _authorized(self, request: Request[Any, Any, Any]) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # compare_digest on every token: timing does not reveal which one nearly matched.
        matches = [hmac.compare_digest(token.encode(), t.encode()) for t in self._tokens]
        return any(matches)

    async def _guard(self, request: Request[Any, Any, Any]) -> Response[bytes] | None:
        """Authentication, then the injected fault (before the call touches the ledger)."""
        if not self._authorized(request):
            return error_response(401, "unauthorized", "missing or invalid bearer token")
        fault = self.faults.draw()
        if fault == "500":
            return error_response(500, "injected_fault", "sandbox fault injection: 500")
        if fault == "timeout":
            await asyncio.sleep(self.faults.timeout_seconds)
            return error_response(504, "injected_timeout", "sandbox fault injection: timeout")
        return None

    def router(self) -> Router:
        """The ``/core`` routes, closed over this simulator."""
        sim = self
        ledger = self.ledger

        @post("/v1/balances/freeze")
        async def freeze(request: Request[Any, Any, Any]) -> Response[bytes]:
            refused = await sim._guard(request)
            if refused is not None:
                return refused
            try:
                body = decode_body(await request.body(), _FreezeBody)
                _require_ids(
                    operation_id=body.operation_id,
                    withdrawal_id=body.withdrawal_id,
                    provider_id=body.provider_id,
                    currency=body.currency,
                )
                amount = parse_amount(body.amount)
                state = await ledger.freeze(
                    body.operation_id, body.withdrawal_id, body.provider_id, amount, body.currency
                )
            except BadRequestError as exc:
                return exc.response()
            except LedgerError as exc:
                return error_response(exc.status, exc.code, exc.message)
            return json_response(200, {"operation_id": body.operation_id, "state": state})

        async def settle(
            request: Request[Any, Any, Any],
            apply: Callable[[str], Awaitable[OperationState]],
        ) -> Response[bytes]:
            refused = await sim._guard(request)
            if refused is not None:
                return refused
            try:
                body = decode_body(await request.body(), _OperationBody)
                _require_ids(operation_id=body.operation_id)
                state = await apply(body.operation_id)
            except BadRequestError as exc:
                return exc.response()
            except LedgerError as exc:
                return error_response(exc.status, exc.code, exc.message)
            return json_response(200, {"operation_id": body.operation_id, "state": state})

        @post("/v1/balances/commit")
        async def commit(request: Request[Any, Any, Any]) -> Response[bytes]:
            return await settle(request, ledger.commit)

        @post("/v1/balances/rollback")
        async def rollback(request: Request[Any, Any, Any]) -> Response[bytes]:
            return await settle(request, ledger.rollback)

        @get("/v1/balances/operations/{operation_id:str}")
        async def operation(
            request: Request[Any, Any, Any], operation_id: FromPath[str]
        ) -> Response[bytes]:
            refused = await sim._guard(request)
            if refused is not None:
                return refused
            state = await ledger.state_of(operation_id)
            view = sim.views.get(operation_id)
            if state is not None and view is not None:
                state = view.apply(state, time.monotonic())
            if state is None:
                return error_response(404, "not_found", "unknown operation_id")
            return json_response(200, {"operation_id": operation_id, "state": state})

        @put("/operations/{operation_id:str}/fault")
        async def set_operation_fault(
            request: Request[Any, Any, Any], operation_id: FromPath[str]
        ) -> Response[bytes]:
            return sim.set_view(operation_id, await request.body())

        @post("/v1/withdrawal-notifications")
        async def notification(request: Request[Any, Any, Any]) -> Response[bytes]:
            if not sim._authorized(request):
                return error_response(401, "unauthorized", "missing or invalid bearer token")
            key = request.headers.get("idempotency-key", "")
            if not key or len(key) > 512:
                return error_response(
                    400, "missing_idempotency_key", "Idempotency-Key <withdrawal_id>:<status>"
                )
            try:
                body = msgspec.json.decode(await request.body())
            except msgspec.DecodeError:
                return error_response(400, "malformed_json", "request body is not valid JSON")
            if not isinstance(body, dict):
                return error_response(422, "validation_failed", "body must be a Withdrawal object")
            first = await ledger.notify(key, body)
            return json_response(200, {"status": "ok", "first_delivery": first})

        @get("/ledger")
        async def read_ledger() -> Response[bytes]:
            snapshot = await ledger.snapshot()
            snapshot["faults"] = sim.faults_view()
            return json_response(200, snapshot)

        @put("/faults")
        async def set_faults(request: Request[Any, Any, Any]) -> Response[bytes]:
            try:
                body = decode_body(await request.body(), _FaultsBody)
            except BadRequestError as exc:
                return exc.response()
            ratios = (body.fault_500_ratio, body.timeout_ratio)
            if any(not 0 <= r <= 1 for r in ratios) or sum(ratios) > 1:
                return error_response(
                    422, "validation_failed", "ratios must be within 0..1 and sum to at most 1"
                )
            if body.timeout_seconds is not None and not 0 <= body.timeout_seconds <= 600:
                return error_response(
                    422, "validation_failed", "timeout_seconds must be within 0..600"
                )
            sim.faults.fault_500_ratio = body.fault_500_ratio
            sim.faults.timeout_ratio = body.timeout_ratio
            if body.timeout_seconds is not None:
                sim.faults.timeout_seconds = body.timeout_seconds
            return json_response(200, sim.faults_view())

        return Router(
            path="/core",
            route_handlers=[
                freeze,
                commit,
                rollback,
                operation,
                set_operation_fault,
                notification,
                read_ledger,
                set_faults,
            ],
        )

    def set_view(self, operation_id: str, raw: bytes) -> Response[bytes]:
        """``PUT /core/operations/{id}/fault``: lose, flip or delay one operation's lookup."""
        try:
            body = decode_body(raw, _OperationFaultBody)
            _require_ids(operation_id=operation_id)
        except BadRequestError as exc:
            return exc.response()
        if not 0 <= body.seconds <= 86400:
            return error_response(422, "validation_failed", "seconds must be within 0..86400")
        if body.fault == "none":
            self.views.pop(operation_id, None)
        else:
            self.views[operation_id] = OperationView(body.fault, time.monotonic() + body.seconds)
        return json_response(200, {"operation_id": operation_id, "fault": body.fault})

    def faults_view(self) -> dict[str, float]:
        return {
            "fault_500_ratio": self.faults.fault_500_ratio,
            "timeout_ratio": self.faults.timeout_ratio,
            "timeout_seconds": self.faults.timeout_seconds,
        }
