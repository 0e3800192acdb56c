"""Baselines: what Postgres and JetStream alone do on this machine, in this run.

Every orchestrator figure is read against these, measured with the same client library on the
same embedded servers a moment earlier, so a ratio survives a slower or busier machine.

* **asyncpg transactions** — the write pattern of ``orchestrator/store.py``'s ``save_task``:
  ``BEGIN``, a version-checked ``UPDATE`` (must say ``UPDATE 1``), an audit ``INSERT`` with a
  JSON details column, ``COMMIT``: four round-trips. ``BASELINE_CONNECTIONS`` connections each
  run transactions back to back on rows of their own (no lock waits), as the worker's
  handlers do on distinct withdrawals. Own tables in their own database.
* **JetStream publish** — pipelined publishes of small messages to a file-storage stream of
  its own (like the orchestrator's), every ack checked: once lean (core ``publish`` with a
  reply subject, ``JS_PENDING`` in flight, acks counted by one wildcard subscription: what the
  server and the connection can do) and once through nats-py's ``js.publish_async`` (what the
  library costs on top).
* **JetStream pull-consume + ack** — what the worker's consumer loop does per message, with
  no handler work: ``fetch`` in batches, ``ack`` each.
* **HTTP client** — the orchestrator's balance, provider and notification calls go through
  ``orchestrator.http_client.HttpClient`` (aiohttp) as ``gateway/runtime.py`` configures it (200
  connections). ``HTTP_CALLS`` JSON POSTs to the bare Litestar app (``bench/bare_app.py``)
  over ``HTTP_CONCURRENCY`` concurrent calls: requests/s and the client's own CPU per request,
  next to httpx (what the client was before; kept to show why it changed) and
  ``bench/load.py``'s raw asyncio client on the same server.

The ``baselines`` benchmark prints the three on a fresh stack; ``bench.cascade`` and
``bench.timers`` measure them again on their own stacks, next to their figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import httpx
import msgspec
import nats
import uvloop
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from bench.load import http_post, run_load
from bench.registry import Report, benchmark
from bench.stack import HOST, BenchStack
from orchestrator.http_client import HttpClient, Timeouts

BASELINE_CONNECTIONS = 16
HTTP_CALLS = 2000
HTTP_CONCURRENCY = 16
PG_TRANSACTIONS = 4000
JS_MESSAGES = 40000
JS_CONSUME = 20000
JS_PENDING = 4000  # publish_async's in-flight window
STREAM = "BENCH_BASELINE"
SUBJECT = "bench.baseline.msg"


@dataclass(frozen=True)
class HttpClientCost:
    rate: float  # requests/s
    cpu_us: float  # client CPU per request, µs


@dataclass(frozen=True)
class Baselines:
    pg_tx_rate: float
    js_publish_rate: float
    js_publish_async_rate: float
    js_consume_rate: float
    client: HttpClientCost | None = None
    httpx: HttpClientCost | None = None
    raw_http: HttpClientCost | None = None

    def as_json(self) -> dict[str, float]:
        out = {
            "pg_tx_rate": round(self.pg_tx_rate, 1),
            "js_publish_rate": round(self.js_publish_rate, 1),
            "js_publish_async_rate": round(self.js_publish_async_rate, 1),
            "js_consume_rate": round(self.js_consume_rate, 1),
        }
        for name, cost in (
            ("client", self.client),
            ("httpx", self.httpx),
            ("raw_http", self.raw_http),
        ):
            if cost is not None:
                out[f"{name}_rate"] = round(cost.rate, 1)
                out[f"{name}_cpu_us"] = round(cost.cpu_us, 1)
        return out


def _admin_dsn(database_url: str) -> str:
    return database_url.rpartition("/")[0] + "/postgres"


async def _baseline_database(database_url: str) -> str:
    """A database of its own for the baseline tables (created once per stack)."""
    dsn = database_url.rpartition("/")[0] + "/baseline"
    conn = await asyncpg.connect(_admin_dsn(database_url))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'baseline'"):
            await conn.execute('CREATE DATABASE "baseline"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bl_tasks (task_id uuid PRIMARY KEY, state text NOT NULL,"
            " version integer NOT NULL, updated_at timestamptz NOT NULL)"
        )
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bl_events (event_id bigserial PRIMARY KEY,"
            " task_id uuid NOT NULL, from_state text, to_state text, event text NOT NULL,"
            " details jsonb NOT NULL, created_at timestamptz NOT NULL)"
        )
    finally:
        await conn.close()
    return dsn


async def pg_transaction_rate(
    database_url: str,
    *,
    transactions: int = PG_TRANSACTIONS,
    connections: int = BASELINE_CONNECTIONS,
) -> float:
    """Transactions/s of BEGIN + version-checked UPDATE + audit INSERT + COMMIT."""
    dsn = await _baseline_database(database_url)
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    assert pool is not None
    try:
        rows = [uuid.uuid4() for _ in range(connections)]
        now = datetime.now(UTC)
        await pool.executemany(
            "INSERT INTO bl_tasks (task_id, state, version, updated_at) VALUES ($1, 'A', 1, $2)",
            [(r, now) for r in rows],
        )
        per_connection = max(1, transactions // connections)
        details = msgspec.json.encode({"timer": "webhook_timeout", "attempt": 0}).decode()

        async def writer(task_id: uuid.UUID) -> None:
            version = 1
            async with pool.acquire() as conn:
                for i in range(per_connection):
                    state = "B" if i % 2 else "A"
                    async with conn.transaction():
                        status = await conn.execute(
                            "UPDATE bl_tasks SET state = $1, version = version + 1,"
                            " updated_at = $2 WHERE task_id = $3 AND version = $4",
                            state,
                            datetime.now(UTC),
                            task_id,
                            version,
                        )
                        if status != "UPDATE 1":
                            raise RuntimeError(f"baseline lost its own update: {status}")
                        await conn.execute(
                            "INSERT INTO bl_events (task_id, from_state, to_state, event,"
                            " details, created_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
                            task_id,
                            "A" if i % 2 else "B",
                            state,
                            "baseline.step",
                            details,
                            datetime.now(UTC),
                        )
                    version += 1

        started = time.perf_counter()
        await asyncio.gather(*(writer(r) for r in rows))
        seconds = time.perf_counter() - started
        return per_connection * connections / seconds
    finally:
        await pool.close()


async def _baseline_stream(js: JetStreamContext) -> None:
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(
        js_api.StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
        )
    )


async def publish_pipelined(
    nc: NatsClient,
    messages: Iterable[tuple[str, bytes, dict[str, str] | None]],
    *,
    window: int = JS_PENDING,
) -> int:
    """Publish to JetStream with up to ``window`` acks outstanding; every ack is checked.

    Core ``publish`` with a reply subject is exactly what a JetStream publish is on the wire;
    one wildcard subscription counts the acks. Returns how many were stored; raises if the
    server answered an error (wrong subject, bad schedule header...) for any of them.
    """
    slots = asyncio.Semaphore(window)
    counts = {"sent": 0, "acked": 0}
    errors: list[bytes] = []
    all_sent = asyncio.Event()
    all_acked = asyncio.Event()
    inbox = f"_BENCH.{uuid.uuid4().hex}"

    async def on_ack(msg: Msg) -> None:
        counts["acked"] += 1
        if b'"error"' in msg.data:
            errors.append(msg.data)
        slots.release()
        if all_sent.is_set() and counts["acked"] == counts["sent"]:
            all_acked.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack, pending_msgs_limit=10 * window)
    try:
        for subject, payload, headers in messages:
            await slots.acquire()
            await nc.publish(subject, payload, reply=f"{inbox}.{counts['sent']}", headers=headers)
            counts["sent"] += 1
        all_sent.set()
        if counts["acked"] < counts["sent"]:
            await asyncio.wait_for(all_acked.wait(), 120)
    finally:
        await sub.unsubscribe()
    if errors:
        raise RuntimeError(f"{len(errors)} publishes refused, first: {errors[0][:300]!r}")
    return counts["sent"]


def _payload() -> bytes:
    return msgspec.json.encode(
        {"task_id": str(uuid.uuid4()), "queue_id": str(uuid.uuid4()), "attempt": 0}
    )


async def js_publish_rate(nats_url: str, *, messages: int = JS_MESSAGES) -> float:
    """Acknowledged JetStream publishes/s, pipelined on the bare connection."""
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    try:
        await _baseline_stream(nc.jetstream())
        payload = _payload()
        started = time.perf_counter()
        await publish_pipelined(nc, ((SUBJECT, payload, None) for _ in range(messages)))
        return messages / (time.perf_counter() - started)
    finally:
        await nc.close()


async def js_publish_async_rate(nats_url: str, *, messages: int = JS_MESSAGES) -> float:
    """Acknowledged JetStream publishes/s through nats-py's ``js.publish_async``."""
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    try:
        js = nc.jetstream(publish_async_max_pending=JS_PENDING)
        await _baseline_stream(js)
        payload = _payload()
        futures = []
        started = time.perf_counter()
        for _ in range(messages):
            futures.append(await js.publish_async(SUBJECT, payload))
        acks = await asyncio.gather(*futures)
        seconds = time.perf_counter() - started
        if len(acks) != messages:
            raise RuntimeError(f"{len(acks)} of {messages} publishes acknowledged")
        return messages / seconds
    finally:
        await nc.close()


async def js_consume_rate(nats_url: str, *, messages: int = JS_CONSUME) -> float:
    """Messages/s through a durable pull consumer with explicit acks (batches of 100)."""
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    try:
        js = nc.jetstream()
        await _baseline_stream(js)
        payload = _payload()
        await publish_pipelined(nc, ((SUBJECT, payload, None) for _ in range(messages)))
        sub = await js.pull_subscribe(
            SUBJECT,
            durable="baseline",
            stream=STREAM,
            config=js_api.ConsumerConfig(ack_policy=js_api.AckPolicy.EXPLICIT),
        )
        done = 0
        started = time.perf_counter()
        while done < messages:
            batch = await sub.fetch(100, timeout=5)
            for msg in batch:
                await msg.ack()
            done += len(batch)
        seconds = time.perf_counter() - started
        await js.delete_stream(STREAM)
        return done / seconds
    finally:
        await nc.close()


_ECHO_BODY = b'{"operation_id":"x","withdrawal_id":"y","amount":"10.00","currency":"EUR"}'


_ECHO_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer x"}


async def _post_cost(post: Callable[[], Awaitable[int]], calls: int) -> HttpClientCost:
    """``calls`` POSTs through ``post`` (returns the status), ``HTTP_CONCURRENCY`` at a time,
    after 200 that warm the pool: requests/s and this process's CPU per request."""
    slots = asyncio.Semaphore(HTTP_CONCURRENCY)

    async def call() -> None:
        async with slots:
            status = await post()
            if status != 200:
                raise RuntimeError(f"bare app answered {status}")

    await asyncio.gather(*(call() for _ in range(200)))
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(call() for _ in range(calls)))
    seconds = time.perf_counter() - started
    return HttpClientCost(calls / seconds, (time.process_time() - cpu) / calls * 1e6)


async def client_post_cost(port: int, *, calls: int = HTTP_CALLS) -> HttpClientCost:
    """JSON POSTs through the orchestrator's own client, configured as gateway/runtime.py."""
    url = f"http://{HOST}:{port}/echo"
    client = HttpClient(timeouts=Timeouts(connect=2.0, read=10.0), max_connections=200)

    async def post() -> int:
        answer = await client.request("POST", url, body=_ECHO_BODY, headers=_ECHO_HEADERS)
        return answer.status

    try:
        return await _post_cost(post, calls)
    finally:
        await client.aclose()


async def httpx_post_cost(port: int, *, calls: int = HTTP_CALLS) -> HttpClientCost:
    """JSON POSTs through httpx.AsyncClient with the limits the runtime used to set."""
    url = f"http://{HOST}:{port}/echo"
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def post() -> int:
            response = await client.post(url, content=_ECHO_BODY, headers=_ECHO_HEADERS)
            return response.status_code

        return await _post_cost(post, calls)


async def raw_post_cost(port: int, *, calls: int = HTTP_CALLS) -> HttpClientCost:
    """The same POSTs through bench/load.py's raw asyncio client."""
    request = http_post(HOST, port, "/echo", _ECHO_BODY, {"Content-Type": "application/json"})
    await run_load(HOST, port, [request] * 200, concurrency=HTTP_CONCURRENCY, timeout=60)
    cpu = time.process_time()
    result = await run_load(HOST, port, [request] * calls, concurrency=HTTP_CONCURRENCY, timeout=60)
    if result.statuses != {200: calls}:
        raise RuntimeError(f"bare app answered {dict(result.statuses)}")
    return HttpClientCost(result.rate, (time.process_time() - cpu) / calls * 1e6)


async def measure(
    database_url: str,
    nats_url: str,
    *,
    bare_port: int | None = None,
    rounds: int = 2,
    scale: float = 1.0,
) -> Baselines:
    """Best of ``rounds`` of each baseline (the machine is shared and noisy).

    ``scale`` shrinks the counts when a benchmark measures its baselines beside its own
    figures and the time budget is tight. ``bare_port``: a running ``bench/bare_app.py``,
    for the HTTP client baseline.
    """

    def n(count: int) -> int:
        return max(1000, int(count * scale))

    pg = [
        await pg_transaction_rate(database_url, transactions=n(PG_TRANSACTIONS))
        for _ in range(rounds)
    ]
    pub = [await js_publish_rate(nats_url, messages=n(JS_MESSAGES)) for _ in range(rounds)]
    pub_async = [
        await js_publish_async_rate(nats_url, messages=n(JS_MESSAGES // 2)) for _ in range(rounds)
    ]
    con = [await js_consume_rate(nats_url, messages=n(JS_CONSUME)) for _ in range(rounds)]
    client_cost = httpx_cost = raw_cost = None
    if bare_port is not None:
        client_cost = min(
            [await client_post_cost(bare_port, calls=n(HTTP_CALLS)) for _ in range(rounds)],
            key=lambda c: c.cpu_us,
        )
        httpx_cost = min(
            [await httpx_post_cost(bare_port, calls=n(HTTP_CALLS)) for _ in range(rounds)],
            key=lambda c: c.cpu_us,
        )
        raw_cost = min(
            [await raw_post_cost(bare_port, calls=n(HTTP_CALLS)) for _ in range(rounds)],
            key=lambda c: c.cpu_us,
        )
    return Baselines(
        pg_tx_rate=max(pg),
        js_publish_rate=max(pub),
        js_publish_async_rate=max(pub_async),
        js_consume_rate=max(con),
        client=client_cost,
        httpx=httpx_cost,
        raw_http=raw_cost,
    )


def add_figures(report: Report, base: Baselines, *, prefix: str = "baseline_") -> None:
    report.add(
        f"{prefix}pg_tx_rate", "asyncpg tx/s (4 round-trips, baseline)", base.pg_tx_rate, "tx/s"
    )
    report.add(
        f"{prefix}js_publish_rate",
        "JetStream pipelined publish (baseline)",
        base.js_publish_rate,
        "msg/s",
    )
    report.add(
        f"{prefix}js_publish_async_rate",
        "  the same through js.publish_async",
        base.js_publish_async_rate,
        "msg/s",
    )
    report.add(
        f"{prefix}js_consume_rate",
        "JetStream pull-consume + ack (baseline)",
        base.js_consume_rate,
        "msg/s",
    )
    if base.client is not None and base.httpx is not None and base.raw_http is not None:
        report.add(
            f"{prefix}client_rate",
            "outbound client (aiohttp) POST to bare Litestar",
            base.client.rate,
            "/s",
        )
        report.add(f"{prefix}client_cpu_us", "  client CPU per call", base.client.cpu_us, "µs")
        report.add(f"{prefix}httpx_rate", "httpx POST, same server (before)", base.httpx.rate, "/s")
        report.add(f"{prefix}httpx_cpu_us", "  httpx client CPU per call", base.httpx.cpu_us, "µs")
        report.add(
            f"{prefix}raw_http_rate", "raw asyncio POST, same server", base.raw_http.rate, "/s"
        )
        report.add(
            f"{prefix}raw_http_cpu_us", "  raw client CPU per call", base.raw_http.cpu_us, "µs"
        )


NOISE_NOTE = (
    "the machine (2 cores) is shared with test runs: every measurement ran twice and the "
    "better run is reported; expect ±15 % between runs"
)


@benchmark(
    "baselines", "asyncpg 4-round-trip tx/s, JetStream publish/consume msg/s, HTTP client cost"
)
def baselines() -> Report:
    stack = BenchStack()
    try:
        stack.start()
        bare = stack.bare_litestar()
        base = uvloop.run(measure(stack.database_url, stack.nats_url, bare_port=bare.port))
    finally:
        stack.close()
    report = Report()
    add_figures(report, base, prefix="")
    report.notes.append(
        f"asyncpg: {PG_TRANSACTIONS} transactions over {BASELINE_CONNECTIONS} connections, "
        "BEGIN + version-checked UPDATE + audit INSERT (jsonb) + COMMIT; Postgres "
        "durable=False (fsync, synchronous_commit off), as in every bench stack"
    )
    report.notes.append(
        f"JetStream: {JS_MESSAGES} publishes pipelined ({JS_PENDING} in flight) to a file "
        f"stream, lean ({JS_MESSAGES // 2} via js.publish_async); {JS_CONSUME} messages "
        "fetched in batches of 100 and acked one by one"
    )
    report.notes.append(
        f"HTTP client: {HTTP_CALLS} JSON POSTs, {HTTP_CONCURRENCY} concurrent, to a bare "
        "Litestar app (uvicorn + uvloop + httptools); CPU is this client process's own"
    )
    report.notes.append(NOISE_NOTE)
    report.details = base.as_json()
    return report
