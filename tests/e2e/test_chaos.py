"""The chaos campaign, reduced (150 withdrawals over 30 s): every money check is zero.

The full campaign is ``python -m bench chaos`` (``make chaos``); this is the same code with
fewer withdrawals, so that every run of the suite kills workers, the gateway, nats-server and
Postgres under load and checks the money afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from bench.chaos import Campaign, run_campaign, summary
from bench.chaos.twice import _ack_the_second_time
from tests.conftest import Services


@pytest.mark.e2e
@pytest.mark.parametrize(
    "campaign",
    [
        pytest.param(Campaign(withdrawals=150, rate=5), id="one-nats-server"),
        pytest.param(
            Campaign(withdrawals=150, rate=5, nats_nodes=3, gateways=2), id="nats-cluster"
        ),
    ],
)
def test_reduced_chaos_campaign_leaves_every_check_at_zero(campaign: Campaign) -> None:
    # Under /tmp (the embedded Postgres runs as nobody when we are root); kept on failure,
    # with every process's log in it.
    workdir = Path(tempfile.mkdtemp(prefix="cascade-chaos-", dir="/tmp"))
    outcome = run_campaign(campaign, workdir)
    report = "\n".join([*summary(campaign, outcome), f"logs: {workdir}"])
    assert outcome.failures == {}, report
    assert outcome.notes == [], report
    assert len(outcome.faults) == 5, report  # every scheduled fault happened
    assert outcome.worker_kills >= int(campaign.offer_seconds / 3) - 1, report  # every 2-3 s
    assert len(outcome.tally.created) == campaign.withdrawals, report
    # Support decided cases both ways, and each way was applied at least once.
    assert outcome.tally.resolutions["positive 200"] > 0, report
    assert outcome.tally.resolutions["negative 200"] > 0, report
    shutil.rmtree(workdir, ignore_errors=True)


async def test_the_launcher_makes_jetstream_deliver_every_message_twice(
    services: Services,
) -> None:
    """What `bench.chaos.twice` puts in place of ack: the first delivery comes back."""
    nc = await nats.connect(services.nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="TWICE", subjects=["twice.>"]))
        await js.publish("twice.one", b"payload")
        sub = await js.pull_subscribe("twice.one", durable="twice")
        (first,) = await sub.fetch(1, timeout=5)
        await _ack_the_second_time(first)
        (second,) = await sub.fetch(1, timeout=5)
        assert second.data == b"payload"
        assert second.metadata.num_delivered == 2
        await _ack_the_second_time(second)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=1)
        await js.delete_stream("TWICE")
    finally:
        await asyncio.wait_for(nc.close(), 5)
