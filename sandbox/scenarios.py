"""Traffic scenarios: a provider population described by behaviour and probability.

A scenario is one JSON object::

    {
      "name": "eu-payouts",
      "seed": 42,
      "providers": {
        "fast": {"approval_rate": 0.7, "accept_then_fail_rate": 0.1,
                 "latency": {"distribution": "lognormal", "median_ms": 120, "p95_ms": 900},
                 "webhook_delay": {"distribution": "uniform", "min_ms": 500, "max_ms": 9000},
                 "ambiguous_error_rate": 0.05, "never_answers_rate": 0.02},
        "cheap": {"approval_rate": 0.3}
      },
      "withdrawals": {
        "count": 1000,
        "cascade_length": {"weights": {"1": 0.2, "2": 0.5, "3": 0.3}},
        "amount": {"min": "5.00", "max": "900.00"},
        "currency": "EUR"
      },
      "outages": [
        {"provider": "sbx_scn_fast", "start_after_seconds": 30, "duration_seconds": 60,
         "error_ratio": 1.0}
      ]
    }

How one provider attempt is decided (:func:`draw_attempt`):

1. With ``ambiguous_error_rate`` the create answers ambiguously — ``503`` or, with
   ``ambiguous_timeout_share``, a hang of ``timeout_ms`` then ``504``. With
   ``ambiguous_created_ratio`` the order exists anyway and its fate is drawn as in step 2 among
   the accepting outcomes only; otherwise it is ``absent``.
2. Otherwise the create is definitive: ``approval_rate`` succeeds (webhook after
   ``webhook_delay``), ``accept_then_fail_rate`` is accepted and fails later,
   ``never_answers_rate`` is accepted and never heard of again, and the remainder is declined
   at create. The three rates are shares of all non-ambiguous attempts, so they must sum to at
   most 1.

:func:`plan` draws every attempt of every withdrawal up front from the seed, one RNG per
withdrawal (so adding withdrawals leaves the earlier ones unchanged): the same scenario always
gives the same plan. Provider ids in a plan are ``sbx_scn_<name>``, which the sandbox serves
with these behaviours when it is given the scenario.

``outages`` (optional) scripts provider outages, each on any provider the sandbox serves
(``sbx_scn_<name>``, ``sbx_a``, ``sbx_ok`` …): from ``start_after_seconds`` after the first
start of a sandbox with this scenario on its schema, for ``duration_seconds``, that provider
answers ``error_ratio`` of every request (create, status, cancel) with ``503`` and holds
``timeout_ratio`` of them ``timeout_seconds`` before a ``504``, exactly as ``PUT
/sandbox/providers/{id}/outage`` does (:mod:`sandbox.outages`). Outages change nothing in
:func:`plan`: the plan is what the providers would do when healthy.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Literal

import msgspec

SCENARIO_PROVIDER_PREFIX = "sbx_scn_"
MAX_OUTAGE_SECONDS = 86_400.0
"""The longest outage (and the latest start of a scenario's one): a day."""
MAX_OUTAGE_TIMEOUT_SECONDS = 600.0
_P95_Z = 1.6448536269514722  # standard normal quantile of 0.95


class Fixed(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="fixed",
    tag_field="distribution",
):
    value_ms: float


class Uniform(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="uniform",
    tag_field="distribution",
):
    min_ms: float
    max_ms: float


class Lognormal(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="lognormal",
    tag_field="distribution",
):
    """Latency-shaped: given by its median and 95th percentile, both in milliseconds."""

    median_ms: float
    p95_ms: float


Distribution = Fixed | Uniform | Lognormal


class ScenarioProvider(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One provider's behaviour as probabilities and timing distributions."""

    approval_rate: float
    accept_then_fail_rate: float = 0.0
    never_answers_rate: float = 0.0
    ambiguous_error_rate: float = 0.0
    ambiguous_created_ratio: float = 0.5
    ambiguous_timeout_share: float = 0.5
    timeout_ms: float = 5000.0
    latency: Distribution = Fixed(value_ms=50.0)
    webhook_delay: Distribution = Fixed(value_ms=1000.0)
    decline_code: str = "declined"
    fail_code: str = "declined"


class CascadeLength(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Either ``weights`` (length -> relative weight) or a uniform ``min``..``max``."""

    min: int = 1
    max: int = 1
    weights: dict[int, float] | None = None


class AmountRange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    min: str
    max: str


class WithdrawalMix(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    count: int
    amount: AmountRange
    cascade_length: CascadeLength = CascadeLength()
    currency: str = "EUR"
    id_prefix: str = "scn"


class ScenarioOutage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A provider outage at a fixed offset from the scenario's start."""

    provider: str
    """The provider id the gateway calls (``sbx_scn_fast``, ``sbx_a``)."""
    duration_seconds: float
    start_after_seconds: float = 0.0
    error_ratio: float = 0.0
    timeout_ratio: float = 0.0
    timeout_seconds: float | None = None
    """How long a timed-out request is held; ``None``: the sandbox's flaky timeout."""


def outage_problem(
    *,
    error_ratio: float,
    timeout_ratio: float,
    duration_seconds: float,
    timeout_seconds: float | None,
) -> str | None:
    """What is wrong with an outage's numbers, in one line, or ``None`` (shared by scenario
    files and ``PUT /sandbox/providers/{id}/outage``)."""
    for name, ratio in (("error_ratio", error_ratio), ("timeout_ratio", timeout_ratio)):
        if not 0 <= ratio <= 1:
            return f"{name} must be within 0..1, got {ratio}"
    if error_ratio + timeout_ratio > 1 + 1e-9:
        return f"error_ratio + timeout_ratio must be at most 1, got {error_ratio + timeout_ratio:g}"
    if error_ratio + timeout_ratio <= 0:
        return "an outage needs error_ratio or timeout_ratio above 0"
    if not 0 < duration_seconds <= MAX_OUTAGE_SECONDS:
        return (
            f"duration_seconds must be above 0 and at most {MAX_OUTAGE_SECONDS:g},"
            f" got {duration_seconds}"
        )
    if timeout_seconds is not None and not 0 < timeout_seconds <= MAX_OUTAGE_TIMEOUT_SECONDS:
        return (
            f"timeout_seconds must be above 0 and at most {MAX_OUTAGE_TIMEOUT_SECONDS:g},"
            f" got {timeout_seconds}"
        )
    return None


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    providers: dict[str, ScenarioProvider]
    withdrawals: WithdrawalMix
    name: str = "scenario"
    seed: int = 0
    outages: tuple[ScenarioOutage, ...] = ()

    def provider(self, provider_id: str) -> ScenarioProvider | None:
        """The scenario provider behind an ``sbx_scn_<name>`` id, if any."""
        if not provider_id.startswith(SCENARIO_PROVIDER_PREFIX):
            return None
        return self.providers.get(provider_id.removeprefix(SCENARIO_PROVIDER_PREFIX))


CreateAnswer = Literal["accepted", "declined", "503", "timeout"]
AttemptOutcome = Literal["succeeded", "failed", "silent", "declined", "absent"]


class PlannedAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """What one provider does with one order, decided before the run."""

    provider_id: str
    answer: CreateAnswer
    """What the create call answers."""
    outcome: AttemptOutcome
    """What finally happens: ``absent`` means the order never existed."""
    latency_ms: float
    webhook_delay_ms: float
    timeout_ms: float
    code: str | None = None

    @property
    def order_exists(self) -> bool:
        return self.outcome in ("succeeded", "failed", "silent")


class PlannedWithdrawal(msgspec.Struct, frozen=True, kw_only=True):
    withdrawal_id: str
    amount: str
    currency: str
    cascade: tuple[str, ...]
    attempts: tuple[PlannedAttempt, ...]
    """One per cascade entry, drawn even if the run stops before reaching it."""


class ScenarioError(Exception):
    """The scenario cannot be used; the message names the problem in one line."""


# -- loading ---------------------------------------------------------------------------------


class _ScenarioFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Providers stay raw at first: msgspec reports errors inside a dict value as
    # ``$.providers[...]``, so each is decoded on its own to name it in the message.
    providers: dict[str, msgspec.Raw]
    withdrawals: WithdrawalMix
    name: str = "scenario"
    seed: int = 0
    outages: tuple[ScenarioOutage, ...] = ()


def _at(path: str, exc: msgspec.ValidationError) -> str:
    """msgspec's message with its ``$`` path rooted at ``path``."""
    message = str(exc)
    if " - at `$" in message:
        return message.replace(" - at `$", f" - at `{path}", 1)
    return f"{message} - at `{path}`"


def load_scenario(raw: bytes, source: str = "scenario") -> Scenario:
    """Parse and validate a scenario; every problem is a one-line :class:`ScenarioError`."""
    try:
        parsed = msgspec.json.decode(raw, type=_ScenarioFile)
        providers: dict[str, ScenarioProvider] = {}
        for name, body in parsed.providers.items():
            try:
                providers[name] = msgspec.json.decode(body, type=ScenarioProvider)
            except msgspec.ValidationError as exc:
                raise ScenarioError(f"{source}: {_at(f'$.providers.{name}', exc)}") from exc
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{source}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ScenarioError(f"{source}: not valid JSON ({exc})") from exc
    scenario = Scenario(
        providers=providers,
        withdrawals=parsed.withdrawals,
        name=parsed.name,
        seed=parsed.seed,
        outages=parsed.outages,
    )
    validate(scenario, source)
    return scenario


def validate(scenario: Scenario, source: str = "scenario") -> None:
    """Check what the types cannot say; raise :class:`ScenarioError` on the first problem."""

    def fail(message: str) -> ScenarioError:
        return ScenarioError(f"{source}: {message}")

    if not scenario.providers:
        raise fail("providers must name at least one provider")
    for name, p in scenario.providers.items():
        where = f"providers.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_]{1,48}", name):
            raise fail(f"{where}: name must be 1..48 letters, digits or underscores")
        rates = {
            "approval_rate": p.approval_rate,
            "accept_then_fail_rate": p.accept_then_fail_rate,
            "never_answers_rate": p.never_answers_rate,
            "ambiguous_error_rate": p.ambiguous_error_rate,
            "ambiguous_created_ratio": p.ambiguous_created_ratio,
            "ambiguous_timeout_share": p.ambiguous_timeout_share,
        }
        for field_name, value in rates.items():
            if not 0 <= value <= 1:
                raise fail(f"{where}.{field_name} must be within 0..1, got {value}")
        definitive = p.approval_rate + p.accept_then_fail_rate + p.never_answers_rate
        if definitive > 1 + 1e-9:
            raise fail(
                f"{where}: approval_rate + accept_then_fail_rate + never_answers_rate "
                f"must be at most 1, got {definitive:g}"
            )
        if p.timeout_ms < 0:
            raise fail(f"{where}.timeout_ms must not be negative")
        _check_distribution(p.latency, f"{where}.latency", fail)
        _check_distribution(p.webhook_delay, f"{where}.webhook_delay", fail)
    mix = scenario.withdrawals
    if not 1 <= mix.count <= 1_000_000:
        raise fail(f"withdrawals.count must be within 1..1000000, got {mix.count}")
    if not mix.currency:
        raise fail("withdrawals.currency must not be empty")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", mix.id_prefix):
        raise fail("withdrawals.id_prefix must be 1..32 letters, digits, '_' or '-'")
    low, high = _amount(mix.amount.min, "min", fail), _amount(mix.amount.max, "max", fail)
    if high < low:
        raise fail(f"withdrawals.amount.max {high} is below min {low}")
    lengths = mix.cascade_length
    if lengths.weights is not None:
        if not lengths.weights:
            raise fail("withdrawals.cascade_length.weights must not be empty")
        for length, weight in lengths.weights.items():
            if length < 1:
                raise fail(f"withdrawals.cascade_length.weights: length {length} is below 1")
            if weight < 0 or not math.isfinite(weight):
                raise fail(f"withdrawals.cascade_length.weights[{length}] must be >= 0")
        if sum(lengths.weights.values()) <= 0:
            raise fail("withdrawals.cascade_length.weights must not all be 0")
        longest = max(length for length, w in lengths.weights.items() if w > 0)
    else:
        if lengths.min < 1 or lengths.max < lengths.min:
            raise fail("withdrawals.cascade_length needs 1 <= min <= max")
        longest = lengths.max
    if longest > len(scenario.providers):
        raise fail(
            f"withdrawals.cascade_length allows {longest} providers "
            f"but the scenario has {len(scenario.providers)}"
        )
    _check_outages(scenario, fail)


def _check_outages(scenario: Scenario, fail: Callable[[str], ScenarioError]) -> None:
    windows: dict[str, list[tuple[float, float, int]]] = {}
    for index, outage in enumerate(scenario.outages):
        where = f"outages[{index}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", outage.provider):
            raise fail(f"{where}.provider must be 1..64 letters, digits, '_' or '-'")
        if outage.provider.startswith(SCENARIO_PROVIDER_PREFIX) and (
            scenario.provider(outage.provider) is None
        ):
            raise fail(f"{where}.provider {outage.provider} is not a provider of this scenario")
        problem = outage_problem(
            error_ratio=outage.error_ratio,
            timeout_ratio=outage.timeout_ratio,
            duration_seconds=outage.duration_seconds,
            timeout_seconds=outage.timeout_seconds,
        )
        if problem is not None:
            raise fail(f"{where}: {problem}")
        start = outage.start_after_seconds
        if not 0 <= start <= MAX_OUTAGE_SECONDS:
            raise fail(f"{where}.start_after_seconds must be within 0..{MAX_OUTAGE_SECONDS:g}")
        windows.setdefault(outage.provider, []).append(
            (start, start + outage.duration_seconds, index)
        )
    for provider, spans in windows.items():
        spans.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(spans):
            if start < end:
                raise fail(
                    f"outages[{first}] and outages[{second}] overlap on {provider}:"
                    " one provider has one outage at a time"
                )


def _amount(text: str, which: str, fail: Callable[[str], ScenarioError]) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise fail(f"withdrawals.amount.{which} is not a decimal: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise fail(f"withdrawals.amount.{which} must be positive, got {text!r}")
    if value != value.quantize(Decimal("0.01")):
        raise fail(f"withdrawals.amount.{which} has more than two decimals: {text!r}")
    return value


def _check_distribution(
    dist: Distribution, where: str, fail: Callable[[str], ScenarioError]
) -> None:
    match dist:
        case Fixed(value_ms=value):
            ok = value >= 0
            rule = "value_ms >= 0"
        case Uniform(min_ms=low, max_ms=high):
            ok = 0 <= low <= high
            rule = "0 <= min_ms <= max_ms"
        case Lognormal(median_ms=median, p95_ms=p95):
            ok = 0 < median <= p95
            rule = "0 < median_ms <= p95_ms"
    if not ok or not all(math.isfinite(v) for v in msgspec.structs.astuple(dist)):
        raise fail(f"{where} needs {rule}")


# -- drawing ---------------------------------------------------------------------------------


def sample_ms(dist: Distribution, rng: random.Random) -> float:
    """One draw from a timing distribution, in milliseconds."""
    match dist:
        case Fixed(value_ms=value):
            return value
        case Uniform(min_ms=low, max_ms=high):
            return rng.uniform(low, high)
        case Lognormal(median_ms=median, p95_ms=p95):
            sigma = (math.log(p95) - math.log(median)) / _P95_Z
            return rng.lognormvariate(math.log(median), sigma)


def draw_attempt(provider_id: str, p: ScenarioProvider, rng: random.Random) -> PlannedAttempt:
    """Decide one attempt on one provider (the rules are in the module docstring).

    Always consumes the same number of draws, so the stream stays aligned whatever the
    outcome.
    """
    ambiguous_roll, created_roll, mode_roll, fate_roll = (rng.random() for _ in range(4))
    latency = sample_ms(p.latency, rng)
    webhook_delay = sample_ms(p.webhook_delay, rng)
    accepting = p.approval_rate + p.accept_then_fail_rate + p.never_answers_rate

    def fate(roll: float, *, accepted_only: bool) -> tuple[AttemptOutcome, str | None]:
        if accepted_only:
            if accepting <= 0:
                return "succeeded", None
            roll *= accepting
        if roll < p.approval_rate:
            return "succeeded", None
        if roll < p.approval_rate + p.accept_then_fail_rate:
            return "failed", p.fail_code
        if roll < accepting:
            return "silent", None
        return "declined", p.decline_code

    answer: CreateAnswer
    if ambiguous_roll < p.ambiguous_error_rate:
        answer = "timeout" if mode_roll < p.ambiguous_timeout_share else "503"
        if created_roll < p.ambiguous_created_ratio:
            outcome, code = fate(fate_roll, accepted_only=True)
        else:
            outcome, code = "absent", None
    else:
        outcome, code = fate(fate_roll, accepted_only=False)
        answer = "declined" if outcome == "declined" else "accepted"
    return PlannedAttempt(
        provider_id=provider_id,
        answer=answer,
        outcome=outcome,
        latency_ms=latency,
        webhook_delay_ms=webhook_delay,
        timeout_ms=p.timeout_ms,
        code=code,
    )


def plan(scenario: Scenario) -> list[PlannedWithdrawal]:
    """Every withdrawal and every provider outcome of a run, drawn up front from the seed."""
    mix = scenario.withdrawals
    names = sorted(scenario.providers)
    low_cents = int(Decimal(mix.amount.min) * 100)
    high_cents = int(Decimal(mix.amount.max) * 100)
    lengths = mix.cascade_length
    planned: list[PlannedWithdrawal] = []
    for index in range(mix.count):
        # Seeded on purpose (reproducible runs); one stream per withdrawal.
        rng = random.Random(f"{scenario.seed}:{index}")  # noqa: S311
        if lengths.weights is not None:
            options = sorted(lengths.weights)
            length = rng.choices(options, weights=[lengths.weights[o] for o in options])[0]
        else:
            length = rng.randint(lengths.min, lengths.max)
        chosen = rng.sample(names, length)
        cents = rng.randint(low_cents, high_cents)
        cascade = tuple(SCENARIO_PROVIDER_PREFIX + name for name in chosen)
        attempts = tuple(
            draw_attempt(provider_id, scenario.providers[name], rng)
            for provider_id, name in zip(cascade, chosen, strict=True)
        )
        planned.append(
            PlannedWithdrawal(
                withdrawal_id=f"{mix.id_prefix}-{scenario.seed}-{index:07d}",
                amount=f"{Decimal(cents) / 100:.2f}",
                currency=mix.currency,
                cascade=cascade,
                attempts=attempts,
            )
        )
    return planned


ExpectedOutcome = Literal["succeeded", "failed", "manual_check"]


def expected_outcome(
    withdrawal: PlannedWithdrawal, *, single_shot: bool = False
) -> ExpectedOutcome:
    """Where an ideal executor ends: walk the cascade (or only its first entry).

    A silent provider ends in manual check: nothing proves the order will not still be paid,
    so moving on would risk paying twice.
    """
    attempts = withdrawal.attempts[:1] if single_shot else withdrawal.attempts
    for attempt in attempts:
        if attempt.outcome == "succeeded":
            return "succeeded"
        if attempt.outcome == "silent":
            return "manual_check"
    return "failed"


def summarize(planned: list[PlannedWithdrawal]) -> dict[str, float | int]:
    """Ideal success rates of single-shot versus cascade execution for one plan."""
    total = len(planned)
    single = sum(expected_outcome(w, single_shot=True) == "succeeded" for w in planned)
    cascade = [expected_outcome(w) for w in planned]
    return {
        "withdrawals": total,
        "single_shot_success_rate": single / total if total else 0.0,
        "cascade_success_rate": cascade.count("succeeded") / total if total else 0.0,
        "cascade_manual_checks": cascade.count("manual_check"),
    }
