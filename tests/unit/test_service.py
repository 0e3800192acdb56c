"""The application service's pure parts: the new aggregate, and its decisions on replays,
cancels and manual checks."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from contracts.legacy import CreateWithdrawal, parse_create_withdrawal
from contracts.provider import provider_order_id
from contracts.providers_file import ProviderConfig
from flags.router import Cohort, RoutingDecision
from gateway.service import (
    DuplicateWithdrawal,
    IdempotencyConflict,
    NotCancellable,
    NotInManualCheck,
    UnknownTask,
    check_resolvable,
    must_cancel,
    new_withdrawal,
    providers_to_try,
    replayed,
)
from orchestrator.domain import OrderQueue, OrderTask, QueueState, TaskState
from orchestrator.ports import utcnow
from orchestrator.store.views import Claim

NOW = datetime(2026, 11, 5, 12, 30, tzinfo=UTC)
QUEUE_ID = uuid.UUID(int=1)
TASK_IDS = [uuid.UUID(int=n) for n in range(2, 5)]
DIGEST = b"\x01" * 32


def _request(*providers: str) -> CreateWithdrawal:
    body = {
        "withdrawal_id": "wd_1",
        "merchant_id": "m_1001",
        "amount": "250.00",
        "currency": "EUR",
        "destination": {"type": "iban", "account": "DE89370400440532013000", "holder": "J"},
        "cascade": [{"provider_id": p, "fee": f"0.{n}0"} for n, p in enumerate(providers, start=1)],
        "metadata": {"b": "2", "a": "1"},
    }
    parsed = parse_create_withdrawal(json.dumps(body).encode())
    assert isinstance(parsed, CreateWithdrawal), parsed
    return parsed


def _decision(cohort: Cohort) -> RoutingDecision:
    return RoutingDecision(
        cohort=cohort,
        reason="allow_list" if cohort == "cascade" else "not_targeted",
        flag_state={"source": "file"},
    )


def test_a_cascade_withdrawal_gets_a_pending_task_per_provider_in_order() -> None:
    request = _request("p_a", "p_b", "p_c")
    new = new_withdrawal(
        request,
        _decision("cascade"),
        idempotency_key="key-1",
        request_sha256=DIGEST,
        trace_id="t" * 32,
        queue_id=QUEUE_ID,
        task_ids=TASK_IDS,
        now=NOW,
        providers={},
    )
    queue = new.queue.queue
    assert queue.queue_id == QUEUE_ID
    assert queue.withdrawal_id == "wd_1"
    assert (queue.state, queue.version) == (QueueState.ACTIVE, 1)
    assert not queue.cancel_requested
    assert not queue.stop_requested
    assert [t.task_id for t in queue.tasks] == TASK_IDS
    assert [t.position for t in queue.tasks] == [0, 1, 2]
    assert [t.provider_id for t in queue.tasks] == ["p_a", "p_b", "p_c"]
    assert {(t.state, t.version, t.queue_id) for t in queue.tasks} == {
        (TaskState.PENDING, 1, QUEUE_ID)
    }
    assert [t.provider_order_id for t in queue.tasks] == [f"cg-{i.hex}" for i in TASK_IDS]
    assert new.fees == (Decimal("0.10"), Decimal("0.20"), Decimal("0.30"))
    assert (new.queue.created_at, new.queue.updated_at, new.queue.finished_at) == (NOW, NOW, None)


def test_the_record_keeps_the_request_and_the_routing_decision() -> None:
    request = _request("p_a", "p_b")
    decision = _decision("cascade")
    record = new_withdrawal(
        request,
        decision,
        idempotency_key="key-1",
        request_sha256=DIGEST,
        trace_id="t" * 32,
        queue_id=QUEUE_ID,
        task_ids=TASK_IDS[:2],
        now=NOW,
        providers={},
    ).record
    assert record.withdrawal_id == "wd_1"
    assert record.merchant_id == "m_1001"
    assert (record.amount, record.currency) == (Decimal("250.00"), "EUR")
    assert record.destination == {
        "type": "iban",
        "account": "DE89370400440532013000",
        "holder": "J",
    }
    assert record.metadata == b'{"b":"2","a":"1"}'  # request order, exact
    assert record.cascade == [
        {"provider_id": "p_a", "fee": "0.10"},
        {"provider_id": "p_b", "fee": "0.20"},
    ]
    assert (record.idempotency_key, record.request_sha256) == ("key-1", DIGEST)
    assert (record.cohort, record.routing_reason) == ("cascade", "allow_list")
    assert record.flag_state == {"source": "file"}
    assert (record.trace_id, record.created_at) == ("t" * 32, NOW)


def test_a_legacy_withdrawal_tries_only_the_cheapest_provider_but_stores_the_cascade() -> None:
    request = _request("p_a", "p_b", "p_c")
    assert [e.provider_id for e in providers_to_try(request, "legacy")] == ["p_a"]
    new = new_withdrawal(
        request,
        _decision("legacy"),
        idempotency_key=None,
        request_sha256=DIGEST,
        trace_id="t" * 32,
        queue_id=QUEUE_ID,
        task_ids=TASK_IDS[:1],
        now=NOW,
        providers={},
    )
    assert [t.provider_id for t in new.queue.queue.tasks] == ["p_a"]
    assert new.fees == (Decimal("0.10"),)
    assert len(new.record.cascade) == 3


def test_provider_order_ids_respect_each_providers_key_limit() -> None:
    short = ProviderConfig(base_url="http://p", idempotency_key_max_length=20)
    new = new_withdrawal(
        _request("p_short", "p_unknown"),
        _decision("cascade"),
        idempotency_key=None,
        request_sha256=DIGEST,
        trace_id="t" * 32,
        queue_id=QUEUE_ID,
        task_ids=TASK_IDS[:2],
        now=NOW,
        providers={"p_short": short},
    )
    first, second = new.queue.queue.tasks
    assert first.provider_order_id == provider_order_id(TASK_IDS[0], 20)
    assert len(first.provider_order_id) == 20
    assert second.provider_order_id == provider_order_id(TASK_IDS[1], 64)


def test_one_task_id_per_provider_to_try_or_nothing_is_built() -> None:
    with pytest.raises(ValueError, match="zip"):
        new_withdrawal(
            _request("p_a", "p_b"),
            _decision("cascade"),
            idempotency_key=None,
            request_sha256=DIGEST,
            trace_id="t" * 32,
            queue_id=QUEUE_ID,
            task_ids=TASK_IDS[:1],
            now=NOW,
            providers={},
        )


# --- replays ---------------------------------------------------------------------------------


def test_nothing_holds_the_id_or_the_key() -> None:
    assert replayed([], "key-1", DIGEST) is None
    assert replayed([], None, DIGEST) is None


def test_the_same_key_and_body_replay_the_earlier_withdrawal() -> None:
    claims = [Claim(withdrawal_id="wd_0", idempotency_key="key-1", request_sha256=DIGEST)]
    assert replayed(claims, "key-1", DIGEST) == "wd_0"


def test_the_key_with_another_body_is_a_conflict() -> None:
    claims = [Claim(withdrawal_id="wd_0", idempotency_key="key-1", request_sha256=DIGEST)]
    with pytest.raises(IdempotencyConflict):
        replayed(claims, "key-1", b"\x02" * 32)


def test_the_id_under_another_key_or_none_is_a_duplicate() -> None:
    claims = [Claim(withdrawal_id="wd_1", idempotency_key="key-0", request_sha256=DIGEST)]
    with pytest.raises(DuplicateWithdrawal):
        replayed(claims, "key-1", DIGEST)
    with pytest.raises(DuplicateWithdrawal):
        replayed(claims, None, DIGEST)


def test_the_keys_holder_wins_over_another_holding_the_id() -> None:
    claims = [
        Claim(withdrawal_id="wd_1", idempotency_key=None, request_sha256=b"\x03" * 32),
        Claim(withdrawal_id="wd_0", idempotency_key="key-1", request_sha256=DIGEST),
    ]
    assert replayed(claims, "key-1", DIGEST) == "wd_0"


# --- cancels and manual checks ---------------------------------------------------------------


def _queue(state: QueueState, *task_states: TaskState) -> OrderQueue:
    tasks = tuple(
        OrderTask(
            task_id=task_id,
            queue_id=QUEUE_ID,
            position=position,
            provider_id=f"p_{position}",
            state=task_state,
            version=2,
            provider_order_id=f"cg-{task_id.hex}",
        )
        for position, (task_id, task_state) in enumerate(zip(TASK_IDS, task_states, strict=False))
    )
    return OrderQueue(queue_id=QUEUE_ID, withdrawal_id="wd_1", state=state, version=3, tasks=tasks)


def test_a_processing_withdrawal_is_cancelled() -> None:
    assert must_cancel(_queue(QueueState.ACTIVE, TaskState.MANUAL_CHECK, TaskState.PENDING))


def test_a_cancelled_withdrawal_is_answered_as_it_is() -> None:
    assert not must_cancel(_queue(QueueState.CANCELLED, TaskState.CANCELLED))


@pytest.mark.parametrize(
    ("state", "task_state"),
    [(QueueState.COMPLETED, TaskState.SUCCEEDED), (QueueState.FAILED, TaskState.FAILED)],
)
def test_a_final_withdrawal_is_not_cancellable(state: QueueState, task_state: TaskState) -> None:
    with pytest.raises(NotCancellable):
        must_cancel(_queue(state, task_state))


def test_only_a_task_in_manual_check_is_resolvable() -> None:
    check_resolvable(TaskState.MANUAL_CHECK)
    with pytest.raises(UnknownTask):
        check_resolvable(None)
    with pytest.raises(NotInManualCheck, match=r"^Task is EXECUTING, not MANUAL_CHECK\.$"):
        check_resolvable(TaskState.EXECUTING)


def test_the_real_ports() -> None:
    assert utcnow().tzinfo is not None
