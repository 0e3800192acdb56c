"""Cohort routing: the ``withdrawals.cascade`` Unleash toggle decides legacy or cascade.

The Unleash client evaluates (``UnleashClient`` 6.x, local Rust engine); the router adds the
reason (allow-list, rollout, disabled, not targeted, fallback) and a summary of the flag
definition the decision came from, both stored on the withdrawal.

Sources, in order of preference:

* **server** — ``UNLEASH_URL`` (the API root, e.g. ``http://unleash:4242/api``) +
  ``UNLEASH_API_TOKEN`` (a backend token): the client polls every ``refresh_interval`` seconds
  in its own scheduler thread;
* **backup** — the server stopped answering: the client keeps serving the last state it
  fetched (its backup file lives in a per-process directory, never shared between processes);
* **bootstrap** — ``FLAGS_FILE`` (Unleash's ``/api/client/features`` format, so a file exported
  from a server works as is): the only source offline, and the start state when live. Offline,
  the client reloads its cache every ``refresh_interval`` seconds and the router re-reads the
  file then: an edit takes effect within the interval, and a file that does not parse or lacks
  the toggle keeps the last good state (one error line per bad version of the file);
* **fallback** — nothing loaded: every new withdrawal goes legacy.

The reason is derived from the definition the client *currently* holds: every state the engine
loads passes through the client's cache (:class:`_ObservedCache`), which is where the router
reads it, never from the bootstrap file once the server has answered.

The client's initialisation is synchronous (registration and the first fetch are blocking HTTP
calls): call :meth:`CohortRouter.start` in a thread. It waits at most ``first_fetch_wait``
seconds for the first answer; later polls never touch the event loop or a request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

if TYPE_CHECKING:
    from UnleashClient.clients.unleash_client import UnleashClient

log = logging.getLogger("cascade.flags")

TOGGLE = "withdrawals.cascade"
Cohort = Literal["legacy", "cascade"]
Reason = Literal["allow_list", "rollout", "disabled", "not_targeted", "fallback"]
Source = Literal["server", "backup", "bootstrap", "fallback"]

# UnleashClient.constants, repeated so that importing this module stays cheap.
_FEATURES_KEY = "/client/features"
_ETAG_KEY = "etag"
_SCHEDULER_LOGGER = "cascade.flags.scheduler"
_EXECUTOR = "cascade-unleash"


class FlagsError(Exception):
    """The flags configuration cannot be used; the message names the problem in one line."""


class RoutingDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Stored on the withdrawal at creation and never re-evaluated."""

    cohort: Cohort
    reason: Reason
    flag_state: dict[str, Any]


FALLBACK_STATE: dict[str, Any] = {"source": "fallback", "toggle": TOGGLE}


# --- the Unleash features document ---------------------------------------------------------


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
    disabled: bool = False


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
    return parse_flags(read_flags_bytes(path), path)


def read_flags_bytes(path: Path) -> bytes:
    """The flags file's bytes; FlagsError when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: cannot read ({exc.strerror})") from exc


def parse_flags(raw: bytes, path: Path) -> dict[str, Any]:
    """Check a flags file's content (``path`` names it in the error); the parsed document.

    The file must define the ``withdrawals.cascade`` toggle (on or off): a server's answer
    without it targets nobody, but a file without it is a mistake to refuse at start. And the
    Unleash engine must take it: the engine ignores a document it cannot read and keeps its
    old state, so a file it refuses would route by the old flags while reporting the new.
    """
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: not UTF-8 (byte {exc.start}: {exc.reason})") from exc
    try:
        document = msgspec.json.decode(raw, type=_FeaturesFile)
        parsed: dict[str, Any] = msgspec.json.decode(raw)
    except msgspec.ValidationError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: not an Unleash features file ({exc})") from exc
    except msgspec.DecodeError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: not valid JSON ({exc})") from exc
    # A misnamed toggle would otherwise start silently and route every withdrawal legacy.
    names = [f.name for f in document.features]
    if TOGGLE not in names:
        has = ", ".join(repr(n) for n in names) if names else "none"
        raise FlagsError(f"FLAGS_FILE {path}: no {TOGGLE!r} toggle (toggles in the file: {has})")
    try:
        msgspec.json.decode(raw, type=_EngineFile)
    except msgspec.ValidationError as exc:
        raise FlagsError(f"FLAGS_FILE {path}: not an Unleash features file ({exc})") from exc
    refusal = engine_refusal(raw)
    if refusal is not None:
        raise FlagsError(f"FLAGS_FILE {path}: the Unleash engine refuses it ({refusal})")
    return parsed


# What the Unleash engine (yggdrasil) requires where the router's digest is lenient: checked
# first for an error that names the field; the engine itself has the last word.


class _EngineConstraint(msgspec.Struct):
    contextName: str  # noqa: N815 — Unleash's wire names
    operator: str
    values: list[str] | None = None
    value: str | None = None
    inverted: bool = False
    caseInsensitive: bool = False  # noqa: N815


class _EngineStrategy(msgspec.Struct):
    name: str
    parameters: dict[str, str] | None = None
    constraints: list[_EngineConstraint] | None = None
    segments: list[int] | None = None
    variants: list[dict[str, Any]] | None = None


class _EngineFeature(msgspec.Struct):
    name: str
    enabled: bool
    type: str | None = None
    description: str | None = None
    stale: bool | None = None
    impressionData: bool | None = None  # noqa: N815
    strategies: list[_EngineStrategy] | None = None
    variants: list[dict[str, Any]] | None = None


class _EngineSegment(msgspec.Struct):
    id: int
    constraints: list[_EngineConstraint]


class _EngineFile(msgspec.Struct):
    version: Annotated[int, msgspec.Meta(ge=0)]
    features: list[_EngineFeature]
    segments: list[_EngineSegment] | None = None


_ENGINE_WARNING = re.compile(r'toggle_name: "([^"]*)", message: "((?:[^"\\]|\\.)*)"')


def engine_refusal(raw: bytes) -> str | None:
    """Why a scratch Unleash engine does not take this features document cleanly, or None.

    The engine the client runs drops a document it cannot read (and keeps its old state)
    and compiles a toggle it cannot evaluate to "always off", both without raising."""
    from yggdrasil_engine.engine import (  # type: ignore[import-untyped]  # noqa: PLC0415 — heavy
        StatusCode,
        UnleashEngine,
    )

    engine = UnleashEngine()
    pointer = engine.lib.take_state(engine.state, raw)
    with engine.materialize_pointer(pointer, list) as response:
        if response.status_code == StatusCode.OK:
            return None
        message = str(response.error_message or response.status_code.value)
    warning = _ENGINE_WARNING.search(message)
    if warning is not None:
        detail = warning.group(2).replace('\\"', '"')
        message = f"toggle {warning.group(1)!r}: {detail}"
    return " ".join(message.split())[:300]


@dataclass(frozen=True)
class _Definition:
    """The toggle as the client holds it, digested once per change for :meth:`decide`."""

    found: bool
    enabled: bool
    # One set per strategy that enables exactly a list of merchants (``merchantId IN``).
    allow_lists: tuple[frozenset[str], ...]
    # The part of flag_state that depends on the definition (source is added per view).
    state: dict[str, Any]


def _rollout_percent(strategy: _Strategy) -> int | None:
    if strategy.name == "default":
        return 100
    if strategy.name != "flexibleRollout":
        return None
    try:
        return int(str(strategy.parameters.get("rollout", "100")))
    except ValueError:
        return None


def _allow_list(strategy: _Strategy, segments: dict[int, _Segment]) -> frozenset[str] | None:
    """The merchants a strategy enables when it is a plain allow-list, else None.

    A plain allow-list enables everyone who passes its constraints (``default``, or a
    ``flexibleRollout`` at 100 %) and every constraint, its own or a segment's, is a
    non-inverted ``merchantId IN``. Constraints are ANDed, so the lists intersect.
    """
    if _rollout_percent(strategy) != 100:
        return None
    constraints = list(strategy.constraints)
    for segment_id in strategy.segments:
        segment = segments.get(segment_id)
        if segment is None:
            return None
        constraints += segment.constraints
    allowed: frozenset[str] | None = None
    for c in constraints:
        if c.contextName != "merchantId" or c.operator != "IN" or c.inverted:
            return None
        allowed = frozenset(c.values) if allowed is None else allowed & frozenset(c.values)
    return allowed


def _strategy_summary(strategy: _Strategy, allowed: frozenset[str] | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"name": strategy.name}
    if allowed is not None:
        summary["kind"] = "allow_list"
        summary["merchants"] = len(allowed)
        return summary
    percent = _rollout_percent(strategy)
    plain = not strategy.constraints and not strategy.segments
    if strategy.name == "flexibleRollout" and plain and percent is not None:
        summary["kind"] = "rollout"
        summary["rollout"] = percent
        summary["stickiness"] = str(strategy.parameters.get("stickiness", "default"))
    elif strategy.name == "default" and plain:
        summary["kind"] = "everyone"
    else:
        summary["kind"] = "other"
        summary["rollout"] = percent
        summary["constraints"] = len(strategy.constraints)
        summary["segments"] = list(strategy.segments)
    return summary


def _digest(raw: str) -> _Definition:
    """Digest a features document (bootstrap file or server answer) for the toggle."""
    document = msgspec.json.decode(raw, type=_FeaturesFile)
    feature = next((f for f in document.features if f.name == TOGGLE), None)
    if feature is None:
        return _Definition(
            found=False,
            enabled=False,
            allow_lists=(),
            state={"toggle": TOGGLE, "found": False},
        )
    segments = {s.id: s for s in document.segments}
    strategies = [s for s in feature.strategies if not s.disabled]
    lists = [_allow_list(s, segments) for s in strategies]
    used = sorted({i for s in strategies for i in s.segments})
    canonical = msgspec.json.encode(
        {"feature": feature, "segments": [segments[i] for i in used if i in segments]},
        order="sorted",
    )
    return _Definition(
        found=True,
        enabled=feature.enabled,
        allow_lists=tuple(a for a in lists if a is not None),
        state={
            "toggle": TOGGLE,
            "found": True,
            "enabled": feature.enabled,
            "revision": hashlib.sha256(canonical).hexdigest()[:12],
            "strategies": [_strategy_summary(s, a) for s, a in zip(strategies, lists, strict=True)],
        },
    )


# --- the client's logs: one line per outage, not a traceback per poll ----------------------

_poll_error = threading.local()


def _short(message: str) -> str:
    first = message.splitlines()[0] if message else "no answer"
    if "Connection refused" in first:
        return "connection refused"
    if "timed out" in first or "Timeout" in first:
        return "timed out"
    if "status code" in first:
        return "HTTP " + first.rsplit(" ", 1)[-1]
    return first[:160]


class _UnleashLogFilter(logging.Filter):
    """Turns the client's per-poll failure logs into state the router reports once.

    A failed fetch is noted in a thread-local (the poll thread then loads the cache, where
    :class:`_ObservedCache` picks it up) and dropped; chatter below WARNING is dropped; any
    other warning passes without its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "fetch failed" in message:
            if getattr(_poll_error, "message", None) is None:
                _poll_error.message = _short(message)
            return False
        if record.levelno < logging.WARNING:
            return False
        if (
            "registration failed" in message
            or "metrics submission" in message
            or "does not have cached features" in message
        ):
            return False
        record.exc_info = None
        record.exc_text = None
        return True


class _BelowErrorFilter(logging.Filter):
    """APScheduler warns on every skipped or late poll; the router reports outages itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_UNLEASH_FILTER = _UnleashLogFilter()
_SCHEDULER_FILTER = _BelowErrorFilter()


def _install_log_filters() -> None:
    for name, flt in (
        ("UnleashClient", _UNLEASH_FILTER),
        (_SCHEDULER_LOGGER, _SCHEDULER_FILTER),
        (f"apscheduler.executors.{_EXECUTOR}", _SCHEDULER_FILTER),
    ):
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


# --- the router -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """What :meth:`CohortRouter.decide` reads: replaced whole, so one read is consistent."""

    definition: _Definition
    source: Source
    state: dict[str, Any]


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
        request_timeout: int = 3,
        first_fetch_wait: float = 5.0,
    ) -> None:
        self._flags_file = flags_file
        self._file_raw: bytes | None = None
        self._bootstrap: dict[str, Any] | None = None
        if flags_file is not None:
            self._file_raw = read_flags_bytes(flags_file)
            self._bootstrap = parse_flags(self._file_raw, flags_file)
        self._file_error: str | None = None
        self._file_refused: str | None = None  # the bad version last reported
        self._file_checks = 0
        self._url = unleash_url.rstrip("/") if unleash_url else None
        self._token = unleash_token
        self._refresh = refresh_interval
        self._app_name = app_name
        self._request_timeout = request_timeout
        self._first_fetch_wait = first_fetch_wait
        self._client: UnleashClient | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._cache_dir: str | None = None
        self._view: _View | None = None
        self._last_raw: str | None = None
        self._definition: _Definition | None = None
        self._polling = False
        self._fetched_once = False
        self._reachable: bool | None = None
        self._last_error: str | None = None
        self._failed_polls = 0

    # -- state, for readiness and operators --

    @property
    def ready(self) -> bool:
        """True once the flags are settled: loaded, or known to be unavailable (fallback)."""
        return self._ready.is_set()

    @property
    def source(self) -> Source:
        view = self._view
        return "fallback" if view is None else view.source

    @property
    def live(self) -> bool:
        return self._url is not None

    def describe(self) -> dict[str, Any]:
        """The current flag state and where it came from (for ops and logs)."""
        view = self._view
        state = dict(FALLBACK_STATE) if view is None else dict(view.state)
        state["ready"] = self.ready
        state["live"] = self.live
        if self.live:
            state["server_reachable"] = self._reachable
            state["last_error"] = self._last_error
            state["failed_polls"] = self._failed_polls
        elif self._flags_file is not None:
            state["file_checks"] = self._file_checks
            state["file_error"] = self._file_error
        return state

    # -- lifecycle --

    def start(self) -> None:
        """Initialise the Unleash client (synchronous: run it in a thread, not on the loop)."""
        _install_log_filters()
        self._cache_dir = tempfile.mkdtemp(prefix=f"cascade-unleash-{os.getpid()}-")
        cache = _make_cache(self, self._app_name, self._cache_dir)
        if self._bootstrap is not None:
            cache.bootstrap_from_dict(self._bootstrap)
        live = self._url is not None
        client = self._make_client(cache, live=live)
        self._client = client
        if not live:
            client.initialize_client(fetch_toggles=False)
            if self._view is None:
                log.warning(
                    "no FLAGS_FILE and no UNLEASH_URL: every new withdrawal goes legacy "
                    "(reason fallback)"
                )
            self._ready.set()
            return
        self._polling = True
        self._first_fetch(client)

    def _make_client(self, cache: Any, *, live: bool) -> UnleashClient:
        """The Unleash client on ``cache``; its constructor loads the bootstrap into the
        engine (through the cache's ``get``)."""
        from apscheduler.executors.pool import (  # type: ignore[import-untyped]  # noqa: PLC0415 — untyped upstream; lazy like the client
            ThreadPoolExecutor,
        )
        from apscheduler.schedulers.background import (  # type: ignore[import-untyped]  # noqa: PLC0415
            BackgroundScheduler,
        )
        from UnleashClient.clients.unleash_client import (  # noqa: PLC0415 — heavy, only when used
            UnleashClient,
        )
        from UnleashClient.utils import InstanceAllowType  # noqa: PLC0415

        scheduler = BackgroundScheduler(
            executors={_EXECUTOR: ThreadPoolExecutor(max_workers=2)},
            job_defaults={"coalesce": True, "max_instances": 1},
            logger=logging.getLogger(_SCHEDULER_LOGGER),
        )
        return UnleashClient(
            url=self._url or "http://127.0.0.1:1/offline",
            app_name=self._app_name,
            instance_id=f"{self._app_name}-{socket.gethostname()}-{os.getpid()}-{id(self):x}",
            refresh_interval=self._refresh,
            request_timeout=self._request_timeout,
            # Retries inside one poll only delay the next one and log a line each.
            request_retries=0,
            disable_metrics=not live,
            disable_registration=not live,
            custom_headers={"Authorization": self._token} if self._token else None,
            cache=cache,
            scheduler=scheduler,
            scheduler_executor=_EXECUTOR,
            multiple_instance_mode=InstanceAllowType.SILENTLY_ALLOW,
            verbose_log_level=logging.DEBUG,
        )

    def _first_fetch(self, client: UnleashClient) -> None:
        """Start the live client without blocking longer than the first-fetch wait: past it,
        the bootstrap serves and the fetch goes on in the background."""
        finished = threading.Event()

        def initialise() -> None:
            try:
                client.initialize_client(fetch_toggles=True)
            except Exception as exc:  # noqa: BLE001 — reported in one line; bootstrap serves
                self._poll_failed(_short(str(exc)))
                self._ready.set()
            finally:
                finished.set()

        threading.Thread(target=initialise, name="unleash-init", daemon=True).start()
        if not finished.wait(self._first_fetch_wait) and not self._ready.is_set():
            self._poll_failed(f"no answer within {self._first_fetch_wait:g} s")
            self._ready.set()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.destroy()
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    # -- offline, the flags file is re-read at every reload of the client's cache --

    def _changed_flags_file(self) -> str | None:
        """The flags file's content when it changed into a usable file, else None.

        Called in the client's thread before each reload of its cache, so at the refresh
        interval. A file that cannot be used keeps the last good state; each bad version
        (content, or read error) is logged once, not at every check.
        """
        path = self._flags_file
        if path is None or self._url is not None:
            return None  # live: the server is the source, the file only the bootstrap
        self._file_checks += 1
        try:
            raw = read_flags_bytes(path)
        except FlagsError as exc:
            self._refuse_flags_file(str(exc), version=str(exc))
            return None
        if raw == self._file_raw:
            self._file_error = self._file_refused = None
            return None
        try:
            parse_flags(raw, path)
        except FlagsError as exc:
            self._refuse_flags_file(str(exc), version=hashlib.sha256(raw).hexdigest())
            return None
        self._file_raw = raw
        self._file_error = self._file_refused = None
        text = raw.decode()
        before = self._view.state.get("revision") if self._view else None
        after = _digest(text).state.get("revision")
        log.info(
            "FLAGS_FILE %s changed: new withdrawals route by revision %s (was %s)",
            path,
            after,
            before,
        )
        return text

    def _refuse_flags_file(self, error: str, *, version: str) -> None:
        self._file_error = error
        if version == self._file_refused:
            return
        self._file_refused = version
        revision = self._view.state.get("revision") if self._view else None
        log.error("%s; routing keeps the last good flags (revision %s)", error, revision)

    # -- the cache reports every state the engine loads --

    def _loaded(self, raw: str | None, fetched: bool) -> None:
        """Called in the client's thread each time the engine (re)loads its state."""
        with self._lock:
            if raw and raw != self._last_raw:
                try:
                    self._definition = _digest(raw)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    log.warning("unreadable Unleash features document: %s", exc)
                    self._definition = _Definition(
                        found=True,
                        enabled=True,
                        allow_lists=(),
                        state={"toggle": TOGGLE, "found": True, "revision": "unreadable"},
                    )
                self._last_raw = raw
            if not self._polling:
                self._publish("bootstrap")
                return
            error = getattr(_poll_error, "message", None)
            _poll_error.message = None
        # Every failed fetch logs (and our filter notes it); a 200 writes the document. A 304
        # is the quiet case: unleash-server strips every header from it, ETag included.
        if fetched or error is None:
            self._poll_succeeded()
        else:
            self._poll_failed(error or "no answer")
        self._ready.set()

    def _publish(self, source: Source) -> None:
        definition = self._definition
        if definition is None:
            self._view = None
            return
        self._view = _View(
            definition=definition, source=source, state={**definition.state, "source": source}
        )

    def _poll_succeeded(self) -> None:
        with self._lock:
            recovered = self._reachable is False
            self._reachable = True
            self._fetched_once = True
            self._last_error = None
            self._failed_polls = 0
            self._publish("server")
        if recovered:
            log.warning("Unleash at %s answers again; routing from the server's flags", self._url)

    def _poll_failed(self, error: str) -> None:
        with self._lock:
            first = self._reachable is not False
            self._reachable = False
            self._last_error = error
            self._failed_polls += 1
            source: Source = "backup" if self._fetched_once else "bootstrap"
            self._publish(source)
            current = self.source
        if first:
            serving = {
                "backup": "the last flags it sent (client backup)",
                "bootstrap": "FLAGS_FILE (bootstrap)",
                "fallback": "nothing: every new withdrawal goes legacy (reason fallback)",
            }[current]
            log.warning(
                "Unleash at %s unreachable (%s); routing from %s until it answers",
                self._url,
                error,
                serving,
            )

    # -- per request --

    def decide(self, merchant_id: str) -> RoutingDecision:
        """Cohort for a new withdrawal of ``merchant_id`` (fast, never blocks on Unleash)."""
        client, view = self._client, self._view
        if client is None or view is None:
            return RoutingDecision(
                cohort="legacy", reason="fallback", flag_state=dict(FALLBACK_STATE)
            )
        # A copy per decision: the stored state must not change if a caller mutates it.
        state = dict(view.state)
        enabled = client.is_enabled(TOGGLE, {"properties": {"merchantId": merchant_id}})
        definition = view.definition
        if enabled:
            listed = any(merchant_id in allowed for allowed in definition.allow_lists)
            return RoutingDecision(
                cohort="cascade",
                reason="allow_list" if listed else "rollout",
                flag_state=state,
            )
        if definition.found and not definition.enabled:
            return RoutingDecision(cohort="legacy", reason="disabled", flag_state=state)
        return RoutingDecision(cohort="legacy", reason="not_targeted", flag_state=state)


def _make_cache(router: CohortRouter, name: str, directory: str) -> Any:
    """The client's FileCache (its backup file), observed by the router."""
    from UnleashClient.cache import FileCache  # noqa: PLC0415

    class _ObservedCache(FileCache):
        """Every state the engine loads is read through ``get``; a poll that got a 200
        writes the document first."""

        def __init__(self) -> None:
            super().__init__(name, directory=directory)
            self._fetched = False

        def set(self, key: str, value: Any) -> None:
            super().set(key, value)
            if key == _FEATURES_KEY or (key == _ETAG_KEY and value):
                self._fetched = True

        def get(self, key: str, default: Any = None) -> Any:
            if key == _FEATURES_KEY and (text := router._changed_flags_file()) is not None:
                FileCache.set(self, key, text)
            value = super().get(key, default)
            if key == _FEATURES_KEY:
                fetched, self._fetched = self._fetched, False
                router._loaded(value if isinstance(value, str) else None, fetched)
            return value

    return _ObservedCache()
