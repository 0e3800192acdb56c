"""Scenario files: loading with one-line errors, seeded planning, and scenario providers."""

from __future__ import annotations

import copy
import random
import socket
import statistics
from collections import Counter
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar

from contracts.providers_file import ProviderConfig
from sandbox.routes import Sandbox, SandboxConfig
from sandbox.scenarios import (
    Lognormal,
    Scenario,
    ScenarioError,
    ScenarioProvider,
    draw_attempt,
    load_scenario,
    plan,
    summarize,
)
from tests.conftest import sandbox_schema
from tests.waiting import wait_until

EXAMPLE: dict[str, Any] = {
    "name": "eu-payouts",
    "seed": 42,
    "providers": {
        "fast": {
            "approval_rate": 0.7,
            "accept_then_fail_rate": 0.1,
            "never_answers_rate": 0.02,
            "ambiguous_error_rate": 0.05,
            "latency": {"distribution": "lognormal", "median_ms": 120, "p95_ms": 900},
            "webhook_delay": {"distribution": "uniform", "min_ms": 500, "max_ms": 9000},
        },
        "cheap": {"approval_rate": 0.3},
        "slow": {"approval_rate": 0.5, "latency": {"distribution": "fixed", "value_ms": 800}},
    },
    "withdrawals": {
        "count": 200,
        "cascade_length": {"weights": {"1": 0.2, "2": 0.5, "3": 0.3}},
        "amount": {"min": "5.00", "max": "900.00"},
        "currency": "EUR",
    },
}


def scenario(**changes: Any) -> Scenario:
    raw = copy.deepcopy(EXAMPLE)
    raw.update(changes)
    return load_scenario(msgspec.json.encode(raw))


def mutated(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    raw = copy.deepcopy(EXAMPLE)
    mutate(raw)
    return msgspec.json.encode(raw)


# -- loading ---------------------------------------------------------------------------------


def test_example_loads() -> None:
    loaded = scenario()
    assert loaded.name == "eu-payouts"
    assert loaded.providers["fast"].latency == Lognormal(median_ms=120, p95_ms=900)
    assert loaded.providers["cheap"].ambiguous_error_rate == 0.0
    assert loaded.withdrawals.cascade_length.weights == {1: 0.2, 2: 0.5, 3: 0.3}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "scenario: not valid JSON"),
        (b"[]", "scenario: Expected `object`, got `array`"),
        (mutated(_set("extra", 1)), "unknown field `extra`"),
        (mutated(_set("providers.fast.approval_rate", _DELETE)), "`approval_rate`"),
        (mutated(_set("providers.fast.approval_rate", "0.5")), "$.providers.fast.approval_rate"),
        (mutated(_set("providers.fast.approval_rate", 1.5)), "providers.fast.approval_rate must"),
        (
            mutated(_set("providers.fast.approval_rate", 0.95)),
            "providers.fast: approval_rate + accept_then_fail_rate + never_answers_rate",
        ),
        (mutated(_set("providers.fast.ambiguous_error_rate", -0.1)), "ambiguous_error_rate"),
        (
            mutated(_set("providers.fast.latency", {"distribution": "gamma", "k": 1})),
            "Invalid value 'gamma' - at `$.providers.fast.latency.distribution`",
        ),
        (
            mutated(
                _set(
                    "providers.fast.latency",
                    {"distribution": "lognormal", "median_ms": 900, "p95_ms": 100},
                )
            ),
            "providers.fast.latency needs 0 < median_ms <= p95_ms",
        ),
        (
            mutated(
                _set(
                    "providers.fast.webhook_delay",
                    {"distribution": "uniform", "min_ms": 5, "max_ms": 1},
                )
            ),
            "providers.fast.webhook_delay needs 0 <= min_ms <= max_ms",
        ),
        (mutated(_set("providers", {})), "providers must name at least one provider"),
        (mutated(_set("providers.bad-name", {"approval_rate": 1})), "providers.bad-name: name"),
        (mutated(_set("withdrawals.count", 0)), "withdrawals.count must be within"),
        (mutated(_set("withdrawals.amount.min", "ten")), "withdrawals.amount.min is not a"),
        (mutated(_set("withdrawals.amount.min", "0")), "withdrawals.amount.min must be positive"),
        (mutated(_set("withdrawals.amount.max", "1.00")), "withdrawals.amount.max 1.00 is below"),
        (mutated(_set("withdrawals.amount.max", "1.001")), "more than two decimals"),
        (
            mutated(_set("withdrawals.cascade_length", {"weights": {"4": 1}})),
            "cascade_length allows 4 providers but the scenario has 3",
        ),
        (
            mutated(_set("withdrawals.cascade_length", {"weights": {}})),
            "weights must not be empty",
        ),
        (
            mutated(_set("withdrawals.cascade_length", {"weights": {"1": 0}})),
            "must not all be 0",
        ),
        (
            mutated(_set("withdrawals.cascade_length", {"weights": {"0": 1}})),
            "length 0 is below 1",
        ),
        (
            mutated(_set("withdrawals.cascade_length", {"min": 2, "max": 1})),
            "needs 1 <= min <= max",
        ),
        (mutated(_set("withdrawals.id_prefix", "a b")), "withdrawals.id_prefix"),
        (
            mutated(_set("outages", [{"provider": "sbx_a", "error_ratio": 1}])),
            "Object missing required field `duration_seconds` - at `$.outages[0]`",
        ),
        (
            mutated(_set("outages", [{"provider": "sbx a", "duration_seconds": 1}])),
            "outages[0].provider must be 1..64 letters",
        ),
        (
            mutated(_set("outages", [{"provider": "sbx_scn_nope", "duration_seconds": 1}])),
            "outages[0].provider sbx_scn_nope is not a provider of this scenario",
        ),
        (
            mutated(_set("outages", [{"provider": "sbx_a", "duration_seconds": 1}])),
            "outages[0]: an outage needs error_ratio or timeout_ratio above 0",
        ),
        (
            mutated(
                _set(
                    "outages",
                    [{"provider": "sbx_a", "duration_seconds": 1, "error_ratio": 1.5}],
                )
            ),
            "outages[0]: error_ratio must be within 0..1, got 1.5",
        ),
        (
            mutated(
                _set(
                    "outages",
                    [
                        {
                            "provider": "sbx_a",
                            "duration_seconds": 1,
                            "error_ratio": 1,
                            "start_after_seconds": -1,
                        }
                    ],
                )
            ),
            "outages[0].start_after_seconds must be within 0..86400",
        ),
        (
            mutated(
                _set(
                    "outages",
                    [
                        {"provider": "sbx_a", "duration_seconds": 60, "error_ratio": 1},
                        {"provider": "sbx_b", "duration_seconds": 60, "error_ratio": 1},
                        {
                            "provider": "sbx_a",
                            "start_after_seconds": 59,
                            "duration_seconds": 5,
                            "timeout_ratio": 1,
                        },
                    ],
                )
            ),
            "outages[0] and outages[2] overlap on sbx_a",
        ),
    ],
)
def test_bad_scenarios_fail_with_one_precise_line(raw: bytes, message: str) -> None:
    with pytest.raises(ScenarioError) as failure:
        load_scenario(raw)
    text = str(failure.value)
    assert "\n" not in text
    assert text.startswith("scenario: ")
    assert message in text


def test_outages_load_with_their_defaults() -> None:
    loaded = scenario(
        outages=[
            {"provider": "sbx_scn_fast", "duration_seconds": 60, "error_ratio": 1.0},
            {
                "provider": "sbx_scn_fast",
                "start_after_seconds": 60,
                "duration_seconds": 30,
                "timeout_ratio": 0.5,
                "timeout_seconds": 4,
            },
        ]
    )
    first, second = loaded.outages
    assert (first.start_after_seconds, first.timeout_ratio, first.timeout_seconds) == (0, 0, None)
    assert (second.error_ratio, second.timeout_seconds) == (0, 4)
    assert plan(loaded) == plan(scenario())  # outages do not change what the providers do


def test_source_names_the_file() -> None:
    with pytest.raises(ScenarioError, match=r"^scenarios/x\.json: not valid JSON"):
        load_scenario(b"", source="scenarios/x.json")


# -- planning --------------------------------------------------------------------------------


def test_plan_is_reproducible_and_depends_on_the_seed() -> None:
    first = plan(scenario())
    assert first == plan(scenario())
    assert first != plan(scenario(seed=43))


def test_more_withdrawals_leave_the_earlier_ones_unchanged() -> None:
    small = plan(scenario())
    raw = copy.deepcopy(EXAMPLE)
    raw["withdrawals"]["count"] = 300
    large = plan(load_scenario(msgspec.json.encode(raw)))
    assert large[:200] == small


def test_plan_respects_the_mix() -> None:
    planned = plan(scenario())
    assert len({w.withdrawal_id for w in planned}) == 200
    lengths = Counter(len(w.cascade) for w in planned)
    assert set(lengths) == {1, 2, 3}
    assert lengths[2] > lengths[1]
    for w in planned:
        assert len(set(w.cascade)) == len(w.cascade)
        assert all(p.startswith("sbx_scn_") for p in w.cascade)
        assert [a.provider_id for a in w.attempts] == list(w.cascade)
        assert Decimal("5.00") <= Decimal(w.amount) <= Decimal("900.00")
        assert len(w.amount.split(".")[1]) == 2
        assert w.currency == "EUR"


def test_attempt_outcomes_follow_the_rates() -> None:
    profile = ScenarioProvider(
        approval_rate=0.6,
        accept_then_fail_rate=0.1,
        never_answers_rate=0.1,
        ambiguous_error_rate=0.2,
        ambiguous_created_ratio=0.5,
        ambiguous_timeout_share=0.25,
        latency=Lognormal(median_ms=100, p95_ms=1000),
    )
    rng = random.Random(1)
    attempts = [draw_attempt("sbx_scn_x", profile, rng) for _ in range(20_000)]
    answers = Counter(a.answer for a in attempts)
    share = {k: v / len(attempts) for k, v in answers.items()}
    assert share["accepted"] == pytest.approx(0.8 * 0.8, abs=0.02)
    assert share["declined"] == pytest.approx(0.8 * 0.2, abs=0.02)
    assert share["503"] == pytest.approx(0.2 * 0.75, abs=0.02)
    assert share["timeout"] == pytest.approx(0.2 * 0.25, abs=0.02)
    ambiguous = [a for a in attempts if a.answer in ("503", "timeout")]
    absent = sum(a.outcome == "absent" for a in ambiguous) / len(ambiguous)
    assert absent == pytest.approx(0.5, abs=0.04)
    # An ambiguous create that did create an order never turns into a decline.
    assert not any(a.outcome == "declined" for a in ambiguous)
    accepted = [a for a in attempts if a.answer == "accepted"]
    assert {a.outcome for a in accepted} == {"succeeded", "failed", "silent"}
    assert all(a.code == "declined" for a in attempts if a.outcome in ("failed", "declined"))
    latencies = sorted(a.latency_ms for a in attempts)
    assert statistics.median(latencies) == pytest.approx(100, rel=0.05)
    assert latencies[int(0.95 * len(latencies))] == pytest.approx(1000, rel=0.1)


def test_summary_shows_what_the_cascade_adds() -> None:
    summary = summarize(plan(scenario()))
    assert summary["withdrawals"] == 200
    assert 0 < summary["single_shot_success_rate"] < summary["cascade_success_rate"] <= 1


# -- scenario providers in the sandbox -------------------------------------------------------


def wiring_scenario(**profile: Any) -> Scenario:
    raw = {
        "seed": 5,
        "providers": {
            "p": {
                "approval_rate": 1.0,
                "latency": {"distribution": "fixed", "value_ms": 1},
                "webhook_delay": {"distribution": "fixed", "value_ms": 10},
                "timeout_ms": 10,
                **profile,
            }
        },
        "withdrawals": {"count": 1, "amount": {"min": "1.00", "max": "2.00"}},
    }
    return load_scenario(msgspec.json.encode(raw))


@pytest.fixture
def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def open_sandbox(
    scn: Scenario | None, port: int, dsn: str
) -> tuple[Sandbox, httpx.AsyncClient]:
    sandbox = Sandbox(
        SandboxConfig(
            # Nobody listens: deliveries fail fast, the order's own state is what is checked.
            gateway_url=f"http://127.0.0.1:{port}",
            database_url=dsn,
            schema=sandbox_schema(),
            providers={
                "sbx_scn_p": ProviderConfig(
                    base_url="http://127.0.0.1:9/x", webhook_secrets=("whsec_c2Nu",)
                )
            },
            webhook_attempts=1,
            scenario=scn,
        )
    )
    await sandbox.start()
    # Any: Litestar's precise ASGI signature does not match httpx's looser ASGIApp alias.
    app: Any = Litestar(route_handlers=[sandbox.router], logging_config=None)
    # ASGITransport runs the real app in this event loop, where the sandbox's tasks live.
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sbx")
    return sandbox, client


@pytest.fixture
async def served(dead_port: int, sandbox_dsn: str) -> AsyncIterator[Callable[..., Any]]:
    opened: list[tuple[Sandbox, httpx.AsyncClient]] = []

    async def start(scn: Scenario | None) -> tuple[Sandbox, httpx.AsyncClient]:
        pair = await open_sandbox(scn, dead_port, sandbox_dsn)
        opened.append(pair)
        return pair

    yield start
    for sandbox, client in opened:
        await client.aclose()
        await sandbox.close()


async def create(client: httpx.AsyncClient, order_id: str, provider: str = "sbx_scn_p") -> Any:
    return await client.post(
        f"/sandbox/providers/{provider}/orders",
        json={
            "order_id": order_id,
            "amount": "1.00",
            "currency": "EUR",
            "destination": {"type": "iban", "account": "x"},
        },
        headers={"Idempotency-Key": order_id},
    )


async def eventually_status(client: httpx.AsyncClient, order_id: str, status: str) -> None:
    """Until the provider's order ``order_id`` is in ``status``."""

    async def found() -> str | None:
        got = await client.get(f"/sandbox/providers/sbx_scn_p/orders/{order_id}")
        return str(got.json()["status"]) if got.status_code == 200 else None

    await wait_until(
        found,
        done=lambda seen: seen == status,
        timeout=5,
        interval=0.005,
        what=f"order {order_id} to become {status}",
    )


async def test_scenario_provider_accepts_and_succeeds(served: Any) -> None:
    _, client = await served(wiring_scenario())
    created = await create(client, "cg-a")
    assert created.status_code == 201
    assert created.json()["reference"].startswith("sbx_scn_p-")
    await eventually_status(client, "cg-a", "succeeded")


async def test_scenario_provider_declines_and_fails_later(served: Any) -> None:
    _, client = await served(wiring_scenario(approval_rate=0.0, decline_code="account_closed"))
    declined = await create(client, "cg-d")
    assert declined.status_code == 422
    assert declined.json()["code"] == "account_closed"
    assert (await client.get("/sandbox/providers/sbx_scn_p/orders/cg-d")).status_code == 404

    _, client = await served(wiring_scenario(approval_rate=0.0, accept_then_fail_rate=1.0))
    assert (await create(client, "cg-f")).status_code == 201
    await eventually_status(client, "cg-f", "failed")


@pytest.mark.parametrize(("created", "get_status"), [(1.0, 200), (0.0, 404)])
async def test_scenario_provider_ambiguous_creates(
    served: Any, created: float, get_status: int
) -> None:
    _, client = await served(
        wiring_scenario(
            ambiguous_error_rate=1.0,
            ambiguous_created_ratio=created,
            ambiguous_timeout_share=0.0,
        )
    )
    assert (await create(client, "cg-amb")).status_code == 503
    assert (await client.get("/sandbox/providers/sbx_scn_p/orders/cg-amb")).status_code == (
        get_status
    )


async def test_scenario_provider_is_reproducible_per_order_id(served: Any) -> None:
    mixed = wiring_scenario(
        approval_rate=0.5, ambiguous_error_rate=0.3, ambiguous_timeout_share=0.5
    )
    ids = [f"cg-{i}" for i in range(30)]

    async def answers() -> list[int]:
        _, client = await served(mixed)
        return [(await create(client, order_id)).status_code for order_id in ids]

    first = await answers()
    assert first == await answers()
    assert {201, 422, 503, 504} <= set(first)


async def test_unknown_scenario_providers_are_404(served: Any) -> None:
    _, client = await served(wiring_scenario())
    assert (await create(client, "x", provider="sbx_scn_other")).status_code == 404
    _, plain = await served(None)
    assert (await create(plain, "x", provider="sbx_scn_p")).status_code == 404


def test_plan_names_the_providers_the_sandbox_serves() -> None:
    scn = wiring_scenario()
    [withdrawal] = plan(scn)
    assert withdrawal.cascade == ("sbx_scn_p",)
    assert scn.provider("sbx_scn_p") is not None
    assert withdrawal.withdrawal_id == "scn-5-0000000"
