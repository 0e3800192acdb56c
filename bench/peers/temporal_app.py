"""The Temporal peer's processes: ``worker`` (workflows + activities) and ``api`` (the HTTP
front door: ``POST /v1/withdrawals`` starts a workflow, ``POST /webhooks/{provider_id}``
verifies the Standard Webhooks signature and signals the workflow).

``python -m bench.peers.temporal_app worker|api``; reads TEMPORAL_ADDRESS, SANDBOX_URL,
CORE_TOKEN, PROVIDERS_FILE and (api) HTTP_PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from aiohttp import web
from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError
from temporalio.worker import Worker

from bench.peers.flow import (
    FINAL_STATUSES,
    Attempt,
    Created,
    Refused,
    Sandbox,
    env_path,
    verified_webhook,
    withdrawal_from_request,
    withdrawal_of_order,
)
from bench.peers.temporal_workflow import TASK_QUEUE, Notification, Webhook, WithdrawalWorkflow
from contracts.signatures import SignatureError


class Activities:
    """Every effect of the flow; Retryable errors are retried by the workflow's policy."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    @activity.defn(name="freeze")
    async def freeze(self, step: Attempt) -> str:
        try:
            return await self.sandbox.freeze(step)
        except Refused as exc:
            raise ApplicationError(str(exc), type="Refused", non_retryable=True) from exc

    @activity.defn(name="create")
    async def create(self, step: Attempt) -> Created:
        return await self.sandbox.create(step)

    @activity.defn(name="status")
    async def status(self, step: Attempt) -> str:
        return await self.sandbox.status(step)

    @activity.defn(name="commit")
    async def commit(self, step: Attempt) -> str:
        await self.sandbox.commit(step)
        return "committed"

    @activity.defn(name="rollback")
    async def rollback(self, step: Attempt) -> str:
        await self.sandbox.rollback(step)
        return "rolled_back"

    @activity.defn(name="notify")
    async def notify(self, notification: Notification) -> None:
        await self.sandbox.notify(
            notification.withdrawal_id, notification.status, notification.provider_id
        )


def _sandbox() -> Sandbox:
    return Sandbox(os.environ["SANDBOX_URL"], os.environ["CORE_TOKEN"], env_path("PROVIDERS_FILE"))


async def run_worker() -> None:
    client = await Client.connect(os.environ["TEMPORAL_ADDRESS"])
    acts = Activities(_sandbox())
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[WithdrawalWorkflow],
        activities=[acts.freeze, acts.create, acts.status, acts.commit, acts.rollback, acts.notify],
    )
    await worker.run()


async def run_api() -> None:
    client = await Client.connect(os.environ["TEMPORAL_ADDRESS"])
    providers = _sandbox().providers

    async def create(request: web.Request) -> web.Response:
        withdrawal = withdrawal_from_request(await request.read(), providers)
        # A retried create is the same withdrawal: the workflow id refuses a second start.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await client.start_workflow(
                WithdrawalWorkflow.run,
                withdrawal,
                id=withdrawal.withdrawal_id,
                task_queue=TASK_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
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
        handle: WorkflowHandle[WithdrawalWorkflow, str] = client.get_workflow_handle(
            withdrawal_of_order(hook.order_id)
        )
        try:
            await handle.signal(
                WithdrawalWorkflow.provider_webhook, Webhook(hook.order_id, hook.status)
            )
        except RPCError:
            # The workflow has already finished (a synchronous success's late webhook).
            return web.json_response({"result": "duplicate", "message": ""})
        return web.json_response({"result": "accepted", "message": ""})

    app = web.Application()
    app.router.add_post("/v1/withdrawals", create)
    app.router.add_post("/webhooks/{provider_id}", webhook)
    app.router.add_get("/readyz", lambda _r: _ok())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(os.environ["HTTP_PORT"])).start()
    await asyncio.Event().wait()


async def _ok() -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    role = sys.argv[1]
    asyncio.run(run_worker() if role == "worker" else run_api())


if __name__ == "__main__":
    main()
