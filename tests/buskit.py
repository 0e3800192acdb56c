"""What the bus and worker tests share: a stack where nothing moves unless the test moves it,
and a look at the DLQ."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.messages import DeadLetter
from orchestrator import bus
from orchestrator.worker import Worker
from tests.conftest import Stack, providers_document
from tests.waiting import wait_until

SILENT = "sbx_silent"


def parked_providers() -> dict[str, Any]:
    """``sbx_silent`` with a long SLA and no polling: nothing moves a task unless the test does."""
    doc = providers_document()
    doc["providers"][SILENT]["webhook_sla_seconds"] = 600
    doc["providers"][SILENT]["status_polling"] = None
    return doc


def sweepless_worker(stack: Stack) -> Worker:
    """A worker like the stack's, whose sweeper leaves stranded tasks alone for an hour."""
    return Worker(
        engine=stack.runtime.engine,
        js=stack.runtime.js,
        core=stack.runtime.core,
        sweep_interval=0.5,
        stranded_after=3600.0,
        timer_grace=1.0,
    )


async def dead_letters(stack: Stack) -> list[DeadLetter]:
    js, names = stack.runtime.js, stack.runtime.relay.names
    info = await js.stream_info(names.dlq_stream)
    if not info.state.messages:
        return []
    letters = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(names.dlq_stream, seq)
        letters.append(msgspec.json.decode(raw.data or b"", type=DeadLetter))
    return letters


async def outbox_empty(stack: Stack) -> None:
    async def rows() -> int:
        async with stack.runtime.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM outbox"))

    await wait_until(rows, done=lambda n: n == 0, timeout=15, what="the outbox to be empty")


async def purge_starts(stack: Stack) -> None:
    """Drop the start messages on the stack's stream (the test starts the tasks its own way)."""
    names = stack.runtime.relay.names
    await stack.runtime.js.purge_stream(names.stream, subject=names.subject(bus.TASK_START))
