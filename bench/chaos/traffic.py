"""The chaos campaign's clients: creates, cancels and support's manual-check decisions.

Each behaves as its real counterpart would while the stack fails under it: cascade-core
retries a create with the same ``Idempotency-Key`` and body until it gets an answer (a
connection error, a timeout or a ``503`` says nothing was decided), a cancel likewise, and
support works the manual-check queue until it is empty, deciding each case one way or the
other. Every answer is counted by status; a ``5xx`` other than ``503`` is a defect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.chaos.fleet import API_TOKEN, OPS_TOKEN

# Every sandbox behaviour (sandbox/providers.py BEHAVIOURS but the scenario one) with its
# share of cascade slots: mostly payers, so that most withdrawals succeed.
PROVIDERS = {
    "sbx_ok": 5,
    "sbx_sync_ok": 3,
    "sbx_decline": 3,
    "sbx_accept_fail": 2,
    "sbx_silent": 1,
    "sbx_flaky": 2,
    "sbx_no_funds": 1,
    # Declines its first two creates of an order rate_limited: the same-provider retries.
    "sbx_rate_limited": 2,
}
RETRY_PAUSE = 0.3
GIVE_UP_AFTER = 180.0
CANCEL_SHARE = 0.05


@dataclass
class Tally:
    """Answers by kind, what was created, and the defects the clients saw."""

    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    resolutions: Counter[str] = field(default_factory=Counter)
    last_create_at: float = 0.0

    def server_errors(self) -> int:
        """Answers 5xx other than 503 (503 is the contract's "nothing decided, retry")."""
        return sum(
            n for key, n in self.statuses.items() if key[-3:].startswith("5") and key[-3:] != "503"
        )


class Clients:
    """The load: ``count`` withdrawals at ``rate`` per second over the gateways, in turn."""

    def __init__(self, gateway_urls: list[str], sandbox_url: str, *, seed: int) -> None:
        self.gateways = gateway_urls
        self.sandbox_url = sandbox_url
        self.rng = random.Random(f"{seed}:traffic")
        self.tally = Tally()
        self.session: aiohttp.ClientSession | None = None
        self._turn = 0

    async def __aenter__(self) -> Clients:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    def _gateway(self) -> str:
        self._turn += 1
        return self.gateways[self._turn % len(self.gateways)]

    async def call(
        self,
        kind: str,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None = None,
    ) -> tuple[int, Any]:
        """One request, answered or retried until answered; returns the status and JSON."""
        assert self.session is not None
        deadline = time.monotonic() + GIVE_UP_AFTER
        while True:
            try:
                async with self.session.request(
                    method, self._gateway() + path, data=body, headers=headers
                ) as response:
                    self.tally.statuses[f"{kind} {response.status}"] += 1
                    if response.status != 503:
                        text = await response.text()
                        return response.status, json.loads(text) if text else None
            except (aiohttp.ClientError, TimeoutError):
                self.tally.statuses[f"{kind} no answer"] += 1
            if time.monotonic() > deadline:
                self.tally.unexpected.append(f"{kind} {path}: no answer for {GIVE_UP_AFTER:.0f} s")
                return 0, None
            await asyncio.sleep(RETRY_PAUSE)

    # --- creates and cancels -----------------------------------------------------------------

    def cascade(self) -> list[dict[str, str]]:
        names = list(PROVIDERS)
        weights = list(PROVIDERS.values())
        chosen: list[str] = []
        for _ in range(self.rng.choice((1, 2, 2, 3, 3))):
            pick = self.rng.choices(names, weights)[0]
            if pick not in chosen:
                chosen.append(pick)
        return [{"provider_id": p, "fee": f"{0.5 + i:.2f}"} for i, p in enumerate(chosen)]

    async def create(self, index: int, run_id: str) -> None:
        wid = f"wd_{run_id}_{index:05d}"
        body = json.dumps(
            {
                "withdrawal_id": wid,
                "merchant_id": f"m_chaos_{index % 7}",
                "amount": f"{10 + index % 90}.00",
                "currency": "EUR",
                "destination": {"type": "iban", "account": "DE89370400440532013000"},
                "cascade": self.cascade(),
            }
        ).encode()
        status, answer = await self.call(
            "create",
            "POST",
            "/v1/withdrawals",
            {
                "Authorization": f"Bearer {API_TOKEN}",
                "Content-Type": "application/json",
                "Idempotency-Key": f"key-{wid}",
            },
            body,
        )
        self.tally.last_create_at = time.monotonic()
        if status not in (200, 201):
            self.tally.unexpected.append(f"create {wid}: {status} {answer}")
            return
        self.tally.created.append(wid)
        if self.rng.random() < CANCEL_SHARE:
            await asyncio.sleep(self.rng.uniform(0, 2))
            await self.cancel(wid)

    async def cancel(self, wid: str) -> None:
        status, answer = await self.call(
            "cancel",
            "POST",
            f"/v1/withdrawals/{wid}/cancel",
            {"Authorization": f"Bearer {API_TOKEN}"},
        )
        # 200: cancelled or cancelling; 409 not_cancellable: already final. Both are answers.
        if status not in (200, 409):
            self.tally.unexpected.append(f"cancel {wid}: {status} {answer}")

    async def offer(self, count: int, rate: float, run_id: str) -> None:
        """``count`` creates at ``rate`` per second, each on its own task."""
        started = time.monotonic()
        tasks = []
        for index in range(count):
            pause = started + index / rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            tasks.append(asyncio.create_task(self.create(index, run_id)))
        await asyncio.gather(*tasks)

    # --- support -----------------------------------------------------------------------------

    async def work_manual_checks(self, stop: asyncio.Event) -> None:
        """Decide every case in MANUAL_CHECK, about half each way, until ``stop`` is set."""
        ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
        while not stop.is_set():
            status, page = await self.call("manual-checks", "GET", "/ops/manual-checks", ops)
            for case in (page or {}).get("manual_checks", []) if status == 200 else []:
                await self.decide(case)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def decide(self, case: dict[str, Any]) -> None:
        """One of four ways, by the task id, so that each happens in every run:

        0. the provider pays (its webhook goes out), then support decides positive: the
           webhook races the decision;
        1. support decides positive, then the provider's payout shows (it had paid; its
           webhook and status lagged): commit first, confirmation after;
        2. support decides negative; the gateway checks with the provider first;
        3. the provider pays, and support decides negative as its webhook is still on its
           way through the workers: a late success racing a negative decision, which must
           end in one payout (the gateway asks the provider first: 409 provider_paid).
        Without a reference (the provider never accepted the order) every way is negative."""
        way = zlib.crc32(case["task_id"].encode()) % 4 if case.get("provider_reference") else 2
        if way in (0, 3) and not await self._pay_at_sandbox(case):
            return  # the provider did not pay: no decision this round
        status = await self._resolve(case, "positive" if way in (0, 1) else "negative")
        if way == 1 and status == 200:
            await self._pay_at_sandbox(case)

    async def _resolve(self, case: dict[str, Any], decision: str) -> int:
        task_id = case["task_id"]
        status, answer = await self.call(
            "resolve",
            "POST",
            f"/ops/tasks/{task_id}/resolve",
            {
                "Authorization": f"Bearer {OPS_TOKEN}",
                "X-Operator": "chaos",
                "Content-Type": "application/json",
            },
            json.dumps(
                {"decision": decision, "reason": "chaos campaign: provider statement checked"}
            ).encode(),
        )
        code = (answer or {}).get("error", {}).get("code") if status != 200 else None
        self.tally.resolutions[f"{decision} {status} {code or ''}".strip()] += 1
        if status not in (200, 409):
            self.tally.unexpected.append(f"resolve {task_id}: {status} {answer}")
        return status

    async def _pay_at_sandbox(self, case: dict[str, Any]) -> bool:
        """The provider pays the order (its webhook goes out); whether it did."""
        assert self.session is not None
        url = (
            f"{self.sandbox_url}/providers/{case['provider_id']}/orders/"
            f"{case['provider_reference']}/status"
        )
        async with self.session.post(url, json={"status": "succeeded"}) as response:
            self.tally.statuses[f"sandbox-pay {response.status}"] += 1
            if response.status != 200:
                self.tally.unexpected.append(f"sandbox set-status {url}: {response.status}")
            return response.status == 200
