"""The ``PROVIDERS_FILE`` format: per-provider endpoints, secrets, timers and error table.

JSON, one object ``{"providers": {"<provider_id>": {...}}}``. String values may reference
environment variables as ``${NAME}`` or ``${NAME:-default}``; the loader expands them from the
mapping it is given so one file serves ``make run`` on any port.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import msgspec

from contracts.provider import MIN_KEY_LENGTH

Decision = Literal["next_provider", "recheck", "manual_check", "stop_cascade"]
DECISIONS: tuple[str, ...] = ("next_provider", "recheck", "manual_check", "stop_cascade")
MAX_SECONDS = 365 * 86400.0
"""The longest duration a providers file may set: timers must stay within date arithmetic."""


class RecheckPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Exponential backoff for polling a provider after an ambiguous create."""

    initial_delay_seconds: float = 1.0
    multiplier: float = 2.0
    max_delay_seconds: float = 60.0
    max_attempts: int = 10


class StatusPolling(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional fallback polling of an executing order after its webhook SLA passed.

    Polling ends in manual check after ``max_polls`` polls that found the order pending, or
    at ``timeout_seconds`` (when set), whichever comes first.
    """

    interval_seconds: float = 5.0
    max_polls: int = 3
    # The longest an executing order is polled, counted from the moment polling starts: when
    # the webhook SLA expired, or when EXECUTING was entered if the provider has no SLA.
    # None: only max_polls bounds the polling.
    timeout_seconds: float | None = None


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    connect_seconds: float = 2.0
    read_seconds: float = 10.0


class BreakerPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The fleet-wide circuit breaker of one provider (defaults as resilience4j's and
    Hystrix's). Only technical failures count: a connect error, a timeout, a 5xx, an answer
    that does not decode; a business decline is the provider working."""

    # Open when at least this share of the calls in the window failed technically...
    failure_rate: float = 0.5
    # ...and the window holds at least this many calls.
    min_calls: int = 20
    window_seconds: float = 60.0
    # How long an open breaker sends nothing new before one probe is let through.
    open_seconds: float = 30.0
    # Probes in a row that must succeed (one at a time, fleet-wide) to close it again.
    half_open_probes: int = 1


class RateLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """New orders per second a provider accepts from the whole fleet, with a burst."""

    per_second: float
    burst: int = 1


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An error table entry that creates the order again at the same provider, for a code
    that says "not created, try again later" (``rate_limited``). Only a definitive decline at
    create is retried, with the same order id (the provider's idempotency key); once
    ``max_attempts`` creates (the first included) were declined, ``then`` decides."""

    decision: Literal["retry"]
    # Creates at this provider in all, the first included (1: no retry, ``then`` at once).
    max_attempts: int = 3
    backoff: Literal["exponential", "fixed"] = "exponential"
    # Before the first retry; exponential doubles it for each further one, up to the cap.
    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 60.0
    then: Decision = "next_provider"

    def delay(self, retries: int) -> float:
        """Seconds before the retry that follows ``retries`` earlier ones."""
        if self.backoff == "fixed":
            return self.base_delay_seconds
        # Capped before the power could overflow a float (max_attempts is bounded).
        grown = self.base_delay_seconds * 2.0 ** min(retries, 1000)
        return min(self.max_delay_seconds, grown)


MAX_CREATE_ATTEMPTS = 100
"""The most creates a retry policy may ask for at one provider."""


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One provider's integration settings."""

    base_url: str
    webhook_secrets: tuple[str, ...] = ()
    # False: the provider sends no webhooks (answers synchronously, or is polled); then it
    # needs no secrets. True (the default) without secrets is refused: unverifiable.
    webhooks: bool = True
    # None: no SLA — an accepted order with no webhook goes straight to manual check rules.
    webhook_sla_seconds: float | None = 900.0
    status_polling: StatusPolling | None = None
    recheck: RecheckPolicy = RecheckPolicy()
    timeouts: Timeouts = Timeouts()
    idempotency_key_max_length: int = 64
    supports_cancel: bool = False
    # A decision per decline code, or a retry policy (:class:`RetryPolicy`).
    errors: dict[str, Decision | RetryPolicy] = {}
    default_decision: Decision = "next_provider"
    # Provider health (README, *Provider health*). None: no breaker, the cascade order is
    # followed blindly.
    breaker: BreakerPolicy | None = BreakerPolicy()
    # How long a withdrawal whose every remaining provider is open waits for one to recover
    # before its next attempt is made anyway.
    hold_seconds: float = 900.0
    rate_limit: RateLimit | None = None
    # Attempts being created or rechecked at once at this provider, fleet-wide.
    max_in_flight: int | None = None

    def decision_for(self, code: str) -> Decision:
        """What a definitive provider error code means for the cascade (for a code that is
        retried: once its retries are spent)."""
        entry = self.errors.get(code, self.default_decision)
        return entry.then if isinstance(entry, RetryPolicy) else entry

    def single_shot(self) -> ProviderConfig:
        """The provider as the legacy path uses it: one create whose answer decides, as the
        system it replaces did — no retry at the provider (a retried code's ``then`` at
        once), no breaker, no limits."""
        errors = {
            code: entry.then if isinstance(entry, RetryPolicy) else entry
            for code, entry in self.errors.items()
        }
        return msgspec.structs.replace(
            self, errors=errors, breaker=None, rate_limit=None, max_in_flight=None
        )

    def retry_for(self, code: str) -> RetryPolicy | None:
        """The retry policy of a decline code, if the error table retries it."""
        entry = self.errors.get(code)
        return entry if isinstance(entry, RetryPolicy) else None


class ProvidersFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    providers: dict[str, ProviderConfig]


class ProvidersFileError(Exception):
    """The providers file cannot be used; the message names the problem in one line."""


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}`` from ``env``; unknown names are an error."""

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ProvidersFileError(f"providers file references ${{{name}}}, which is not set")

    return _VAR.sub(repl, text)


def load_providers(
    raw: bytes, env: Mapping[str, str], source: str = "PROVIDERS_FILE"
) -> ProvidersFile:
    """Parse and validate a providers file; every problem is a one-line ProvidersFileError."""
    try:
        text = expand(raw.decode("utf-8"), env)
        parsed = msgspec.json.decode(text, type=ProvidersFile)
    except UnicodeDecodeError as exc:
        raise ProvidersFileError(f"{source}: not UTF-8 ({exc.reason})") from exc
    except msgspec.ValidationError as exc:
        hint, text = "", str(exc)
        if text.startswith("Invalid enum value 'retry'") and text.endswith(".errors[...]`"):
            hint = ' (a retry is an object: {"decision": "retry", "max_attempts": 3, …})'
        raise ProvidersFileError(f"{source}: {exc}{hint}") from exc
    except msgspec.DecodeError as exc:
        raise ProvidersFileError(f"{source}: not valid JSON ({exc})") from exc
    for provider_id, config in parsed.providers.items():
        where = f"{source}: {provider_id}"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", provider_id):
            raise ProvidersFileError(f"{source}: provider id {provider_id!r} is not a valid id")
        if not config.base_url.startswith(("http://", "https://")):
            raise ProvidersFileError(f"{where}.base_url must be an http(s) URL")
        if config.idempotency_key_max_length < MIN_KEY_LENGTH:
            raise ProvidersFileError(
                f"{where}.idempotency_key_max_length must be at least {MIN_KEY_LENGTH}"
            )
        for name, seconds in _durations(config):
            if seconds is not None and not 0 < seconds <= MAX_SECONDS:
                raise ProvidersFileError(
                    f"{where}.{name} must be greater than 0 and at most {MAX_SECONDS:.0f}"
                    f" (365 days), not {seconds:g}"
                )
        _check_counts(config, where)
        _check_webhooks(config, where)
    return parsed


def _durations(config: ProviderConfig) -> list[tuple[str, float | None]]:
    """Every duration of a provider's settings, named as in the file."""
    durations: list[tuple[str, float | None]] = [
        ("webhook_sla_seconds", config.webhook_sla_seconds),
        ("recheck.initial_delay_seconds", config.recheck.initial_delay_seconds),
        ("recheck.max_delay_seconds", config.recheck.max_delay_seconds),
        ("timeouts.connect_seconds", config.timeouts.connect_seconds),
        ("timeouts.read_seconds", config.timeouts.read_seconds),
        ("hold_seconds", config.hold_seconds),
    ]
    for code, entry in config.errors.items():
        if isinstance(entry, RetryPolicy):
            durations.append((f"errors.{code}.base_delay_seconds", entry.base_delay_seconds))
            durations.append((f"errors.{code}.max_delay_seconds", entry.max_delay_seconds))
    if config.breaker is not None:
        durations.append(("breaker.window_seconds", config.breaker.window_seconds))
        durations.append(("breaker.open_seconds", config.breaker.open_seconds))
    if config.status_polling is not None:
        durations.append(
            ("status_polling.interval_seconds", config.status_polling.interval_seconds)
        )
        durations.append(("status_polling.timeout_seconds", config.status_polling.timeout_seconds))
    return durations


def _check_webhooks(config: ProviderConfig, where: str) -> None:
    if config.webhooks and not config.webhook_secrets:
        raise ProvidersFileError(
            f"{where} has no webhook_secrets, so its webhooks could not be verified: add its"
            ' signing secrets, or set "webhooks": false if it sends none'
        )
    if not config.webhooks and config.webhook_secrets:
        raise ProvidersFileError(
            f'{where} has "webhooks": false and webhook_secrets: remove one of the two'
        )


def _check_counts(config: ProviderConfig, where: str) -> None:
    recheck = config.recheck
    if recheck.max_attempts < 1:
        raise ProvidersFileError(f"{where}.recheck.max_attempts must be at least 1")
    if recheck.multiplier < 1:
        raise ProvidersFileError(f"{where}.recheck.multiplier must be at least 1")
    if recheck.max_delay_seconds < recheck.initial_delay_seconds:
        raise ProvidersFileError(
            f"{where}.recheck.max_delay_seconds must be at least recheck.initial_delay_seconds"
        )
    if config.status_polling is not None and config.status_polling.max_polls < 1:
        raise ProvidersFileError(f"{where}.status_polling.max_polls must be at least 1")
    _check_retries(config, where)
    _check_health(config, where)


def _check_retries(config: ProviderConfig, where: str) -> None:
    for code, entry in config.errors.items():
        if not isinstance(entry, RetryPolicy):
            continue
        if not 1 <= entry.max_attempts <= MAX_CREATE_ATTEMPTS:
            raise ProvidersFileError(
                f"{where}.errors.{code}.max_attempts must be at least 1 and at most"
                f" {MAX_CREATE_ATTEMPTS}, not {entry.max_attempts}"
            )
        if entry.max_delay_seconds < entry.base_delay_seconds:
            raise ProvidersFileError(
                f"{where}.errors.{code}.max_delay_seconds must be at least"
                f" errors.{code}.base_delay_seconds"
            )


def _check_health(config: ProviderConfig, where: str) -> None:
    breaker = config.breaker
    if breaker is not None:
        if not 0 < breaker.failure_rate <= 1:
            raise ProvidersFileError(
                f"{where}.breaker.failure_rate must be greater than 0 and at most 1,"
                f" not {breaker.failure_rate:g}"
            )
        if breaker.min_calls < 1:
            raise ProvidersFileError(f"{where}.breaker.min_calls must be at least 1")
        if breaker.half_open_probes < 1:
            raise ProvidersFileError(f"{where}.breaker.half_open_probes must be at least 1")
    limit = config.rate_limit
    if limit is not None:
        if not 0 < limit.per_second <= 100_000:
            raise ProvidersFileError(
                f"{where}.rate_limit.per_second must be greater than 0 and at most 100000,"
                f" not {limit.per_second:g}"
            )
        if limit.burst < 1:
            raise ProvidersFileError(f"{where}.rate_limit.burst must be at least 1")
    if config.max_in_flight is not None and config.max_in_flight < 1:
        raise ProvidersFileError(f"{where}.max_in_flight must be at least 1")
