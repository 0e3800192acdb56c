"""cascade-core simulator: the balance ledger and the withdrawal-notification sink.

Serves the endpoints of ``legacy-api/README.md`` ("What the gateway calls on cascade-core")
under ``/sandbox/core`` and checks the money-safety invariants of DESIGN.md as it goes. Every
breach it sees is kept as a :class:`Violation`, so a test (or a person reading
``GET /sandbox/core/ledger``) can assert that a run left none.

The ledger itself (:class:`Ledger`) does no I/O and never awaits: each operation checks and
mutates in one synchronous step, so concurrent requests on one event loop cannot interleave
inside it. The HTTP layer (:class:`CoreSimulator`) adds authentication, fault injection and
the wire format.

Floats are per provider and currency-blind: a sandbox provider holds one number.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeVar

import msgspec
from litestar import Request, Response, Router, get, post, put
from litestar.params import FromPath

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


@dataclass
class Operation:
    """One balance operation (one freeze and what became of it)."""

    operation_id: str
    withdrawal_id: str
    provider_id: str
    amount: Decimal
    currency: str
    state: OperationState
    frozen_at: float  # ledger clock, for the open-freeze bound
    closed_at: float | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def record(self, action: str, result: str) -> None:
        self.history.append({"action": action, "result": result, "at": _now_iso()})


class Ledger:
    """In-memory balances and notifications of one simulated cascade-core.

    ``clock`` is monotonic seconds; tests may inject one to age freezes without sleeping.
    """

    def __init__(
        self,
        *,
        floats: Mapping[str, Decimal] | None = None,
        default_float: Decimal = Decimal("1000000"),
        open_freeze_bound_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._floats: dict[str, Decimal] = dict(floats or {})
        self._default_float = default_float
        self.open_freeze_bound_seconds = open_freeze_bound_seconds
        self._clock = clock
        self.operations: dict[str, Operation] = {}
        self.violations: list[Violation] = []
        # Refused freezes are not operations (nothing is held); kept so that a later commit or
        # rollback of one can say why it is unknown.
        self.refusals: dict[str, str] = {}
        self.notifications: list[Any] = []
        self.notification_deliveries: dict[str, int] = {}
        self._final_statuses: dict[str, list[str]] = {}
        self._flagged_open: set[str] = set()
        # Running indexes, so that a benchmark's hundred thousand operations stay O(1) each.
        self._held: dict[str, Decimal] = {}
        self._open: dict[str, Operation] = {}
        self._committed: dict[str, list[str]] = {}

    # -- floats ----------------------------------------------------------------------------

    def float_of(self, provider_id: str) -> Decimal:
        """What the provider holds after commits (open freezes not subtracted)."""
        return self._floats.setdefault(provider_id, self._default_float)

    def held(self, provider_id: str) -> Decimal:
        """The sum of the provider's open freezes."""
        return self._held.get(provider_id, Decimal(0))

    def available(self, provider_id: str) -> Decimal:
        return self.float_of(provider_id) - self.held(provider_id)

    # -- balance operations ----------------------------------------------------------------

    def freeze(
        self,
        operation_id: str,
        withdrawal_id: str,
        provider_id: str,
        amount: Decimal,
        currency: str,
    ) -> OperationState:
        """Hold ``amount`` on the provider's float; a repeat answers the current state."""
        existing = self.operations.get(operation_id)
        if existing is not None:
            same = (
                existing.withdrawal_id == withdrawal_id
                and existing.provider_id == provider_id
                and existing.amount == amount
                and existing.currency == currency
            )
            if not same:
                existing.record("freeze", "409 operation_conflict")
                self._violate(
                    FREEZE_CONFLICT,
                    "freeze repeated with a different withdrawal, provider, amount or currency",
                    operation_id=operation_id,
                    withdrawal_id=withdrawal_id,
                )
                raise LedgerError(
                    409,
                    "operation_conflict",
                    "operation_id was already used for a different freeze",
                )
            # Idempotent replay: never a second hold for one operation_id.
            existing.record("freeze", existing.state)
            return existing.state
        if amount > self.available(provider_id):
            self.refusals[operation_id] = (
                f"freeze of {amount} {currency} on {provider_id} refused: insufficient_balance"
            )
            raise LedgerError(
                409, "insufficient_balance", f"provider {provider_id} cannot cover {amount}"
            )
        self.refusals.pop(operation_id, None)
        op = Operation(
            operation_id=operation_id,
            withdrawal_id=withdrawal_id,
            provider_id=provider_id,
            amount=amount,
            currency=currency,
            state="frozen",
            frozen_at=self._clock(),
        )
        op.record("freeze", "frozen")
        self.operations[operation_id] = op
        self._open[operation_id] = op
        self._held[provider_id] = self.held(provider_id) + amount
        return "frozen"

    def commit(self, operation_id: str) -> OperationState:
        """Debit the provider's float for a frozen operation; a repeat answers committed."""
        op = self._known(operation_id, "commit")
        if op.state == "committed":
            op.record("commit", "committed")
            return "committed"
        if op.state == "rolled_back":
            op.record("commit", "409 invalid_state")
            self._violate(
                COMMIT_AFTER_ROLLBACK,
                "commit of an operation that was rolled back",
                operation_id=operation_id,
                withdrawal_id=op.withdrawal_id,
            )
            raise LedgerError(409, "invalid_state", "operation was rolled back")
        others = self._committed.setdefault(op.withdrawal_id, [])
        if others:
            # Still committed: each operation is a separate hold, and recording what really
            # happened (the money moved twice) is the point of the violation.
            self._violate(
                DOUBLE_COMMIT,
                f"withdrawal already has committed operation(s) {', '.join(others)}",
                operation_id=operation_id,
                withdrawal_id=op.withdrawal_id,
            )
        others.append(operation_id)
        self._floats[op.provider_id] = self.float_of(op.provider_id) - op.amount
        op.state = "committed"
        self._close(op)
        op.record("commit", "committed")
        return "committed"

    def rollback(self, operation_id: str) -> OperationState:
        """Release a frozen operation's hold; a repeat answers rolled_back."""
        op = self._known(operation_id, "rollback")
        if op.state == "rolled_back":
            op.record("rollback", "rolled_back")
            return "rolled_back"
        if op.state == "committed":
            op.record("rollback", "409 invalid_state")
            self._violate(
                ROLLBACK_AFTER_COMMIT,
                "rollback of an operation that was committed",
                operation_id=operation_id,
                withdrawal_id=op.withdrawal_id,
            )
            raise LedgerError(409, "invalid_state", "operation was committed")
        op.state = "rolled_back"
        self._close(op)
        op.record("rollback", "rolled_back")
        return "rolled_back"

    def state_of(self, operation_id: str) -> OperationState | None:
        op = self.operations.get(operation_id)
        return None if op is None else op.state

    def _known(self, operation_id: str, action: str) -> Operation:
        op = self.operations.get(operation_id)
        if op is None:
            refused = self.refusals.get(operation_id)
            detail = f"{action} of an operation that was never frozen"
            if refused is not None:
                detail += f" ({refused})"
            self._violate(UNKNOWN_OPERATION, detail, operation_id=operation_id)
            raise LedgerError(404, "not_found", "unknown operation_id")
        return op

    def _close(self, op: Operation) -> None:
        """Release the hold of a freeze that was just committed or rolled back."""
        self._open.pop(op.operation_id, None)
        self._held[op.provider_id] = self.held(op.provider_id) - op.amount
        op.closed_at = self._clock()
        # A freeze closed after the bound was open too long even if nobody read the ledger
        # while it was open.
        if op.closed_at - op.frozen_at > self.open_freeze_bound_seconds:
            self._flag_open_too_long(op, op.closed_at - op.frozen_at)

    # -- notifications ---------------------------------------------------------------------

    def notify(self, idempotency_key: str, body: Any) -> bool:
        """Record a withdrawal notification once per key; ``True`` when it is the first."""
        count = self.notification_deliveries.get(idempotency_key, 0)
        self.notification_deliveries[idempotency_key] = count + 1
        if count:
            return False
        self.notifications.append(body)
        withdrawal_id = body.get("withdrawal_id") if isinstance(body, dict) else None
        status = body.get("status") if isinstance(body, dict) else None
        if not isinstance(withdrawal_id, str) or not isinstance(status, str):
            key_wid, _, key_status = idempotency_key.rpartition(":")
            withdrawal_id = withdrawal_id if isinstance(withdrawal_id, str) else key_wid
            status = status if isinstance(status, str) else key_status
        if idempotency_key != f"{withdrawal_id}:{status}":
            self._violate(
                NOTIFICATION_KEY_MISMATCH,
                f"Idempotency-Key {idempotency_key!r} does not match body {withdrawal_id}:{status}",
                withdrawal_id=withdrawal_id,
            )
        if status not in FINAL_NOTIFICATION_STATUSES:
            self._violate(
                NON_FINAL_NOTIFICATION,
                f"notification with non-final status {status!r}",
                withdrawal_id=withdrawal_id,
            )
            return True
        seen = self._final_statuses.setdefault(withdrawal_id, [])
        if status not in seen:
            if seen:
                self._violate(
                    CONFLICTING_NOTIFICATIONS,
                    f"final status {status} after {', '.join(seen)}",
                    withdrawal_id=withdrawal_id,
                )
            seen.append(status)
        return True

    # -- invariants and reading ------------------------------------------------------------

    def check_open_freezes(self) -> None:
        """Flag (once each) freezes open longer than the bound; runs on every read."""
        now = self._clock()
        for op in self._open.values():
            if now - op.frozen_at > self.open_freeze_bound_seconds:
                self._flag_open_too_long(op, now - op.frozen_at)

    def _flag_open_too_long(self, op: Operation, seconds: float) -> None:
        if op.operation_id in self._flagged_open:
            return
        self._flagged_open.add(op.operation_id)
        self._violate(
            FREEZE_OPEN_TOO_LONG,
            f"freeze open {seconds:.3f}s, bound {self.open_freeze_bound_seconds}s",
            operation_id=op.operation_id,
            withdrawal_id=op.withdrawal_id,
        )

    def _violate(
        self,
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
        self.violations.append(violation)

    def snapshot(self) -> dict[str, Any]:
        """The ledger as ``GET /sandbox/core/ledger`` shows it (open freezes checked first)."""
        self.check_open_freezes()
        providers = sorted(self._floats)  # every provider a freeze touched is in here
        return {
            "operations": {op_id: op.state for op_id, op in self.operations.items()},
            "operation_details": {
                op_id: {
                    "withdrawal_id": op.withdrawal_id,
                    "provider_id": op.provider_id,
                    "amount": str(op.amount),
                    "currency": op.currency,
                    "state": op.state,
                    "history": list(op.history),
                }
                for op_id, op in self.operations.items()
            },
            "refusals": dict(self.refusals),
            "notifications": list(self.notifications),
            "notification_deliveries": dict(self.notification_deliveries),
            "violations": [msgspec.to_builtins(v) for v in self.violations],
            "floats": {p: str(self.float_of(p)) for p in providers},
            "available": {p: str(self.available(p)) for p in providers},
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
                state = ledger.freeze(
                    body.operation_id, body.withdrawal_id, body.provider_id, amount, body.currency
                )
            except BadRequestError as exc:
                return exc.response()
            except LedgerError as exc:
                return error_response(exc.status, exc.code, exc.message)
            return json_response(200, {"operation_id": body.operation_id, "state": state})

        async def settle(
            request: Request[Any, Any, Any], apply: Callable[[str], OperationState]
        ) -> Response[bytes]:
            refused = await sim._guard(request)
            if refused is not None:
                return refused
            try:
                body = decode_body(await request.body(), _OperationBody)
                _require_ids(operation_id=body.operation_id)
                state = apply(body.operation_id)
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
            state = ledger.state_of(operation_id)
            if state is None:
                return error_response(404, "not_found", "unknown operation_id")
            return json_response(200, {"operation_id": operation_id, "state": state})

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
            first = ledger.notify(key, body)
            return json_response(200, {"status": "ok", "first_delivery": first})

        @get("/ledger")
        async def read_ledger() -> Response[bytes]:
            snapshot = ledger.snapshot()
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
                notification,
                read_ledger,
                set_faults,
            ],
        )

    def faults_view(self) -> dict[str, float]:
        return {
            "fault_500_ratio": self.faults.fault_500_ratio,
            "timeout_ratio": self.faults.timeout_ratio,
            "timeout_seconds": self.faults.timeout_seconds,
        }
