"""The release manager's moves (flags/admin.py): what each edits, and what it refuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from flags.admin import (
    Edit,
    FlagsEditError,
    Toggle,
    apply,
    check_merchant,
    check_percent,
    new_allow_list,
    new_rollout,
    plan_allow,
    plan_disallow,
    plan_kill,
    plan_rollout,
    summarize,
)
from tests.conftest import flags_document


def _toggle(document: dict[str, Any]) -> Toggle:
    feature = document["features"][0]
    return Toggle(
        enabled=feature["enabled"],
        strategies=tuple(feature["strategies"]),
        segments={s["id"]: s for s in document.get("segments", [])},
    )


def _merchants(toggle: Toggle) -> tuple[str, ...]:
    return summarize(toggle).allow_list


def test_the_summary_reads_the_toggle_as_the_router_does() -> None:
    toggle = _toggle(flags_document(enabled=True, merchants=["m_b", "m_a"], rollout=30))
    summary = summarize(toggle)
    assert summary.allow_list == ("m_a", "m_b")
    assert (summary.rollout, summary.stickiness, summary.everyone) == (30, "merchantId", False)
    assert summary.lines() == {
        "kill switch": "off (toggle enabled)",
        "allow-list": "m_a, m_b",
        "rollout": "30 % of merchants (stickiness merchantId)",
    }
    assert [s["kind"] for s in summary.strategies] == ["allow_list", "rollout"]
    killed = summarize(_toggle(flags_document(enabled=False)))
    assert killed.lines()["kill switch"] == "on (every new withdrawal goes legacy)"
    assert killed.lines()["rollout"] == "every merchant (a strategy without constraints)"


def test_a_disabled_strategy_is_not_read() -> None:
    document = flags_document(enabled=True, merchants=["m_a"])
    document["features"][0]["strategies"][0]["disabled"] = True
    assert summarize(_toggle(document)).allow_list == ()


def test_allow_adds_to_the_first_plain_list_and_keeps_the_rest_of_it() -> None:
    toggle = _toggle(flags_document(enabled=True, merchants=["m_a"], rollout=10))
    plan = plan_allow(toggle, "m_x")
    assert [e.action for e in plan.edits] == ["update"]
    after = apply(toggle, plan.edits)
    assert _merchants(after) == ("m_a", "m_x")
    constraint = after.strategies[0]["constraints"][0]
    assert constraint["caseInsensitive"] is False  # what the edit did not touch is kept
    assert after.strategies[1] == toggle.strategies[1]
    assert plan.notes == ()
    assert plan_allow(after, "m_x").unchanged == "m_x is already on the allow-list"


def test_allow_without_a_list_adds_one_and_says_when_the_kill_switch_is_on() -> None:
    toggle = _toggle(flags_document(enabled=False, rollout=10))
    plan = plan_allow(toggle, "m_x")
    assert plan.edits == (Edit("add", strategy=new_allow_list(["m_x"])),)
    assert _merchants(apply(toggle, plan.edits)) == ("m_x",)
    assert plan.notes == (
        "the kill switch is on: every new withdrawal stays legacy until `flags kill off`",
    )


def test_disallow_removes_the_merchant_from_every_list() -> None:
    document = flags_document(enabled=True, merchants=["m_a", "m_x"])
    document["features"][0]["strategies"].append(new_allow_list(["m_x", "m_b"]))
    toggle = _toggle(document)
    plan = plan_disallow(toggle, "m_x")
    assert [e.action for e in plan.edits] == ["update", "update"]
    assert _merchants(apply(toggle, plan.edits)) == ("m_a", "m_b")
    assert plan_disallow(toggle, "m_zz").unchanged == "m_zz is not on the allow-list"


def test_the_last_merchant_off_a_list_deletes_it_and_says_what_still_routes() -> None:
    toggle = _toggle(flags_document(enabled=True, merchants=["m_x"], rollout=10))
    plan = plan_disallow(toggle, "m_x")
    assert plan.edits == (Edit("delete", 0),)  # Unleash refuses a constraint without values
    after = apply(toggle, plan.edits)
    assert after.enabled
    assert after.strategies == (toggle.strategies[1],)
    assert plan.notes == ("m_x may still be routed to the cascade by the other strategies",)


def test_the_last_strategy_gone_switches_the_toggle_off() -> None:
    # Enabled without strategies is on for everyone: nobody targeted means off.
    toggle = _toggle(flags_document(enabled=True, merchants=["m_x"]))
    plan = plan_disallow(toggle, "m_x")
    assert plan.edits == (Edit("delete", 0), Edit("disable"))
    after = apply(toggle, plan.edits)
    assert (after.enabled, after.strategies) == (False, ())
    assert "the toggle is switched off (kill switch on)" in plan.notes[0]
    with pytest.raises(FlagsEditError, match="has no strategy"):
        plan_kill(after, on=False)


def test_a_merchant_listed_through_a_segment_is_left_to_unleash() -> None:
    document = flags_document(enabled=True)
    document["segments"] = [
        {
            "id": 7,
            "constraints": [{"contextName": "merchantId", "operator": "IN", "values": ["m_s"]}],
        }
    ]
    document["features"][0]["strategies"] = [{**new_allow_list(["m_s"]), "constraints": []}]
    document["features"][0]["strategies"][0]["segments"] = [7]
    toggle = _toggle(document)
    assert summarize(toggle).allow_list == ("m_s",)
    with pytest.raises(FlagsEditError, match=r"m_s is on the allow-list through segment\(s\) 7"):
        plan_disallow(toggle, "m_s")
    # allow does not write into a shared segment: it adds a list of its own.
    assert [e.action for e in plan_allow(toggle, "m_x").edits] == ["add"]


def test_rollout_sets_the_one_rollout_or_adds_it() -> None:
    toggle = _toggle(flags_document(enabled=True, merchants=["m_a"], rollout=10))
    plan = plan_rollout(toggle, 25)
    after = apply(toggle, plan.edits)
    assert summarize(after).rollout == 25
    assert after.strategies[1]["parameters"]["stickiness"] == "merchantId"
    assert plan_rollout(after, 25).unchanged == "the rollout already is 25 %"
    none = _toggle(flags_document(enabled=True, merchants=["m_a"]))
    assert plan_rollout(none, 0).unchanged == "there is no rollout (0 % already)"
    assert plan_rollout(none, 5).edits == (Edit("add", strategy=new_rollout(5)),)
    assert summarize(apply(toggle, plan_rollout(toggle, 0).edits)).rollout == 0


def test_rollout_says_when_the_cohort_is_not_sticky() -> None:
    document = flags_document(enabled=True, rollout=10)
    document["features"][0]["strategies"][0]["parameters"]["stickiness"] = "default"
    plan = plan_rollout(_toggle(document), 20)
    assert plan.notes == (
        "the rollout's stickiness is 'default', not 'merchantId': a merchant's cohort is not"
        " sticky",
    )


def test_rollout_refuses_what_it_cannot_mean() -> None:
    everyone = _toggle(flags_document(enabled=True))
    with pytest.raises(FlagsEditError, match="already enables every merchant"):
        plan_rollout(everyone, 10)
    document = flags_document(enabled=True, rollout=10)
    document["features"][0]["strategies"].append(new_rollout(20))
    with pytest.raises(FlagsEditError, match="strategies 1, 2 are all rollouts"):
        plan_rollout(_toggle(document), 30)


def test_the_kill_switch() -> None:
    toggle = _toggle(flags_document(enabled=True, merchants=["m_a"]))
    assert plan_kill(toggle, on=True).edits == (Edit("disable"),)
    assert (
        plan_kill(toggle, on=False).unchanged == "the kill switch already is off (toggle enabled)"
    )
    killed = apply(toggle, (Edit("disable"),))
    assert plan_kill(killed, on=True).unchanged == "the kill switch already is on (toggle disabled)"
    assert plan_kill(killed, on=False).edits == (Edit("enable"),)


def test_apply_leaves_the_toggle_it_was_given_alone() -> None:
    toggle = _toggle(flags_document(enabled=True, merchants=["m_a"]))
    before = copy.deepcopy(toggle)
    apply(toggle, plan_allow(toggle, "m_b").edits)
    assert toggle == before


@pytest.mark.parametrize(
    ("merchant", "error"),
    [
        ("", "the merchant id is empty"),
        ("   ", "the merchant id is empty"),
        ("m x", "merchant id 'm x' is not 1-64 letters, digits, '_' or '-'"),
        ("m" * 65, "is not 1-64 letters"),
    ],
)
def test_a_bad_merchant_id_is_refused(merchant: str, error: str) -> None:
    with pytest.raises(FlagsEditError, match=error):
        check_merchant(merchant)


def test_a_good_merchant_id_passes() -> None:
    assert check_merchant("m_cascade-2") == "m_cascade-2"


@pytest.mark.parametrize("text", ["-1", "101", "ten", "", "5.5", "1e2"])
def test_a_bad_percentage_is_refused(text: str) -> None:
    with pytest.raises(FlagsEditError, match="whole percentage from 0 to 100"):
        check_percent(text)


@pytest.mark.parametrize(("text", "percent"), [("0", 0), ("10", 10), ("10%", 10), ("100", 100)])
def test_a_percentage(text: str, percent: int) -> None:
    assert check_percent(text) == percent
