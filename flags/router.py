"""Cohort routing: the ``withdrawals.cascade`` Unleash toggle decides legacy or cascade.

The Unleash client evaluates (``UnleashClient`` 6.x, local Rust engine). Offline, its cache is
bootstrapped from ``FLAGS_FILE`` (Unleash's ``/api/client/features`` format, so a file exported
from a server works as is) and it never fetches. With ``UNLEASH_URL`` + ``UNLEASH_API_TOKEN``
it polls a live server, keeping its backup file in a per-process directory; when the server is
unreachable the last known state keeps serving, else the bootstrap file, else everything goes
legacy (reason ``fallback``).

The client's initialisation is synchronous: call :meth:`CohortRouter.start` in a thread.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

import msgspec

log = logging.getLogger("cascade.flags")

TOGGLE = "withdrawals.cascade"
Cohort = Literal["legacy", "cascade"]


class FlagsError(Exception):
    """The flags configuration cannot be used; the message names the problem in one line."""


class RoutingDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Stored on the withdrawal at creation and never re-evaluated."""

    cohort: Cohort
    reason: Literal["allow_list", "rollout", "disabled", "not_targeted", "fallback"]
    flag_state: dict[str, Any]


class _Constraint(msgspec.Struct):
    contextName: str  # noqa: N815 — Unleash's wire names
    operator: str
    values: list[str] = []
    inverted: bool = False


class _Strategy(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}
    constraints: list[_Constraint] = []
    segments: list[int] = []


class _Feature(msgspec.Struct):
    name: str
    enabled: bool
    strategies: list[_Strategy] = []


class _Segment(msgspec.Struct):
    id: int
    constraints: list[_Constraint] = []


class _FeaturesFile(msgspec.Struct):
    features: list[_Feature]
    version: int = 1
    segments: list[_Segment] = []


def load_flags_file(path: Path) -> dict[str, Any]:
    """Read and check a flags file; raise FlagsError with a one-line reason."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: cannot read ({exc.strerror})") from exc
    try:
        msgspec.json.decode(raw, type=_FeaturesFile)
        parsed: dict[str, Any] = msgspec.json.decode(raw)
    except msgspec.ValidationError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: not an Unleash features file ({exc})") from exc
    except msgspec.DecodeError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: not valid JSON ({exc})") from exc
    return parsed


def _allow_listed(feature: _Feature, segments: dict[int, _Segment], merchant_id: str) -> bool:
    """Whether an enabled strategy names this merchant in a ``merchantId IN`` constraint."""
    for strategy in feature.strategies:
        constraints = list(strategy.constraints)
        for seg in strategy.segments:
            if seg in segments:
                constraints += segments[seg].constraints
        for c in constraints:
            if (
                c.contextName == "merchantId"
                and c.operator == "IN"
                and not c.inverted
                and merchant_id in c.values
            ):
                return True
    return False


class CohortRouter:
    """Decides the cohort of a new withdrawal."""

    def __init__(
        self,
        *,
        flags_file: Path | None,
        unleash_url: str | None = None,
        unleash_token: str | None = None,
        refresh_interval: int = 5,
        app_name: str = "cascade-gateway",
    ) -> None:
        self._flags_file = flags_file
        self._bootstrap = load_flags_file(flags_file) if flags_file else None
        self._url = unleash_url
        self._token = unleash_token
        self._refresh = refresh_interval
        self._app_name = app_name
        self._client: Any = None
        self._ready = threading.Event()
        self._cache_dir = tempfile.mkdtemp(prefix="cascade-unleash-")
        self._feature, self._segments = self._definition()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def source(self) -> str:
        if self._client is None:
            return "fallback"
        return "server" if self._url else "bootstrap"

    def start(self) -> None:
        """Initialise the Unleash client (synchronous: run it in a thread)."""
        from UnleashClient import UnleashClient  # type: ignore[attr-defined]  # noqa: PLC0415
        from UnleashClient.cache import FileCache  # noqa: PLC0415

        cache = FileCache(self._app_name, directory=self._cache_dir)
        if self._bootstrap is not None:
            cache.bootstrap_from_dict(self._bootstrap)
        live = bool(self._url)
        client = UnleashClient(
            url=self._url or "http://127.0.0.1:1/offline",
            app_name=self._app_name,
            refresh_interval=self._refresh,
            disable_metrics=not live,
            disable_registration=not live,
            custom_headers={"Authorization": self._token} if self._token else None,
            cache=cache,
            verbose_log_level=40,
        )
        client.initialize_client(fetch_toggles=live)
        self._client = client
        self._ready.set()

    def close(self) -> None:
        if self._client is not None:
            self._client.destroy()
            self._client = None

    def _definition(self) -> tuple[_Feature | None, dict[int, _Segment]]:
        if self._bootstrap is None:
            return None, {}
        parsed = msgspec.convert(self._bootstrap, _FeaturesFile)
        feature = next((f for f in parsed.features if f.name == TOGGLE), None)
        return feature, {s.id: s for s in parsed.segments}

    def decide(self, merchant_id: str) -> RoutingDecision:
        """Cohort for a new withdrawal of ``merchant_id`` (fast, never blocks on Unleash)."""
        if self._client is None:
            return RoutingDecision(
                cohort="legacy", reason="fallback", flag_state={"source": "fallback"}
            )
        context = {"properties": {"merchantId": merchant_id}}
        enabled = bool(self._client.is_enabled(TOGGLE, context))
        feature, segments = self._feature, self._segments
        state: dict[str, Any] = {"source": self.source, "toggle": TOGGLE}
        if feature is not None:
            state["enabled"] = feature.enabled
            state["strategies"] = [s.name for s in feature.strategies]
        if enabled:
            listed = feature is not None and _allow_listed(feature, segments, merchant_id)
            return RoutingDecision(
                cohort="cascade", reason="allow_list" if listed else "rollout", flag_state=state
            )
        if feature is not None and not feature.enabled:
            return RoutingDecision(cohort="legacy", reason="disabled", flag_state=state)
        return RoutingDecision(cohort="legacy", reason="not_targeted", flag_state=state)
