"""Configuration from the environment. Every problem is one :class:`SettingsError` line.

The names listed in DESIGN.md are a fixed interface; the others are ours and documented in
the README's configuration table.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from contracts.providers_file import ProviderConfig, ProvidersFileError, load_providers
from flags.router import FlagsError, load_flags_file
from orchestrator.reconciliation import ReconPolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FLAGS_FILE = REPO_ROOT / "config" / "flags.json"
DEFAULT_PROVIDERS_FILE = REPO_ROOT / "config" / "providers.sandbox.json"
DEPLOYMENT_ENVS = ("development", "staging", "production")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
HOUR = 3600.0
# Dot-terminated tokens, so that subjects stay valid and stream names ("T1_ORDERS") too.
NAMESPACE = re.compile(r"([A-Za-z0-9_-]+\.)*")


class SettingsError(Exception):
    """Configuration that cannot work; the message names the variable and the problem."""


def _tokens(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    raw = env.get(name, default)
    tokens = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not tokens:
        raise SettingsError(f"{name} must list at least one token")
    return tokens


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float = 0, maximum: float
) -> float:
    """A finite number within ``minimum..maximum`` (durations are seconds)."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise SettingsError(f"{name} must be between {minimum:g} and {maximum:g}, not {raw!r}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    """A whole number within ``minimum..maximum``, written in decimal digits."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not text.isdecimal() or not minimum <= int(text) <= maximum:
        raise SettingsError(
            f"{name} must be a whole number from {minimum} to {maximum}, not {raw!r}"
        )
    return int(text)


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``, compared case-insensitively and returned as written in ``choices``."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    for choice in choices:
        if raw.strip().lower() == choice.lower():
            return choice
    raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")


def _log_level(env: Mapping[str, str]) -> str:
    """``LOG_LEVEL`` from :data:`LOG_LEVELS`; ``WARN``, Python's own alias, is ``WARNING``."""
    if env.get("LOG_LEVEL", "").strip().upper() == "WARN":
        return "WARNING"
    return _choice(env, "LOG_LEVEL", "INFO", LOG_LEVELS)


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 0 <= int(raw) < 65536:
        raise SettingsError(f"{name} must be a TCP port (1-65535), not {raw!r}")
    return int(raw)


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    if not raw.startswith(schemes):
        raise SettingsError(f"{name} must start with {' or '.join(schemes)}, not {raw!r}")
    return raw


@dataclass(frozen=True, kw_only=True)
class Settings:
    database_url: str | None
    nats_url: str | None
    nats_namespace: str
    flags_file: Path | None
    unleash_url: str | None
    unleash_api_token: str | None
    unleash_refresh_seconds: int
    api_tokens: tuple[str, ...]
    ops_tokens: tuple[str, ...]
    core_url: str | None
    core_token: str
    http_host: str
    http_port: int
    public_url: str
    sandbox_enabled: bool
    deployment_env: str
    providers_file: Path
    providers: Mapping[str, ProviderConfig]
    worker_concurrency: int
    database_pool_size: int
    worker_metrics_port: int | None
    jetstream_replicas: int
    ack_wait_seconds: float
    sandbox_webhook_delay: float
    sandbox_fail_delay: float
    sandbox_flaky_timeout: float
    sandbox_flaky_success_delay: float
    sandbox_port: int
    """Where ``cascade-gateway sandbox`` listens (on ``http_host``)."""
    log_level: str
    wait_for_schema_seconds: float
    recon: ReconPolicy = field(default_factory=ReconPolicy)
    """The reconciliation job's knobs (``RECON_*``)."""

    @property
    def asyncpg_dsn(self) -> str:
        """The DSN for asyncpg (accepts SQLAlchemy's ``postgresql+asyncpg://`` form too)."""
        assert self.database_url is not None
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    @property
    def sqlalchemy_url(self) -> str:
        return "postgresql+asyncpg://" + self.asyncpg_dsn.split("://", 1)[1]


def _database_url(env: Mapping[str, str]) -> str | None:
    url = _url(env, "DATABASE_URL", ("postgresql://", "postgresql+asyncpg://", "postgres://"))
    if url and url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    return url


def _nats_url(env: Mapping[str, str]) -> str | None:
    """``NATS_URL``: one server, or several separated by commas (a cluster's seeds)."""
    raw = env.get("NATS_URL")
    if not raw:
        return None
    for part in raw.split(","):
        if not part.strip().startswith(("nats://", "tls://")):
            raise SettingsError(
                f"NATS_URL must be nats:// or tls:// URLs separated by commas, not {raw!r}"
            )
    return raw


def migration_url(env: Mapping[str, str]) -> str:
    """The SQLAlchemy URL ``migrate`` applies migrations to: all it reads is DATABASE_URL."""
    _log_level(env)
    url = _database_url(env)
    if url is None:
        raise SettingsError("DATABASE_URL is not set")
    return "postgresql+asyncpg://" + url.split("://", 1)[1]


def _namespace(env: Mapping[str, str]) -> str:
    namespace = env.get("NATS_NAMESPACE", "")
    if not NAMESPACE.fullmatch(namespace):
        raise SettingsError(
            "NATS_NAMESPACE must be empty or dot-terminated tokens of letters, digits, _ and -"
            f" (e.g. 'test1.'), not {namespace!r}"
        )
    return namespace


def _flags_file(env: Mapping[str, str]) -> Path:
    raw = env.get("FLAGS_FILE")
    path = Path(raw) if raw else DEFAULT_FLAGS_FILE
    try:
        load_flags_file(path)  # fail fast, before any connection is attempted
    except FlagsError as exc:
        raise SettingsError(str(exc)) from exc
    return path


def _unleash(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """A live Unleash server's URL and API token, both or neither."""
    url = _url(env, "UNLEASH_URL", ("http://", "https://"))
    token = env.get("UNLEASH_API_TOKEN") or None
    if url and not token:
        raise SettingsError("UNLEASH_URL is set but UNLEASH_API_TOKEN is not")
    return url, token


def _providers(
    env: Mapping[str, str], expansion: Mapping[str, str]
) -> tuple[Path, dict[str, ProviderConfig]]:
    """The providers file and what it configures, ``${VAR}`` expanded from ``expansion``."""
    raw_path = env.get("PROVIDERS_FILE")
    path = Path(raw_path) if raw_path else DEFAULT_PROVIDERS_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"PROVIDERS_FILE {path}: cannot read ({exc.strerror})") from exc
    try:
        loaded = load_providers(raw, expansion, source=f"PROVIDERS_FILE {path}")
    except ProvidersFileError as exc:
        raise SettingsError(str(exc)) from exc
    return path, dict(loaded.providers)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the environment; raise SettingsError naming the first problem."""
    env = dict(os.environ if env is None else env)
    http_port = _port(env, "HTTP_PORT", 8080)
    http_host = env.get("HTTP_HOST", "127.0.0.1")
    # Without a trailing slash: paths are appended to it, and a "//" is not a route.
    public_url = (env.get("PUBLIC_URL") or f"http://127.0.0.1:{http_port}").rstrip("/")
    deployment_env = _choice(env, "DEPLOYMENT_ENV", "development", DEPLOYMENT_ENVS)
    sandbox_enabled = _bool(env, "SANDBOX_ENABLED", False)
    if sandbox_enabled and deployment_env == "production":
        raise SettingsError("SANDBOX_ENABLED cannot be true when DEPLOYMENT_ENV is production")
    database_url = _database_url(env)
    nats_url = _nats_url(env)
    nats_namespace = _namespace(env)
    flags_file = _flags_file(env)
    unleash_url, unleash_token = _unleash(env)
    sandbox_url = (env.get("SANDBOX_URL") or f"{public_url}/sandbox").rstrip("/")
    core_url = _url(env, "CORE_URL", ("http://", "https://"))
    if core_url is None and sandbox_enabled:
        core_url = f"{sandbox_url}/core"
    expansion = {"SANDBOX_URL": sandbox_url, "HTTP_PORT": str(http_port), "PUBLIC_URL": public_url}
    providers_file, providers = _providers(env, {**env, **expansion})
    return Settings(
        database_url=database_url,
        nats_url=nats_url,
        nats_namespace=nats_namespace,
        flags_file=flags_file,
        unleash_url=unleash_url,
        unleash_api_token=unleash_token,
        unleash_refresh_seconds=_integer(
            env, "UNLEASH_REFRESH_SECONDS", 5, minimum=1, maximum=3600
        ),
        api_tokens=_tokens(env, "GATEWAY_API_TOKENS", "dev-token"),
        ops_tokens=_tokens(env, "OPS_API_TOKENS", "ops-token"),
        core_url=core_url.rstrip("/") if core_url else None,
        core_token=env.get("CORE_TOKEN", "core-token"),
        http_host=http_host,
        http_port=http_port,
        sandbox_port=_port(env, "SANDBOX_PORT", 8090),
        public_url=public_url,
        sandbox_enabled=sandbox_enabled,
        deployment_env=deployment_env,
        providers_file=providers_file,
        providers=providers,
        worker_concurrency=_integer(env, "WORKER_CONCURRENCY", 32, minimum=1, maximum=1000),
        database_pool_size=_integer(env, "DATABASE_POOL_SIZE", 20, minimum=2, maximum=1000),
        worker_metrics_port=_port(env, "WORKER_METRICS_PORT", 0) or None,
        jetstream_replicas=_integer(env, "JETSTREAM_REPLICAS", 1, minimum=1, maximum=5),
        ack_wait_seconds=_number(env, "JETSTREAM_ACK_WAIT_SECONDS", 60, minimum=1, maximum=HOUR),
        sandbox_webhook_delay=_number(env, "SANDBOX_WEBHOOK_DELAY_SECONDS", 1.0, maximum=HOUR),
        sandbox_fail_delay=_number(env, "SANDBOX_FAIL_DELAY_SECONDS", 2.0, maximum=HOUR),
        sandbox_flaky_timeout=_number(env, "SANDBOX_FLAKY_TIMEOUT_SECONDS", 5.0, maximum=HOUR),
        sandbox_flaky_success_delay=_number(
            env, "SANDBOX_FLAKY_SUCCESS_DELAY_SECONDS", 2.0, maximum=HOUR
        ),
        log_level=_log_level(env),
        wait_for_schema_seconds=_number(env, "WAIT_FOR_SCHEMA_SECONDS", 0, maximum=HOUR),
        recon=_recon(env),
    )


def _recon(env: Mapping[str, str]) -> ReconPolicy:
    day = 24 * HOUR
    return ReconPolicy(
        interval=_number(env, "RECON_INTERVAL_SECONDS", 300, minimum=1, maximum=day),
        window=_number(env, "RECON_WINDOW_SECONDS", day, minimum=60, maximum=30 * day),
        stale_margin=_number(env, "RECON_STALE_MARGIN_SECONDS", 600, maximum=day),
        notify_after=_number(env, "RECON_NOTIFY_AFTER_SECONDS", 600, maximum=day),
        ledger_budget=_integer(env, "RECON_LEDGER_BUDGET", 500, minimum=0, maximum=100_000),
        provider_budget=_integer(env, "RECON_PROVIDER_BUDGET", 20, minimum=0, maximum=10_000),
        max_new_alerts=_integer(env, "RECON_MAX_NEW_ALERTS", 200, minimum=1, maximum=100_000),
    )
