"""The worker's concurrency bound holds for timer batches and what they hand back.

Pure scheduling logic: the engine and the messages are stand-ins (what the handlers do is
covered against the real broker and database in tests/integration/test_timer_batches.py).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import Any, cast

import msgspec

from contracts.messages import TaskMessage
from orchestrator import bus
from orchestrator.engine import Engine, TimerDue
from orchestrator.worker import Worker
from tests.waiting import wait_until

NAMES = bus.Names("t.")


class _Msg:
    def __init__(self, subject: str) -> None:
        self.subject = NAMES.subject(subject)
        self.data = msgspec.json.encode(TaskMessage(task_id=uuid.uuid4(), queue_id=uuid.uuid4()))
        self.headers: dict[str, str] | None = None
        self.acked = False

    async def ack(self) -> None:
        self.acked = True


class _Engine:
    """Applies every other firing in the batch, hands back the rest."""

    names = NAMES

    async def timers_fired(self, due: list[TimerDue]) -> list[TimerDue]:
        return due[::2]


async def test_handed_back_timers_wait_for_the_workers_slots() -> None:
    worker = Worker(
        engine=cast(Engine, _Engine()), js=cast(Any, None), core=cast(Any, None), concurrency=3
    )
    active = peak = 0
    go = asyncio.Event()
    handled: list[_Msg] = []

    async def handle(msg: _Msg, _slot: object = None) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await go.wait()
        active -= 1
        handled.append(msg)

    worker._handle = handle  # type: ignore[method-assign,assignment]
    msgs = [_Msg(bus.WEBHOOK_TIMEOUT) for _ in range(20)]
    await worker._spawn(functools.partial(worker._handle_timers, msgs))  # type: ignore[arg-type]

    await wait_until(
        lambda: active,
        done=lambda running: running == 3,
        timeout=15,
        interval=0.05,
        what="three handed-back timers running",
    )
    # The batch released its own slot; the three slots are all taken by handed-back timers,
    # and the other seven wait for one instead of running beside them.
    assert [m.acked for m in msgs] == [i % 2 == 1 for i in range(20)]
    assert worker._slots.locked(), "the consumer must see no free slot while they run"
    go.set()

    await wait_until(
        lambda: len(handled),
        done=lambda count: count == 10,
        timeout=15,
        interval=0.05,
        what="every handed-back timer handled",
    )
    assert peak == 3
    assert {id(m) for m in handled} == {id(m) for i, m in enumerate(msgs) if i % 2 == 0}
    await asyncio.gather(*worker._running)
