"""A NATS cluster as users run one: three servers, streams with three replicas.

A process that starts while the cluster cannot answer for JetStream yet (no quorum: a
leader election after a lost server, servers still starting) waits for it instead of
exiting, and its client fails over between the servers NATS_URL lists.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.js.errors import ServiceUnavailableError

from devstack.embedded import EmbeddedNatsCluster
from gateway.runtime import _ensure_streams
from orchestrator import bus
from tests.waiting import wait_until


@pytest.fixture
def cluster() -> Iterator[EmbeddedNatsCluster]:
    workdir = Path(tempfile.mkdtemp(prefix="cascade-cluster-", dir="/tmp"))
    servers = EmbeddedNatsCluster(workdir, 3)
    try:
        yield servers
    finally:
        servers.stop()


async def test_a_process_waits_for_jetstream_to_get_its_quorum(
    cluster: EmbeddedNatsCluster,
) -> None:
    first, *others = cluster.servers
    first.launch()
    nc = await bus.connect(cluster.url, name="test")
    try:
        streams = bus.Streams(nc.jetstream(), bus.Names("q."), replicas=3, check_timeout=1.0)
        starting = asyncio.create_task(_ensure_streams(streams, "test"))
        await asyncio.sleep(0)  # it asks the lone server, which cannot answer for JetStream
        assert not starting.done()
        for server in others:  # the quorum arrives while the process waits
            server.launch()
        await asyncio.to_thread(lambda: [s.wait_ready() for s in cluster.servers])
        await asyncio.wait_for(starting, 60)
        info = await nc.jetstream().stream_info(bus.Names("q.").stream)
        assert info.config.num_replicas == 3
    finally:
        await nc.close()


async def test_streams_outlive_the_loss_of_one_server(cluster: EmbeddedNatsCluster) -> None:
    cluster.start()
    nc = await bus.connect(cluster.url, name="test")
    try:
        js = nc.jetstream()
        names = bus.Names("r.")
        await _ensure_streams(bus.Streams(js, names, replicas=3), "test")
        await js.publish(names.subject(bus.TASK_START), b"kept")
        cluster.servers[0].kill()

        async def messages() -> int | None:
            """Answered by the two servers left, once the client has failed over to one of
            them and they have elected a leader (None until then)."""
            try:
                info = await js.stream_info(
                    names.stream,
                )
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                ServiceUnavailableError,
            ):
                return None
            return int(info.state.messages)

        assert await wait_until(messages, timeout=30, what="the stream on two servers") == 1
    finally:
        await nc.close()
