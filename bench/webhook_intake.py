"""Webhook intake throughput: verified webhooks per second into JetStream.

Signed, valid ``sbx_ok`` webhooks for distinct references (so JetStream's duplicate window
drops none of them) go to ``POST /webhooks/sbx_ok`` of a ``cascade-gateway serve`` process
over ``BENCH_CONCURRENCY`` keep-alive connections. Every answer must be ``200 accepted``, and
afterwards the stream must hold every one of them: a webhook counts only once it is in
JetStream. The baseline is a bare Litestar JSON POST on the same server stack, loaded by the
same client in the same run. Rounds alternate the two and the best of each is kept (the
machine is noisy).

No worker runs: this measures the intake, not the orchestrator behind it.

Environment: ``BENCH_WEBHOOKS`` (default 5000), ``BENCH_CONCURRENCY`` (32), ``BENCH_ROUNDS`` (2).
"""

from __future__ import annotations

import json
import os
import secrets
import time

import msgspec
import nats
import uvloop

from bench.load import LoadResult, http_post, run_load
from bench.registry import Report, benchmark
from bench.stack import HOST, NAMESPACE, ROOT, BenchStack
from contracts.provider import ProviderWebhook
from contracts.signatures import sign
from orchestrator import bus

PROVIDER = "sbx_ok"
WARMUP = 300
PHASE_TIMEOUT = 120.0


def _setting(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise ValueError(f"{name} must be at least 1")
    return value


def _secret() -> str:
    doc = json.loads((ROOT / "config" / "providers.sandbox.json").read_text())
    secret: str = doc["providers"][PROVIDER]["webhook_secrets"][0]
    return secret


def signed_webhooks(port: int, count: int, secret: str) -> list[bytes]:
    """``count`` valid webhooks for distinct orders, signed now (well inside ±5 minutes)."""
    run = secrets.token_hex(4)
    timestamp = int(time.time())
    requests = []
    for i in range(count):
        body = msgspec.json.encode(
            ProviderWebhook(
                order_id=f"cg-bench-{run}-{i}",
                reference=f"{PROVIDER}-bench-{run}-{i}",
                status="succeeded",
            )
        )
        webhook_id = f"msg_{run}_{i}"
        headers = {
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, webhook_id, timestamp, body),
        }
        requests.append(http_post(HOST, port, f"/webhooks/{PROVIDER}", body, headers))
    return requests


def bare_posts(port: int, count: int) -> list[bytes]:
    body = msgspec.json.encode(
        ProviderWebhook(order_id="cg-bare", reference="bare", status="succeeded")
    )
    request = http_post(HOST, port, "/echo", body, {"Content-Type": "application/json"})
    return [request] * count


def _accepted(status: int, body: bytes) -> bool:
    return status == 200 and b'"accepted"' in body


async def _stream_count(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        names = bus.Names(NAMESPACE)
        subject = names.subject(bus.WEBHOOK_RECEIVED)
        info = await nc.jetstream().stream_info(names.stream, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)
    finally:
        await nc.close()


def _check(result: LoadResult, what: str) -> None:
    if result.statuses != {200: result.requests} or result.rejected_bodies:
        raise RuntimeError(
            f"{what}: expected {result.requests} × 200 accepted, got {dict(result.statuses)}"
            f" ({result.rejected_bodies} bodies not 'accepted')"
        )


@benchmark("webhook_intake", "verified webhooks/s into JetStream vs a bare Litestar JSON POST")
def webhook_intake() -> Report:
    count = _setting("BENCH_WEBHOOKS", 5000)
    concurrency = _setting("BENCH_CONCURRENCY", 32)
    rounds = _setting("BENCH_ROUNDS", 2)
    stack = BenchStack()
    try:
        stack.start()
        gateway = stack.gateway()
        bare = stack.bare_litestar()
        secret = _secret()

        async def measure() -> tuple[list[LoadResult], list[LoadResult], int, int]:
            async def load(requests: list[bytes], port: int) -> LoadResult:
                return await run_load(
                    HOST,
                    port,
                    requests,
                    concurrency=concurrency,
                    timeout=PHASE_TIMEOUT,
                    check=_accepted,
                )

            _check(await load(bare_posts(bare.port, WARMUP), bare.port), "bare warm-up")
            warm = await load(signed_webhooks(gateway.port, WARMUP, secret), gateway.port)
            _check(warm, "intake warm-up")
            bare_runs, intake_runs = [], []
            for _ in range(rounds):
                bare_run = await load(bare_posts(bare.port, count), bare.port)
                _check(bare_run, "bare Litestar")
                bare_runs.append(bare_run)
                intake_run = await load(signed_webhooks(gateway.port, count, secret), gateway.port)
                _check(intake_run, "webhook intake")
                intake_runs.append(intake_run)
            in_stream = await _stream_count(stack.nats_url)
            return bare_runs, intake_runs, in_stream, WARMUP + rounds * count

        bare_runs, intake_runs, in_stream, sent = uvloop.run(measure())
    finally:
        stack.close()
    if in_stream != sent:
        raise RuntimeError(f"JetStream holds {in_stream} webhook messages, {sent} were accepted")
    best_bare = max(bare_runs, key=lambda r: r.rate)
    best_intake = max(intake_runs, key=lambda r: r.rate)
    report = Report()
    report.add("intake_rate", "verified webhooks into JetStream", best_intake.rate, "req/s")
    report.add("intake_p50_ms", "  intake p50 latency", best_intake.percentile_ms(0.5), "ms")
    report.add("intake_p99_ms", "  intake p99 latency", best_intake.percentile_ms(0.99), "ms")
    report.add("bare_rate", "bare Litestar JSON POST (baseline)", best_bare.rate, "req/s")
    report.add("bare_p50_ms", "  bare p50 latency", best_bare.percentile_ms(0.5), "ms")
    report.add("bare_p99_ms", "  bare p99 latency", best_bare.percentile_ms(0.99), "ms")
    report.add("ratio", "intake / bare", best_intake.rate / best_bare.rate, "x")
    report.notes.append(
        f"{count} requests per run, {concurrency} connections, best of {rounds} rounds; "
        f"all {sent} accepted webhooks found in JetStream; client: bench/load.py in-process"
    )
    report.details = {
        "count": count,
        "concurrency": concurrency,
        "rounds": rounds,
        "intake_rates": [round(r.rate, 1) for r in intake_runs],
        "bare_rates": [round(r.rate, 1) for r in bare_runs],
        "webhooks_in_stream": in_stream,
    }
    return report
