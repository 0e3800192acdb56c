"""Cohort routing offline (FLAGS_FILE bootstrap), checked against the Unleash client itself."""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from UnleashClient.cache import FileCache
from UnleashClient.clients.unleash_client import UnleashClient
from UnleashClient.utils import InstanceAllowType

from flags.router import (
    TOGGLE,
    CohortRouter,
    FlagsError,
    _digest,
    engine_refusal,
    load_flags_file,
)
from gateway.settings import DEFAULT_FLAGS_FILE, SettingsError, load_settings
from tests.conftest import flags_document
from tests.waiting import wait_until


def _content(document: dict[str, Any] | str | bytes) -> bytes:
    if isinstance(document, bytes):
        return document
    return (document if isinstance(document, str) else json.dumps(document)).encode()


def _write(tmp_path: Path, document: dict[str, Any] | str | bytes) -> Path:
    path = tmp_path / "flags.json"
    path.write_bytes(_content(document))
    return path


def _kill_switch_with_a_numeric_rollout() -> dict[str, Any]:
    """The toggle off, its rollout a JSON number: Unleash's engine cannot read the file."""
    document = flags_document(enabled=False, merchants=["m_a"], rollout=100)
    document["features"][0]["strategies"][1]["parameters"]["rollout"] = 100
    return document


def _toggle_with(**fields: Any) -> dict[str, Any]:
    document = flags_document(enabled=True, merchants=["m_a"])
    document["features"][0].update(fields)
    return document


def _unknown_operator() -> dict[str, Any]:
    """Well typed, but the engine compiles the toggle to "always off"."""
    document = flags_document(enabled=True, merchants=["m_a"])
    document["features"][0]["strategies"][0]["constraints"][0]["operator"] = "IN_ANY"
    return document


NOT_UTF8 = (
    json.dumps(flags_document(enabled=True, merchants=["m_a"])).encode().replace(b"m_a", b"m_\xe9")
)


@pytest.fixture
def routers() -> Iterator[list[CohortRouter]]:
    started: list[CohortRouter] = []
    yield started
    for router in started:
        router.close()


def _router(routers: list[CohortRouter], tmp_path: Path, document: dict[str, Any]) -> CohortRouter:
    router = CohortRouter(flags_file=_write(tmp_path, document))
    router.start()
    routers.append(router)
    return router


@pytest.fixture
def reference_client(tmp_path: Path) -> Iterator[Any]:
    """A plain UnleashClient on a document: the evaluation the router must agree with."""
    clients: list[UnleashClient] = []

    def build(document: dict[str, Any]) -> UnleashClient:
        cache = FileCache("reference", directory=tempfile.mkdtemp(dir=tmp_path))
        cache.bootstrap_from_dict(document)
        client = UnleashClient(
            url="http://127.0.0.1:1/unused",
            app_name="reference",
            disable_metrics=True,
            disable_registration=True,
            cache=cache,
            multiple_instance_mode=InstanceAllowType.SILENTLY_ALLOW,
        )
        client.initialize_client(fetch_toggles=False)
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.destroy()


def test_allow_listed_merchants_go_cascade_and_others_legacy(
    routers: list[CohortRouter], tmp_path: Path
) -> None:
    router = _router(routers, tmp_path, flags_document(enabled=True, merchants=["m_a", "m_b"]))
    assert router.ready
    assert router.source == "bootstrap"
    listed = router.decide("m_a")
    assert (listed.cohort, listed.reason) == ("cascade", "allow_list")
    other = router.decide("m_z")
    assert (other.cohort, other.reason) == ("legacy", "not_targeted")
    state = listed.flag_state
    assert state["source"] == "bootstrap"
    assert state["toggle"] == TOGGLE
    assert state["enabled"] is True
    assert state["strategies"] == [{"name": "default", "kind": "allow_list", "merchants": 2}]
    assert len(state["revision"]) == 12
    # The stored state is a copy: mutating one decision's state does not touch the next.
    state["source"] = "tampered"
    assert router.decide("m_a").flag_state["source"] == "bootstrap"


def test_allow_list_through_a_segment(routers: list[CohortRouter], tmp_path: Path) -> None:
    document = flags_document(enabled=True)
    document["segments"] = [
        {
            "id": 7,
            "name": "cascade-merchants",
            "constraints": [
                {"contextName": "merchantId", "operator": "IN", "values": ["m_seg"]},
            ],
        }
    ]
    document["features"][0]["strategies"] = [
        {
            "name": "flexibleRollout",
            "parameters": {"rollout": "100", "stickiness": "default", "groupId": TOGGLE},
            "constraints": [],
            "segments": [7],
        }
    ]
    router = _router(routers, tmp_path, document)
    listed = router.decide("m_seg")
    assert (listed.cohort, listed.reason) == ("cascade", "allow_list")
    assert router.decide("m_other").cohort == "legacy"


def test_sticky_rollout_equals_the_clients_own_evaluation(
    routers: list[CohortRouter], tmp_path: Path, reference_client: Any
) -> None:
    document = flags_document(enabled=True, merchants=["m_00007"], rollout=30)
    router = _router(routers, tmp_path, document)
    client = reference_client(document)
    merchants = [f"m_{i:05d}" for i in range(1000)]
    decisions = {m: router.decide(m) for m in merchants}
    for merchant, decision in decisions.items():
        expected = client.is_enabled(TOGGLE, {"properties": {"merchantId": merchant}})
        assert (decision.cohort == "cascade") == expected, merchant
        # Sticky: the same merchant always gets the same cohort.
        assert router.decide(merchant).cohort == decision.cohort
    cascade = [m for m, d in decisions.items() if d.cohort == "cascade"]
    share = len(cascade) / len(merchants)
    # 1,000 Bernoulli(0.3) draws: sd = √(0.3·0.7/1000) = 1.45 points; ±5 points is 3.4 sd.
    assert abs(share - 0.30) < 0.05, share
    assert decisions["m_00007"].reason == "allow_list"
    assert {decisions[m].reason for m in cascade if m != "m_00007"} == {"rollout"}
    assert {d.reason for d in decisions.values() if d.cohort == "legacy"} == {"not_targeted"}
    rollout = decisions[cascade[0]].flag_state["strategies"][1]
    assert rollout == {
        "name": "flexibleRollout",
        "kind": "rollout",
        "rollout": 30,
        "stickiness": "merchantId",
    }


def test_disabled_toggle_routes_everyone_legacy(
    routers: list[CohortRouter], tmp_path: Path
) -> None:
    router = _router(routers, tmp_path, flags_document(enabled=False, merchants=["m_a"]))
    for merchant in ("m_a", "m_b"):
        decision = router.decide(merchant)
        assert (decision.cohort, decision.reason) == ("legacy", "disabled")
        assert decision.flag_state["enabled"] is False


def test_a_features_document_without_the_toggle_targets_nobody() -> None:
    # A server's answer may lack the toggle (deleted in Unleash): nobody is targeted.
    definition = _digest(json.dumps({"version": 1, "features": []}))
    assert (definition.found, definition.enabled) == (False, False)
    assert definition.state == {"toggle": TOGGLE, "found": False}


@pytest.mark.parametrize(
    ("features", "has"),
    [
        (["withdrawal.cascade"], "'withdrawal.cascade'"),
        (["withdrawals.cascadE", "other"], "'withdrawals.cascadE', 'other'"),
        ([], "none"),
    ],
)
def test_a_flags_file_without_the_toggle_is_refused_naming_what_it_has(
    tmp_path: Path, features: list[str], has: str
) -> None:
    document = flags_document(enabled=True, merchants=["m_a"])
    toggle = document["features"][0]
    document["features"] = [{**toggle, "name": name} for name in features]
    path = _write(tmp_path, document)
    expected = f"FLAGS_FILE {path}: no 'withdrawals.cascade' toggle (toggles in the file: {has})"
    with pytest.raises(FlagsError) as caught:
        load_flags_file(path)
    assert str(caught.value) == expected
    with pytest.raises(FlagsError):
        CohortRouter(flags_file=path)
    # At start: the settings refuse it, before any connection is attempted.
    with pytest.raises(SettingsError) as refused:
        load_settings({"FLAGS_FILE": str(path)})
    assert str(refused.value) == expected


def test_the_shipped_flags_file_loads() -> None:
    assert any(f["name"] == TOGGLE for f in load_flags_file(DEFAULT_FLAGS_FILE)["features"])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"features": [{"name": "withdrawals.cascade"}]}', "not an Unleash features file"),
        ('{"features": "none"}', "not an Unleash features file"),
        ("[]", "not an Unleash features file"),
        (NOT_UTF8, "not UTF-8 (byte "),
        (
            _kill_switch_with_a_numeric_rollout(),
            "not an Unleash features file (Expected `str`, got `int` - at"
            " `$.features[0].strategies[1].parameters[...]`)",
        ),
        (
            _toggle_with(type=5),
            "not an Unleash features file (Expected `str | null`, got `int` - at"
            " `$.features[0].type`)",
        ),
        (
            _toggle_with(impressionData="no"),
            "not an Unleash features file (Expected `bool | null`, got `str` - at"
            " `$.features[0].impressionData`)",
        ),
        (
            {"features": flags_document(enabled=True)["features"]},
            "not an Unleash features file (Object missing required field `version`)",
        ),
        (
            _unknown_operator(),
            "the Unleash engine refuses it (toggle 'withdrawals.cascade': Failed to compile"
            " toggle, this will always be off",
        ),
    ],
)
def test_malformed_flags_file_is_one_clear_line(
    tmp_path: Path, content: dict[str, Any] | str | bytes, expected: str
) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(FlagsError) as caught:
        CohortRouter(flags_file=path)
    message = str(caught.value)
    assert message.startswith(f"FLAGS_FILE {path}: {expected}")
    assert "\n" not in message
    # At start: one line from the settings, not a traceback.
    with pytest.raises(SettingsError) as refused:
        load_settings({"FLAGS_FILE": str(path)})
    assert str(refused.value) == message


def test_every_file_the_router_takes_the_engine_takes(reference_client: Any) -> None:
    """The engine drops a document it cannot read: what parse_flags passes, it must load."""
    document = flags_document(enabled=True, merchants=["m_a"], rollout=100)
    client = reference_client(document)
    assert engine_refusal(json.dumps(document).encode()) is None
    assert client.is_enabled(TOGGLE, {"properties": {"merchantId": "m_zz"}})
    refused = _kill_switch_with_a_numeric_rollout()
    assert engine_refusal(json.dumps(refused).encode()) is not None
    # The real client, given that file, ignores it: the toggle stays unknown, so off.
    assert not reference_client(refused).is_enabled(TOGGLE, {"properties": {"merchantId": "m_a"}})


def test_missing_flags_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FlagsError, match=r"FLAGS_FILE .*absent\.json: cannot read"):
        load_flags_file(tmp_path / "absent.json")


def test_no_client_means_legacy_fallback(routers: list[CohortRouter], tmp_path: Path) -> None:
    not_started = CohortRouter(flags_file=_write(tmp_path, flags_document(enabled=True)))
    decision = not_started.decide("m_a")
    assert (decision.cohort, decision.reason) == ("legacy", "fallback")
    assert decision.flag_state["source"] == "fallback"
    assert not not_started.ready
    nothing = CohortRouter(flags_file=None)
    nothing.start()
    routers.append(nothing)
    assert nothing.ready
    assert nothing.source == "fallback"
    assert nothing.decide("m_a").reason == "fallback"


def test_decide_cost(routers: list[CohortRouter], tmp_path: Path) -> None:
    """Per-request routing cost: printed for the record, bounded loosely against regressions."""
    router = _router(
        routers, tmp_path, flags_document(enabled=True, merchants=["m_a", "m_b"], rollout=30)
    )
    merchants = [f"m_{i}" for i in range(2000)]
    samples = []
    for merchant in merchants:
        start = time.perf_counter_ns()
        router.decide(merchant)
        samples.append((time.perf_counter_ns() - start) / 1000)
    median = statistics.median(samples)
    p99 = statistics.quantiles(samples, n=100)[98]
    print(f"decide(): median {median:.1f} µs, p99 {p99:.1f} µs over {len(samples)} calls")
    assert median < 1000


# --- FLAGS_FILE is re-read at the refresh interval (offline) ---------------------------------


def _replace(path: Path, content: dict[str, Any] | str | bytes) -> None:
    """Write the whole file at once, as an editor or the flags command does (temp + rename)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(_content(content))
    temporary.replace(path)


async def _checked_twice_more(router: CohortRouter) -> None:
    """Two more checks of the file have begun, so at least one whole check has run."""
    start = router.describe()["file_checks"]
    await wait_until(
        lambda: router.describe()["file_checks"] >= start + 2,
        timeout=10,
        what="two more checks of FLAGS_FILE",
    )


async def test_an_edited_flags_file_routes_new_withdrawals_without_a_restart(
    routers: list[CohortRouter], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cascade.flags")
    path = _write(tmp_path, flags_document(enabled=True, merchants=["m_a"]))
    router = CohortRouter(flags_file=path, refresh_interval=1)
    await asyncio.to_thread(router.start)
    routers.append(router)
    assert router.decide("m_b").cohort == "legacy"
    before = router.decide("m_a").flag_state["revision"]

    _replace(path, flags_document(enabled=True, merchants=["m_a", "m_b"]))
    moved = await wait_until(
        lambda: router.decide("m_b"),
        done=lambda decision: decision.cohort == "cascade",
        timeout=10,
        what="m_b to route cascade after the file was edited",
    )
    assert moved.reason == "allow_list"
    assert moved.flag_state["source"] == "bootstrap"
    after = moved.flag_state["revision"]
    assert after != before
    assert f"new withdrawals route by revision {after} (was {before})" in caplog.text

    # The kill switch, by hand: the toggle off sends everyone legacy.
    _replace(path, flags_document(enabled=False, merchants=["m_a", "m_b"]))
    killed = await wait_until(
        lambda: router.decide("m_a"),
        done=lambda decision: decision.cohort == "legacy",
        timeout=10,
        what="m_a to route legacy once the toggle is off",
    )
    assert killed.reason == "disabled"


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("{not json", "not valid JSON"),
        (
            flags_document(enabled=True, merchants=["m_b"])
            | {"features": [{"name": "withdrawal.cascade", "enabled": True}]},
            "no 'withdrawals.cascade' toggle (toggles in the file: 'withdrawal.cascade')",
        ),
        (None, "cannot read"),
        (NOT_UTF8, "not UTF-8"),
        # Kill switch on, but a file the engine would ignore: refused, not half taken.
        (_kill_switch_with_a_numeric_rollout(), "not an Unleash features file"),
        (_unknown_operator(), "the Unleash engine refuses it"),
    ],
)
async def test_a_bad_flags_file_keeps_the_last_good_state_and_is_logged_once(
    routers: list[CohortRouter],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    bad: dict[str, Any] | str | bytes | None,
    expected: str,
) -> None:
    path = _write(tmp_path, flags_document(enabled=True, merchants=["m_a"]))
    router = CohortRouter(flags_file=path, refresh_interval=1)
    await asyncio.to_thread(router.start)
    routers.append(router)
    revision = router.decide("m_a").flag_state["revision"]

    def errors() -> list[str]:
        """The router's own error lines (the suite's event loop may carry others' too)."""
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.ERROR and r.name == "cascade.flags"
        ]

    if bad is None:
        path.unlink()
    else:
        _replace(path, bad)
    logged = await wait_until(errors, timeout=10, what="an error about the bad FLAGS_FILE")
    assert len(logged) == 1
    assert logged[0].startswith(f"FLAGS_FILE {path}: {expected}")
    assert logged[0].endswith(f"; routing keeps the last good flags (revision {revision})")
    assert router.describe()["file_error"].startswith(f"FLAGS_FILE {path}: {expected}")
    await _checked_twice_more(router)
    assert len(errors()) == 1, errors()  # once per bad version, not at every check
    decision = router.decide("m_a")
    assert (decision.cohort, decision.reason) == ("cascade", "allow_list")
    assert decision.flag_state["revision"] == revision

    # Another bad version is another error; a good file is taken and clears the error.
    _replace(path, "[]")
    await wait_until(lambda: len(errors()) == 2, timeout=10, what="an error about the new version")
    assert "not an Unleash features file" in errors()[1]
    _replace(path, flags_document(enabled=True, merchants=["m_a", "m_b"]))
    await wait_until(
        lambda: router.decide("m_b").cohort == "cascade",
        timeout=10,
        what="m_b to route cascade from the repaired file",
    )
    assert router.describe()["file_error"] is None
    assert len(errors()) == 2
