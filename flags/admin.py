"""A release manager's moves on ``withdrawals.cascade``, read the way the router reads them.

Pure: a :class:`Toggle` (the toggle in one place — a flags file, or one environment of an
Unleash project) in, a :class:`Plan` (the edits to make) out; :mod:`flags.stores` reads a
toggle from its place and carries a plan out there.

What the router reads (:mod:`flags.router`): the toggle's ``enabled`` — off is the kill
switch, every new withdrawal goes legacy — and its enabled strategies. An *allow-list* is a
strategy that enables everyone passing its constraints (``default``, or ``flexibleRollout``
at 100 %) whose every constraint is ``merchantId IN [...]``; a *rollout* is a
``flexibleRollout`` without constraints or segments. The moves edit exactly those and leave
any other strategy alone.

Two facts of Unleash shape the moves: an enabled toggle without strategies is on for
everyone (Unleash even adds a 100 % rollout when such a toggle is switched on), and a
constraint cannot list no values. So the last merchant leaves the allow-list by deleting its
strategy, and a toggle left without strategies is switched off.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from flags.router import (
    TOGGLE,
    _allow_list,
    _Segment,
    _Strategy,
    _strategy_summary,
)

# The legacy API's rule for merchant_id (docs/legacy-api/README.md): 1..64 of [A-Za-z0-9_-].
MERCHANT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
STICKINESS = "merchantId"


class FlagsEditError(Exception):
    """The move cannot be made (safely) on this state; the message says why in one line."""


@dataclass(frozen=True)
class Toggle:
    """``withdrawals.cascade`` as one place holds it."""

    enabled: bool
    # Unleash's strategy objects as the place holds them, in order (ids and all).
    strategies: tuple[dict[str, Any], ...]
    # Segments the strategies may reference, by id (each with its ``constraints``).
    segments: dict[int, dict[str, Any]] = field(default_factory=dict)


Action = Literal["update", "add", "delete", "enable", "disable"]


@dataclass(frozen=True)
class Edit:
    """One change: a strategy (by its index in :attr:`Toggle.strategies`) or the toggle."""

    action: Action
    index: int = -1
    strategy: dict[str, Any] | None = None


@dataclass(frozen=True)
class Plan:
    """The edits of one move (none when the state already is what was asked: ``unchanged``
    says why), and notes for the release manager."""

    edits: tuple[Edit, ...] = ()
    unchanged: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Read:
    """An enabled strategy as the router reads it."""

    index: int
    raw: dict[str, Any]
    strategy: _Strategy
    allowed: frozenset[str] | None  # the merchants it enables when it is an allow-list
    summary: dict[str, Any]


def _read(toggle: Toggle) -> list[_Read]:
    segments = {
        i: msgspec.convert({"id": i, **s}, _Segment, strict=False)
        for i, s in toggle.segments.items()
    }
    reads = []
    for index, raw in enumerate(toggle.strategies):
        try:
            strategy = msgspec.convert(raw, _Strategy, strict=False)
        except msgspec.ValidationError as exc:
            raise FlagsEditError(f"strategy {index + 1} cannot be read ({exc})") from exc
        if strategy.disabled:
            continue
        allowed = _allow_list(strategy, segments)
        summary = _strategy_summary(strategy, allowed)
        reads.append(_Read(index, raw, strategy, allowed, summary))
    return reads


# --- what the release manager sees ----------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """The toggle in the release manager's words."""

    enabled: bool
    allow_list: tuple[str, ...]
    rollout: int | None  # the rollout strategy's percentage; None without one
    stickiness: str | None
    everyone: bool  # a strategy enables every merchant
    strategies: tuple[dict[str, Any], ...]  # the router's summary of each enabled strategy

    def as_json(self) -> dict[str, Any]:
        return {
            "toggle": TOGGLE,
            "enabled": self.enabled,
            "kill_switch": "off" if self.enabled else "on",
            "allow_list": list(self.allow_list),
            "rollout": self.rollout,
            "stickiness": self.stickiness,
            "everyone": self.everyone,
            "strategies": list(self.strategies),
        }

    def lines(self) -> dict[str, str]:
        """One line per aspect, keyed by its label (what a change prints as before → after)."""
        kill = "off (toggle enabled)" if self.enabled else "on (every new withdrawal goes legacy)"
        if self.everyone:
            rollout = "every merchant (a strategy without constraints)"
        elif self.rollout is None:
            rollout = "none"
        else:
            rollout = f"{self.rollout} % of merchants (stickiness {self.stickiness})"
        lines = {
            "kill switch": kill,
            "allow-list": ", ".join(self.allow_list) if self.allow_list else "nobody",
            "rollout": rollout,
        }
        others = [s for s in self.strategies if s["kind"] == "other"]
        if others:
            lines["other strategies"] = (
                f"{len(others)} (constraints this command does not edit; the router counts"
                " the merchants they enable as rollout)"
            )
        return lines


def summarize(toggle: Toggle) -> Summary:
    reads = _read(toggle)
    listed = sorted({m for r in reads if r.allowed is not None for m in r.allowed})
    rollouts = [r for r in reads if r.summary["kind"] == "rollout"]
    return Summary(
        enabled=toggle.enabled,
        allow_list=tuple(listed),
        rollout=max((r.summary["rollout"] for r in rollouts), default=None),
        stickiness=rollouts[0].summary["stickiness"] if rollouts else None,
        everyone=any(r.summary["kind"] == "everyone" for r in reads),
        strategies=tuple(r.summary for r in reads),
    )


def apply(toggle: Toggle, edits: tuple[Edit, ...]) -> Toggle:
    """The toggle once ``edits`` are made."""
    strategies: list[dict[str, Any] | None] = list(toggle.strategies)
    enabled = toggle.enabled
    for edit in edits:
        if edit.action == "update":
            strategies[edit.index] = edit.strategy
        elif edit.action == "delete":
            strategies[edit.index] = None  # indexes stay valid until every edit is made
        elif edit.action == "add":
            strategies.append(edit.strategy)
        else:
            enabled = edit.action == "enable"
    kept = tuple(s for s in strategies if s is not None)
    return Toggle(enabled=enabled, strategies=kept, segments=toggle.segments)


# --- the moves ------------------------------------------------------------------------------


def check_merchant(merchant: str) -> str:
    """A merchant id as the legacy API accepts it, else FlagsEditError."""
    if not merchant.strip():
        raise FlagsEditError("the merchant id is empty")
    if MERCHANT_ID.fullmatch(merchant) is None:
        raise FlagsEditError(
            f"merchant id {merchant!r} is not 1-64 letters, digits, '_' or '-'"
            " (the API's rule for merchant_id)"
        )
    return merchant


def check_percent(text: str) -> int:
    """A whole percentage 0..100 (``10`` or ``10%``), else FlagsEditError."""
    digits = text.strip().removesuffix("%").strip()
    if not digits.isdecimal() or not 0 <= int(digits) <= 100:
        raise FlagsEditError(f"the rollout must be a whole percentage from 0 to 100, not {text!r}")
    return int(digits)


def _kill_switch_note(toggle: Toggle) -> tuple[str, ...]:
    if toggle.enabled:
        return ()
    return ("the kill switch is on: every new withdrawal stays legacy until `flags kill off`",)


def plan_allow(toggle: Toggle, merchant: str) -> Plan:
    """Put ``merchant`` on the allow-list: into the first plain allow-list, else a new one."""
    reads = _read(toggle)
    if any(r.allowed is not None and merchant in r.allowed for r in reads):
        return Plan(unchanged=f"{merchant} is already on the allow-list")
    notes = _kill_switch_note(toggle)
    for r in reads:
        # Plain: one merchantId IN constraint of its own, no segment shared with others.
        if r.allowed is not None and not r.strategy.segments and len(r.strategy.constraints) == 1:
            strategy = copy.deepcopy(r.raw)
            constraint = strategy["constraints"][0]
            constraint["values"] = [*constraint.get("values", []), merchant]
            return Plan(edits=(Edit("update", r.index, strategy),), notes=notes)
    return Plan(edits=(Edit("add", strategy=new_allow_list([merchant])),), notes=notes)


def plan_disallow(toggle: Toggle, merchant: str) -> Plan:
    """Take ``merchant`` off every allow-list that names it."""
    reads = _read(toggle)
    listing = [r for r in reads if r.allowed is not None and merchant in r.allowed]
    if not listing:
        return Plan(unchanged=f"{merchant} is not on the allow-list")
    for r in listing:
        if r.strategy.segments:
            raise FlagsEditError(
                f"{merchant} is on the allow-list through segment(s)"
                f" {', '.join(map(str, r.strategy.segments))} (strategy {r.index + 1}):"
                " edit the segment itself, it may serve other toggles"
            )
    edits = []
    for r in listing:
        strategy = copy.deepcopy(r.raw)
        for constraint in strategy["constraints"]:
            constraint["values"] = [v for v in constraint.get("values", []) if v != merchant]
        emptied = any(not c["values"] for c in strategy["constraints"])
        edits.append(Edit("delete", r.index) if emptied else Edit("update", r.index, strategy))
    deleted = {e.index for e in edits if e.action == "delete"}
    notes: tuple[str, ...] = ()
    if toggle.enabled and all(r.index in deleted for r in reads):
        # Enabled without strategies would be on for everyone: off is what "nobody" means.
        edits.append(Edit("disable"))
        notes = (
            "no strategy is left, so the toggle is switched off (kill switch on): an enabled"
            " toggle without strategies would send every merchant to the cascade",
        )
    if any(r.summary["kind"] != "allow_list" for r in reads if r.index not in deleted):
        notes += (f"{merchant} may still be routed to the cascade by the other strategies",)
    return Plan(edits=tuple(edits), notes=notes)


def plan_rollout(toggle: Toggle, percent: int) -> Plan:
    """Set the percentage of merchants (sticky) the rollout strategy sends to the cascade."""
    reads = _read(toggle)
    for r in reads:
        if r.summary["kind"] == "everyone":
            raise FlagsEditError(
                f"strategy {r.index + 1} ({r.strategy.name} without constraints) already enables"
                " every merchant: a rollout percentage would change nothing"
            )
    rollouts = [r for r in reads if r.summary["kind"] == "rollout"]
    if len(rollouts) > 1:
        numbers = ", ".join(str(r.index + 1) for r in rollouts)
        raise FlagsEditError(
            f"strategies {numbers} are all rollouts: keep one, then run this again"
        )
    notes = _kill_switch_note(toggle)
    if not rollouts:
        if percent == 0:
            return Plan(unchanged="there is no rollout (0 % already)")
        return Plan(edits=(Edit("add", strategy=new_rollout(percent)),), notes=notes)
    current = rollouts[0]
    if current.summary["rollout"] == percent:
        return Plan(unchanged=f"the rollout already is {percent} %")
    strategy = copy.deepcopy(current.raw)
    strategy["parameters"] = {**strategy.get("parameters", {}), "rollout": str(percent)}
    if current.summary["stickiness"] != STICKINESS:
        notes += (
            f"the rollout's stickiness is {current.summary['stickiness']!r}, not {STICKINESS!r}:"
            " a merchant's cohort is not sticky",
        )
    return Plan(edits=(Edit("update", current.index, strategy),), notes=notes)


def plan_kill(toggle: Toggle, *, on: bool) -> Plan:
    """Kill switch on: the toggle off (every new withdrawal legacy); off: the toggle on."""
    if on:
        if not toggle.enabled:
            return Plan(unchanged="the kill switch already is on (toggle disabled)")
        return Plan(edits=(Edit("disable"),))
    if toggle.enabled:
        return Plan(unchanged="the kill switch already is off (toggle enabled)")
    if not _read(toggle):
        raise FlagsEditError(
            "the toggle has no strategy, and enabled without one it would send every merchant"
            " to the cascade: add merchants (flags allow) or a rollout (flags rollout) first"
        )
    return Plan(edits=(Edit("enable"),))


def new_allow_list(merchants: list[str]) -> dict[str, Any]:
    """A 100 % rollout constrained to ``merchantId IN merchants`` (as Unleash's UI makes it)."""
    return {
        "name": "flexibleRollout",
        "parameters": {"rollout": "100", "stickiness": "default", "groupId": TOGGLE},
        "constraints": [
            {
                "contextName": "merchantId",
                "operator": "IN",
                "values": merchants,
                "inverted": False,
                "caseInsensitive": False,
            }
        ],
        "segments": [],
    }


def new_rollout(percent: int) -> dict[str, Any]:
    """A rollout of ``percent`` % of merchants, sticky by merchant."""
    return {
        "name": "flexibleRollout",
        "parameters": {"rollout": str(percent), "stickiness": STICKINESS, "groupId": TOGGLE},
        "constraints": [],
        "segments": [],
    }
