"""The application service on the real stack, with its clock and ids fixed through its ports."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime

from contracts.legacy import CreateWithdrawal, parse_create_withdrawal
from gateway.service import WithdrawalService
from orchestrator import store
from tests.conftest import StackFactory, new_id, withdrawal_body

NOW = datetime(2026, 11, 5, 12, 30, tzinfo=UTC)


def fixed_clock() -> datetime:
    return NOW


class CountingIds:
    """Ids 1, 2, 3, … under a per-test prefix (ids are unique across the suite's database)."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().int & ~0xFFFF
        self.count = 0

    def __call__(self) -> uuid.UUID:
        self.count += 1
        return uuid.UUID(int=self.prefix + self.count)


async def test_create_uses_the_ports_for_ids_and_time(make_stack: StackFactory) -> None:
    stack = await make_stack()
    ids = CountingIds()
    service = WithdrawalService(stack.runtime, clock=fixed_clock, ids=ids)
    wid = new_id()
    body = json.dumps(withdrawal_body(wid, ["sbx_decline", "sbx_ok"])).encode()
    request = parse_create_withdrawal(body)
    assert isinstance(request, CreateWithdrawal)

    created = await service.create(
        request,
        idempotency_key=None,
        request_sha256=hashlib.sha256(body).digest(),
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )

    assert not created.replayed
    assert created.view.created_at == NOW
    async with stack.runtime.pool.acquire() as conn:
        loaded = await store.load_all(conn, withdrawal_id=wid)
    assert loaded is not None
    record, queue = loaded
    assert record.created_at == NOW
    assert queue.queue.queue_id == uuid.UUID(int=ids.prefix + 1)
    assert [t.task_id for t in queue.queue.tasks] == [
        uuid.UUID(int=ids.prefix + 2),
        uuid.UUID(int=ids.prefix + 3),
    ]
    final = await stack.wait_final(wid)
    assert final["status"] == "succeeded"
    assert final["provider_id"] == "sbx_ok"
    # Asked again with the same body under no key: the id is taken.
    replay = await stack.client.post(
        "/v1/withdrawals",
        content=body,
        headers={**stack.headers, "Content-Type": "application/json"},
    )
    assert replay.status_code == 409
    assert replay.json()["error"]["code"] == "duplicate_withdrawal"
