"""The worker process's own HTTP surface: liveness, readiness and metrics (WORKER_METRICS_PORT)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from devstack.embedded import free_port
from tests.conftest import StackFactory, new_id, withdrawal_body
from tests.faultkit import worker_process
from tests.waiting import wait_until


@pytest.mark.e2e
async def test_worker_serves_probes_and_metrics(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = await make_stack(with_worker=False)
    port = free_port()
    async with worker_process(
        stack, tmp_path / "worker.log", WORKER_METRICS_PORT=str(port)
    ) as proc:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=30, interval=0.05, what="the worker to be ready")
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            wid = new_id()
            response = await stack.client.post(
                "/v1/withdrawals", headers=stack.headers, json=withdrawal_body(wid, ["sbx_silent"])
            )
            assert response.status_code == 201

            async def counted() -> float:
                # Test timers move it on quickly: whichever waiting state it is in, it counts.
                text = (await client.get("/metrics")).text
                counts = [
                    float(ln.rsplit(" ", 1)[1])
                    for ln in text.splitlines()
                    if ln.startswith("tasks_in_state{")
                ]
                return sum(counts)

            await wait_until(
                counted,
                done=lambda tasks: tasks == 1.0,
                timeout=20,
                interval=0.05,
                what="tasks_in_state to count the parked task",
            )
            text = (await client.get("/metrics")).text
            assert "task_oldest_in_state_seconds{" in text
            assert "dlq_size " in text
        assert await proc.stop() == 0
