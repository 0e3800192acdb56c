"""The withdrawal cascade on DBOS: ``@DBOS.workflow`` + ``@DBOS.step``, webhooks as messages.

As DBOS's documentation writes an app: the library runs inside the application processes, its
state in Postgres. Laid out as DBOS scales out on one Postgres (and as ours is laid out): one
``api`` process, the front door (``POST /v1/withdrawals`` enqueues the workflow on the
``withdrawals`` queue with the withdrawal id as its workflow id; ``POST /webhooks/{provider_id}``
verifies the Standard Webhooks signature and ``DBOS.send``s the outcome to that workflow on the
order's topic), which listens to no queue; and ``worker`` processes that dequeue and run the
workflows, each at most ``DBOS_WORKER_CONCURRENCY`` at once (the queue's
``worker_concurrency``). Every process has its own executor id (``DBOS_EXECUTOR_ID``), so that
after a ``kill -9`` a worker started again with the same id recovers exactly its own pending
workflows (``DBOS.launch``).

Every effect is a step with DBOS's retries for the retryable errors; the workflow waits for the
webhook with ``DBOS.recv`` up to the provider's SLA, then polls the order's status.

``python -m bench.peers.dbos_app api|worker``; reads DBOS_DATABASE_URL, DBOS_EXECUTOR_ID,
DBOS_WORKER_CONCURRENCY, DBOS_QUEUE_POLL_SECONDS, SANDBOX_URL, CORE_TOKEN, PROVIDERS_FILE and
HTTP_PORT.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web
from dbos import DBOS, DBOSConfig, SetWorkflowID

from bench.peers.flow import (
    FINAL_STATUSES,
    Attempt,
    Created,
    Refused,
    Retryable,
    Sandbox,
    Withdrawal,
    attempt,
    env_path,
    verified_webhook,
    withdrawal_from_request,
    withdrawal_of_order,
)
from contracts.signatures import SignatureError

SANDBOX = (
    Sandbox(
        os.environ.get("SANDBOX_URL", "http://127.0.0.1:0/sandbox"),
        os.environ.get("CORE_TOKEN", ""),
        env_path("PROVIDERS_FILE"),
    )
    if "PROVIDERS_FILE" in os.environ
    else None
)


def _sandbox() -> Sandbox:
    assert SANDBOX is not None, "PROVIDERS_FILE is not set"
    return SANDBOX


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, Retryable)


RETRIES = {
    "retries_allowed": True,
    "interval_seconds": 0.1,
    "backoff_rate": 2.0,
    "max_attempts": 8,
    "should_retry": _retryable,
}


@DBOS.step(**RETRIES)  # type: ignore[arg-type]
async def freeze(step: Attempt) -> str:
    try:
        return await _sandbox().freeze(step)
    except Refused:
        return "refused"  # e.g. insufficient_balance: no hold, next provider


@DBOS.step()
async def create(step: Attempt) -> Created:
    return await _sandbox().create(step)


@DBOS.step(**RETRIES)  # type: ignore[arg-type]
async def order_status(step: Attempt) -> str:
    return await _sandbox().status(step)


@DBOS.step(**RETRIES)  # type: ignore[arg-type]
async def commit(step: Attempt) -> None:
    await _sandbox().commit(step)


@DBOS.step(**RETRIES)  # type: ignore[arg-type]
async def rollback(step: Attempt) -> None:
    await _sandbox().rollback(step)


@DBOS.step(**RETRIES)  # type: ignore[arg-type]
async def notify(withdrawal_id: str, status: str, provider_id: str) -> None:
    await _sandbox().notify(withdrawal_id, status, provider_id)


async def _wait_for_outcome(withdrawal: Withdrawal, step: Attempt) -> str:
    outcome = await DBOS.recv_async(topic=step.order_id, timeout_seconds=withdrawal.sla_seconds)
    if outcome is not None:
        return str(outcome)
    for _ in range(withdrawal.max_polls):
        status = await order_status(step)
        if status != "pending":
            return str(status)
        outcome = await DBOS.recv_async(
            topic=step.order_id, timeout_seconds=withdrawal.poll_interval
        )
        if outcome is not None:
            return str(outcome)
    return "manual_check"


async def _attempt(withdrawal: Withdrawal, step: Attempt) -> str:
    held = await freeze(step)
    if held == "refused":
        return "skipped"
    if held == "committed":
        return "succeeded"
    if held == "rolled_back":
        return "failed"
    outcome = (await create(step)).outcome
    if outcome == "ambiguous":
        # The order may exist: its status decides (404 proves it absent).
        await DBOS.sleep_async(0.5)
        outcome = await order_status(step)
    if outcome == "pending":
        outcome = await _wait_for_outcome(withdrawal, step)
    if outcome == "succeeded":
        await commit(step)
        return "succeeded"
    if outcome in ("declined", "failed", "cancelled", "absent"):
        await rollback(step)
        return "failed"
    return "manual_check"


@DBOS.workflow()
async def withdrawal_workflow(withdrawal: Withdrawal) -> str:
    """freeze → create → webhook (or a synchronous answer) → commit → notify; a decline →
    rollback → next provider; an ambiguous create → status recheck."""
    for index in range(len(withdrawal.providers)):
        step = attempt(withdrawal, index)
        outcome = await _attempt(withdrawal, step)
        if outcome == "succeeded":
            await notify(withdrawal.withdrawal_id, "succeeded", step.provider_id)
            return "succeeded"
        if outcome == "manual_check":
            return "manual_check"  # money may have moved: the freeze stays, a human decides
    await notify(withdrawal.withdrawal_id, "failed", "")
    return "failed"


QUEUE = "withdrawals"


async def serve(role: str) -> None:
    config: DBOSConfig = {
        "name": "cascade-peer",
        "system_database_url": os.environ["DBOS_DATABASE_URL"],
        "executor_id": os.environ["DBOS_EXECUTOR_ID"],
        "log_level": "WARNING",
    }
    DBOS(config=config)
    if role == "api":
        DBOS.listen_queues([])  # the front door enqueues; the workers dequeue
    DBOS.launch()
    # Registered (persisted) by every process, the same settings each time: whichever starts
    # first creates the queue.
    await DBOS.register_queue_async(
        QUEUE,
        worker_concurrency=int(os.environ.get("DBOS_WORKER_CONCURRENCY", "100")),
        polling_interval_sec=float(os.environ.get("DBOS_QUEUE_POLL_SECONDS", "0.1")),
    )
    providers = _sandbox().providers

    async def create_withdrawal(request: web.Request) -> web.Response:
        withdrawal = withdrawal_from_request(await request.read(), providers)
        # The withdrawal id is the workflow id: a retried create enqueues nothing new.
        with SetWorkflowID(withdrawal.withdrawal_id):
            await DBOS.enqueue_workflow_async(QUEUE, withdrawal_workflow, withdrawal)
        return web.json_response({"withdrawal_id": withdrawal.withdrawal_id}, status=201)

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            hook = verified_webhook(
                providers, request.match_info["provider_id"], request.headers, body
            )
        except SignatureError as exc:
            return web.json_response({"result": "rejected", "message": str(exc)}, status=401)
        if hook.status not in FINAL_STATUSES:
            return web.json_response({"result": "progress", "message": ""})
        await DBOS.send_async(
            withdrawal_of_order(hook.order_id),
            hook.status,
            topic=hook.order_id,
            idempotency_key=request.headers.get("webhook-id"),
        )
        return web.json_response({"result": "accepted", "message": ""})

    async def ready(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    if role == "api":
        app.router.add_post("/v1/withdrawals", create_withdrawal)
        app.router.add_post("/webhooks/{provider_id}", webhook)
    app.router.add_get("/readyz", ready)  # a worker's port serves only this, for the bench
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(os.environ["HTTP_PORT"])).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "api"))
