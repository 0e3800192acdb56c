"""Where ``withdrawals.cascade`` lives, for the ``flags`` command: a flags file or Unleash.

Each store reads the toggle (:class:`flags.admin.Toggle`) and carries a plan
(:class:`flags.admin.Plan`) out. The file is rewritten whole and atomically (a temporary
file beside it, checked like the gateway checks it, then renamed over it), so the gateway's
reload never sees half a file. Unleash is changed through its Admin API (checked against
unleash-server 8.2): ``GET /api/admin/projects/{project}/features/{toggle}``,
``POST|PUT|DELETE …/environments/{environment}/strategies[/{id}]``,
``POST …/environments/{environment}/on|off`` and ``GET /api/admin/segments``.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from flags.admin import Edit, FlagsEditError, Plan, Toggle, apply
from flags.router import TOGGLE, FlagsError, parse_flags, read_flags_bytes


class FlagsStore(Protocol):
    """One place that holds the toggle."""

    @property
    def where(self) -> str:
        """The place, for a person: ``FLAGS_FILE /path`` or ``Unleash URL (project, env)``."""
        ...

    async def read(self) -> Toggle: ...

    async def write(self, toggle: Toggle, plan: Plan) -> None:
        """Make ``plan``'s edits to ``toggle``, the state :meth:`read` returned."""
        ...


# --- the flags file -------------------------------------------------------------------------


class FlagsFile:
    """``FLAGS_FILE``: an Unleash ``/api/client/features`` document."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw: bytes | None = None
        self._document: dict[str, Any] = {}

    @property
    def where(self) -> str:
        return f"FLAGS_FILE {self.path}"

    async def read(self) -> Toggle:
        try:
            self._raw = read_flags_bytes(self.path)
            self._document = parse_flags(self._raw, self.path)
        except FlagsError as exc:
            raise FlagsEditError(str(exc)) from exc
        feature = _feature(self._document)
        segments = {s["id"]: s for s in self._document.get("segments", []) if "id" in s}
        return Toggle(
            enabled=bool(feature["enabled"]),
            strategies=tuple(feature.get("strategies", [])),
            segments=segments,
        )

    async def write(self, toggle: Toggle, plan: Plan) -> None:
        after = apply(toggle, plan.edits)
        document = copy.deepcopy(self._document)
        feature = _feature(document)
        feature["enabled"] = after.enabled
        feature["strategies"] = list(after.strategies)
        content = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
        # Compare and rename under the sidecar lock: another command's edit made after this
        # one read the file is refused, never silently undone.
        with _locked(self.path):
            with contextlib.suppress(FlagsError):
                if read_flags_bytes(self.path) != self._raw:
                    raise FlagsEditError(
                        f"{self.where} changed while this command ran: nothing written,"
                        " run it again"
                    )
            _replace_atomically(self.path, content)


def _feature(document: dict[str, Any]) -> dict[str, Any]:
    feature: dict[str, Any] = next(f for f in document["features"] if f["name"] == TOGGLE)
    return feature


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``<FLAGS_FILE>.lock`` (kept: removing it would race)."""
    target = path.resolve()
    lock = target.with_name(target.name + ".lock")
    try:
        descriptor = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FlagsEditError(f"FLAGS_FILE {path}: cannot lock {lock} ({exc.strerror})") from exc
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _replace_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to a temporary file beside ``path``, check it, rename it over."""
    target = path.resolve()  # a symlinked file: replace what it points at, keep the link
    try:
        mode = target.stat().st_mode & 0o777
        descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise FlagsEditError(f"FLAGS_FILE {path}: cannot write ({exc.strerror})") from exc
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.chmod(mode)
        parse_flags(temporary.read_bytes(), path)  # what the gateway will check
        temporary.replace(target)
        _sync_directory(target.parent)
    except FlagsError as exc:
        raise FlagsEditError(f"nothing written: the edited file would be refused ({exc})") from exc
    except OSError as exc:
        raise FlagsEditError(f"FLAGS_FILE {path}: cannot write ({exc.strerror})") from exc
    finally:
        temporary.unlink(missing_ok=True)


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- Unleash's Admin API --------------------------------------------------------------------

_KEPT = ("name", "title", "disabled", "parameters", "constraints", "variants", "segments")


class UnleashFlags:
    """The toggle in one environment of an Unleash project, through the Admin API."""

    def __init__(
        self, url: str, token: str, *, project: str, environment: str, timeout: float = 10
    ) -> None:
        self.url = url.rstrip("/")  # the API root, as UNLEASH_URL: http://host:4242/api
        self._token = token
        self.project = project
        self.environment = environment
        self._timeout = timeout

    @property
    def where(self) -> str:
        return f"Unleash {self.url} (project {self.project}, environment {self.environment})"

    @property
    def _feature(self) -> str:
        return f"/admin/projects/{self.project}/features/{TOGGLE}"

    @property
    def _env(self) -> str:
        return f"{self._feature}/environments/{self.environment}"

    async def read(self) -> Toggle:
        missing = f"Unleash at {self.url} has no toggle {TOGGLE!r} in project {self.project!r}"
        feature = await self._call("GET", self._feature, missing=missing) or {}
        environments = feature.get("environments", [])
        env = next((e for e in environments if e.get("name") == self.environment), None)
        if env is None:
            names = ", ".join(e.get("name", "?") for e in environments) or "none"
            raise FlagsEditError(
                f"{TOGGLE} has no environment {self.environment!r} in project"
                f" {self.project!r} (environments: {names})"
            )
        strategies = tuple(env.get("strategies", []))
        segments: dict[int, dict[str, Any]] = {}
        if any(s.get("segments") for s in strategies):
            listed = await self._call("GET", "/admin/segments") or {}
            segments = {s["id"]: s for s in listed.get("segments", [])}
        return Toggle(enabled=bool(env.get("enabled")), strategies=strategies, segments=segments)

    async def write(self, toggle: Toggle, plan: Plan) -> None:
        # Off first and on last: a half-made plan never widens the cohort.
        first = [e for e in plan.edits if e.action == "disable"]
        last = [e for e in plan.edits if e.action == "enable"]
        middle = [e for e in plan.edits if e.action not in ("disable", "enable")]
        for edit in (*first, *middle, *last):
            await self._make(toggle, edit)

    async def _make(self, toggle: Toggle, edit: Edit) -> None:
        strategies = f"{self._env}/strategies"
        if edit.action in ("enable", "disable"):
            await self._call("POST", f"{self._env}/{'on' if edit.action == 'enable' else 'off'}")
        elif edit.action == "add":
            await self._call("POST", strategies, _body(edit.strategy))
        elif edit.action == "update":
            strategy_id = toggle.strategies[edit.index]["id"]
            await self._call("PUT", f"{strategies}/{strategy_id}", _body(edit.strategy))
        else:
            await self._call("DELETE", f"{strategies}/{toggle.strategies[edit.index]['id']}")

    async def _call(
        self, method: str, path: str, body: Any = None, *, missing: str | None = None
    ) -> dict[str, Any] | None:
        """The answer's JSON object; FlagsEditError in one line (``missing`` for a 404)."""
        import aiohttp  # noqa: PLC0415 — only this store speaks HTTP

        timeout = aiohttp.ClientTimeout(total=self._timeout)
        headers = {"Authorization": self._token, "Accept": "application/json"}
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
                session.request(method, self.url + path, json=body) as response,
            ):
                text = await response.text()
                if response.status == 404 and missing is not None:
                    raise FlagsEditError(missing)
                _check(self.url, method, path, response.status, text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise FlagsEditError(f"cannot reach Unleash at {self.url} ({reason})") from exc
        return _answer(self.url, method, path, text)


def _answer(url: str, method: str, path: str, text: str) -> dict[str, Any] | None:
    """A 2xx answer's JSON object (None when empty); else FlagsEditError with a hint: the
    Unleash UI at the server's root answers 200 with its HTML page."""
    if not text.strip():
        return None
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        start = " ".join(text.split())[:60]
        raise FlagsEditError(
            f"Unleash {method} {path} answered with no JSON object ({start!r}): UNLEASH_URL"
            f" must be the API root, e.g. http://unleash:4242/api (it is {url})"
        )
    return answer


def _body(strategy: dict[str, Any] | None) -> dict[str, Any]:
    assert strategy is not None
    return {k: v for k, v in strategy.items() if k in _KEPT}


def _check(url: str, method: str, path: str, status: int, text: str) -> None:
    if status < 300:
        return
    if status in (401, 403):
        raise FlagsEditError(
            f"Unleash at {url} refused the token (HTTP {status}):"
            " UNLEASH_ADMIN_TOKEN must be an admin API token"
        )
    try:
        document = json.loads(text)
        details = document.get("details") or [{}]
        message = details[0].get("message") or document.get("message") or text
    except (ValueError, AttributeError, IndexError, TypeError):
        message = text
    one_line = " ".join(str(message).split())[:300]
    raise FlagsEditError(f"Unleash {method} {path} answered HTTP {status}: {one_line}")
