"""More concurrent handlers than database connections: work queues, it never deadlocks."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StackFactory, flags_document, new_id, withdrawal_body


@pytest.mark.parametrize("enabled", [True, False], ids=["cascade", "legacy"])
async def test_two_connections_serve_sixteen_handlers(
    make_stack: StackFactory, enabled: bool
) -> None:
    stack = await make_stack(flags=flags_document(enabled=enabled), env={"DATABASE_POOL_SIZE": "2"})
    ids = [new_id() for _ in range(24)]
    responses = await asyncio.gather(
        *[
            stack.client.post(
                "/v1/withdrawals",
                headers=stack.headers,
                json=withdrawal_body(wid, ["sbx_decline", "sbx_sync_ok"]),
            )
            for wid in ids
        ]
    )
    assert [r.status_code for r in responses] == [201] * len(ids)
    finals = await asyncio.gather(*[stack.wait_final(wid, timeout=60) for wid in ids])
    expected = "succeeded" if enabled else "failed"
    assert {f["status"] for f in finals} == {expected}
    assert (await stack.ledger())["violations"] == []
