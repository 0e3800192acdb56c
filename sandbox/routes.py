"""The sandbox as one Litestar router: the cascade-core simulator and the sandbox providers.

The gateway mounts :attr:`Sandbox.router` (path ``/sandbox``) when ``SANDBOX_ENABLED``; never in
production. ``cascade-gateway sandbox`` serves the same router in a process of its own
(:mod:`sandbox.server`). Every handler answers its own errors as JSON, so the sandbox behaves the
same whatever exception handlers the hosting app installs. Its state is in Postgres
(:mod:`sandbox.database`): :meth:`Sandbox.start` opens it, before the first request.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from litestar import Router, get
from litestar.response import Response

from contracts.providers_file import ProviderConfig
from gateway.settings import Settings, SettingsError
from sandbox.core import CoreFaults, CoreSimulator, Ledger, json_response
from sandbox.database import DEFAULT_SCHEMA, SandboxDb
from sandbox.outages import health_router
from sandbox.providers import (
    ALIASES,
    BEHAVIOURS,
    ProviderSimulator,
    WebhookSender,
    behaviour_of,
)
from sandbox.scenarios import Scenario

ENDPOINTS: tuple[tuple[str, str, str], ...] = (
    ("GET", "/sandbox", "this index of the sandbox's endpoints"),
    ("POST", "/sandbox/core/v1/balances/freeze", "cascade-core: hold an amount on a provider"),
    ("POST", "/sandbox/core/v1/balances/commit", "cascade-core: debit a frozen operation"),
    ("POST", "/sandbox/core/v1/balances/rollback", "cascade-core: release a frozen operation"),
    (
        "GET",
        "/sandbox/core/v1/balances/operations/{operation_id}",
        "cascade-core: one balance operation and its state",
    ),
    (
        "POST",
        "/sandbox/core/v1/withdrawal-notifications",
        "cascade-core: record a withdrawal's final notification (once per key)",
    ),
    (
        "GET",
        "/sandbox/core/ledger",
        "cascade-core: floats, operations, notifications and invariant breaches",
    ),
    ("PUT", "/sandbox/core/faults", "cascade-core: set the injected 500 and timeout ratios"),
    (
        "PUT",
        "/sandbox/core/operations/{operation_id}/fault",
        "cascade-core: lose, flip or delay what one operation's lookup answers",
    ),
    (
        "POST",
        "/sandbox/providers/{provider_id}/orders",
        "provider: create an order (Idempotency-Key: the order id)",
    ),
    ("GET", "/sandbox/providers/{provider_id}/orders/{order_id}", "provider: one order's status"),
    (
        "POST",
        "/sandbox/providers/{provider_id}/orders/{order_id}/cancel",
        "provider: cancel a pending order",
    ),
    (
        "POST",
        "/sandbox/providers/{provider_id}/orders/{reference}/status",
        "set-status: move an order to a status and send its webhook to the gateway",
    ),
    (
        "POST",
        "/sandbox/providers/{provider_id}/script",
        "flaky script: the next sbx_flaky create outcomes and errors",
    ),
    (
        "PUT",
        "/sandbox/providers/{provider_id}/outage",
        "outage: a share of 503s and timeouts on every request, for a duration",
    ),
    ("GET", "/sandbox/providers/{provider_id}/outage", "outage: the one in force and when it ends"),
    ("DELETE", "/sandbox/providers/{provider_id}/outage", "outage: end it now"),
    ("GET", "/sandbox/providers/outages", "outages of every provider, in force or to come"),
    (
        "GET",
        "/sandbox/providers/{provider_id}/requests",
        "requests the provider received, by kind and answer",
    ),
    ("DELETE", "/sandbox/providers/{provider_id}/requests", "reset the provider's request counts"),
    ("GET", "/sandbox/providers/requests", "requests every provider received"),
    ("DELETE", "/sandbox/providers/requests", "reset every provider's request counts"),
)
"""``GET /sandbox``: each endpoint's method, path and purpose (a test checks it against the
routes the router registers)."""


@get("/", sync_to_thread=False)
def index() -> Response[bytes]:
    """The sandbox's endpoints, so the ``make run`` banner's URL answers something useful."""
    return json_response(
        200,
        {
            "endpoints": [
                {"method": method, "path": path, "purpose": purpose}
                for method, path, purpose in ENDPOINTS
            ],
            "docs": "docs/sandbox.md",
        },
    )


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Timings, floats and faults of one sandbox; seconds everywhere."""

    gateway_url: str
    """Webhooks go to ``{gateway_url}/webhooks/{provider_id}``."""
    database_url: str
    """The Postgres holding the sandbox's state (the gateway's ``DATABASE_URL``)."""
    schema: str = DEFAULT_SCHEMA
    """The sandbox's own schema in that database, created at start."""
    providers: Mapping[str, ProviderConfig]
    """Provider configs; the first of ``webhook_secrets`` signs that provider's webhooks."""
    core_tokens: tuple[str, ...] = ("core-token",)
    webhook_delay_seconds: float = 1.0
    fail_delay_seconds: float = 2.0
    flaky_created_ratio: float = 0.5
    flaky_timeout_seconds: float = 5.0
    flaky_success_delay_seconds: float = 2.0
    open_freeze_bound_seconds: float = 3600.0
    core_fault_500_ratio: float = 0.0
    core_fault_timeout_ratio: float = 0.0
    core_fault_timeout_seconds: float = 5.0
    provider_floats: Mapping[str, Decimal] = field(default_factory=dict)
    """Per-provider float at the core simulator; others get ``default_float`` (sbx_no_funds 0)."""
    default_float: Decimal = Decimal("1000000")
    webhook_attempts: int = 4
    webhook_backoff_seconds: float = 0.5
    webhook_timeout_seconds: float = 5.0
    seed: int = 0
    scenario: Scenario | None = None
    """Serve its providers as ``sbx_scn_<name>`` (see :mod:`sandbox.scenarios`)."""
    clock: Callable[[], float] = time.time
    """Wall-clock seconds of freezes and webhook due times; tests move it instead of waiting."""

    def __post_init__(self) -> None:
        ratios = {
            "flaky_created_ratio": self.flaky_created_ratio,
            "core_fault_500_ratio": self.core_fault_500_ratio,
            "core_fault_timeout_ratio": self.core_fault_timeout_ratio,
        }
        for name, value in ratios.items():
            if not 0 <= value <= 1:
                raise ValueError(f"SandboxConfig.{name} must be within 0..1, got {value}")
        if self.core_fault_500_ratio + self.core_fault_timeout_ratio > 1:
            raise ValueError("SandboxConfig core fault ratios must sum to at most 1")
        durations = {
            "webhook_delay_seconds": self.webhook_delay_seconds,
            "fail_delay_seconds": self.fail_delay_seconds,
            "flaky_timeout_seconds": self.flaky_timeout_seconds,
            "flaky_success_delay_seconds": self.flaky_success_delay_seconds,
            "open_freeze_bound_seconds": self.open_freeze_bound_seconds,
            "core_fault_timeout_seconds": self.core_fault_timeout_seconds,
            "webhook_backoff_seconds": self.webhook_backoff_seconds,
            "webhook_timeout_seconds": self.webhook_timeout_seconds,
        }
        for name, value in durations.items():
            if value < 0:
                raise ValueError(f"SandboxConfig.{name} must not be negative, got {value}")
        if self.webhook_attempts < 1:
            raise ValueError("SandboxConfig.webhook_attempts must be at least 1")
        if not self.gateway_url.startswith(("http://", "https://")):
            raise ValueError("SandboxConfig.gateway_url must be an http(s) URL")

    def initial_floats(self) -> dict[str, Decimal]:
        """Floats of every known provider: explicit ones, else 0 for no-funds, else the default."""
        floats: dict[str, Decimal] = {}
        for provider_id in {*BEHAVIOURS, *ALIASES, *self.providers, *self.provider_floats}:
            if provider_id in self.provider_floats:
                floats[provider_id] = self.provider_floats[provider_id]
            elif behaviour_of(provider_id) == "sbx_no_funds":
                floats[provider_id] = Decimal(0)
            else:
                floats[provider_id] = self.default_float
        return floats


class Sandbox:
    """Both simulators wired into ``router``; ``start``/``close`` own the background tasks."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.db = SandboxDb(config.database_url, schema=config.schema)
        self.ledger = Ledger(
            self.db,
            floats=config.initial_floats(),
            default_float=config.default_float,
            open_freeze_bound_seconds=config.open_freeze_bound_seconds,
            clock=config.clock,
        )
        self.core = CoreSimulator(
            self.ledger,
            tokens=config.core_tokens,
            faults=CoreFaults(
                fault_500_ratio=config.core_fault_500_ratio,
                timeout_ratio=config.core_fault_timeout_ratio,
                timeout_seconds=config.core_fault_timeout_seconds,
                # Seeded on purpose: a run must be reproducible; nothing here is a secret.
                rng=random.Random(f"{config.seed}:core-faults"),  # noqa: S311
            ),
        )
        self.sender = WebhookSender(
            gateway_url=config.gateway_url,
            secrets_by_provider={
                provider_id: provider.webhook_secrets[0]
                for provider_id, provider in config.providers.items()
                if provider.webhook_secrets
            },
            attempts=config.webhook_attempts,
            backoff_seconds=config.webhook_backoff_seconds,
            timeout_seconds=config.webhook_timeout_seconds,
        )
        self.providers = ProviderSimulator(
            db=self.db,
            sender=self.sender,
            webhook_delay_seconds=config.webhook_delay_seconds,
            fail_delay_seconds=config.fail_delay_seconds,
            flaky_created_ratio=config.flaky_created_ratio,
            flaky_timeout_seconds=config.flaky_timeout_seconds,
            flaky_success_delay_seconds=config.flaky_success_delay_seconds,
            seed=config.seed,
            scenario=config.scenario,
            clock=config.clock,
        )
        for outage in config.scenario.outages if config.scenario is not None else ():
            if self.providers.behaviour(outage.provider) is None:
                raise ValueError(f"scenario outage of {outage.provider}: no such sandbox provider")
        sim = self.providers
        self.router = Router(
            path="/sandbox",
            route_handlers=[
                index,
                self.core.router(),
                sim.router(),
                health_router(
                    sim.outages, sim.requests, known=lambda p: sim.behaviour(p) is not None
                ),
            ],
            include_in_schema=False,
        )

    async def start(self) -> None:
        """Open the database (creating the schema), the webhook client and the delivery loop,
        which sends the webhooks a previous process left due too; idempotent."""
        await self.db.open()
        await self.ledger.seed_floats()
        if self.config.scenario is not None:
            await self.providers.outages.arm_scenario(self.config.scenario)
        await self.sender.start()
        self.providers.start()

    async def close(self) -> None:
        """Stop sending (scheduled webhooks stay in the database) and close the connections."""
        await self.sender.close()
        await self.db.close()


def config_from_settings(settings: Settings) -> SandboxConfig:
    """The sandbox a gateway (or ``cascade-gateway sandbox``) with these settings runs."""
    if settings.database_url is None:
        raise SettingsError("the sandbox keeps its state in Postgres: DATABASE_URL is not set")
    return SandboxConfig(
        gateway_url=settings.public_url,
        database_url=settings.asyncpg_dsn,
        providers=settings.providers,
        core_tokens=(settings.core_token,),
        webhook_delay_seconds=settings.sandbox_webhook_delay,
        fail_delay_seconds=settings.sandbox_fail_delay,
        flaky_timeout_seconds=settings.sandbox_flaky_timeout,
        flaky_success_delay_seconds=settings.sandbox_flaky_success_delay,
    )
