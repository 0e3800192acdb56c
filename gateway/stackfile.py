"""Where a running ``make run`` stack is: ``DATA_DIR/stack.json``, for the client commands.

The embedded Postgres and nats-server of ``make run`` listen on ports chosen at start, so a
command run in another terminal (``report``, ``dlq``, ``manual-checks``, ``flags``) cannot
know them. The dev supervisor writes them here once the stack is healthy and removes the file
when it stops; a command that has no ``DATABASE_URL``/``NATS_URL`` of its own reads it, and
says on stderr which stack it uses. A file left by a killed stack names a dead supervisor and
is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gateway.settings import REPO_ROOT

STACK_FILE = "stack.json"
# The variables a client command takes from the running stack.
SHARED_VARIABLES = (
    "DATABASE_URL",
    "NATS_URL",
    "NATS_NAMESPACE",
    "GATEWAY_URL",
    "OPS_API_TOKENS",
    "FLAGS_FILE",
    "UNLEASH_REFRESH_SECONDS",
    "UNLEASH_URL",  # never its token: `flags` only needs to know the stack reads Unleash
)
# Recorded for `flags`, not merged by with_running_stack: without UNLEASH_API_TOKEN the
# settings of a command given it would refuse to load.
RECORDED_ONLY = ("UNLEASH_URL",)


def data_dir(env: Mapping[str, str]) -> Path:
    """``DATA_DIR``, else the checkout's ``.data`` (as ``make run`` uses)."""
    return Path(env.get("DATA_DIR") or REPO_ROOT / ".data")


def write(folder: Path, variables: Mapping[str, str]) -> None:
    """Record the stack this process supervises: owner-only from its first byte (it holds the
    ops token, maybe a database password), in a file of its own (a leftover or planted
    temporary file, or a symlink in its place, is replaced, never written through)."""
    shared = {name: variables[name] for name in SHARED_VARIABLES if variables.get(name)}
    path = folder / STACK_FILE
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(temporary, flags, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(json.dumps({"pid": os.getpid(), "env": shared}, indent=2) + "\n")
    temporary.replace(path)


def remove(folder: Path) -> None:
    """Forget the stack; only this process's own record."""
    path = folder / STACK_FILE
    if _owner(path) == os.getpid():
        path.unlink(missing_ok=True)


def running_stack(env: Mapping[str, str]) -> tuple[Path, dict[str, str]] | None:
    """The live dev stack's file and variables, or ``None`` when no stack runs there."""
    path = data_dir(env) / STACK_FILE
    if not _mine(path):
        return None
    pid = _owner(path)
    if pid is None or not _alive(pid):
        return None
    try:
        recorded = json.loads(path.read_text())["env"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(recorded, dict):
        return None
    return path, {str(k): str(v) for k, v in recorded.items() if k in SHARED_VARIABLES}


def with_running_stack(env: Mapping[str, str]) -> tuple[dict[str, str], Path | None]:
    """``env``, completed from the running dev stack when it names no database or broker.

    Returns the environment to use and the stack file read (``None`` when none was)."""
    merged = dict(env)
    if merged.get("DATABASE_URL") or merged.get("NATS_URL"):
        return merged, None
    found = running_stack(merged)
    if found is None:
        return merged, None
    path, recorded = found
    for name, value in recorded.items():
        if name not in RECORDED_ONLY and not merged.get(name):
            merged[name] = value
    return merged, path


def redact_dsn(dsn: str) -> str:
    """``dsn`` without its password, in the user info or a ``password`` query parameter, for
    a line a person reads."""
    parts = urlsplit(dsn)
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name.strip().lower() == "password" for name, _ in query):
        masked = [(n, "***" if n.strip().lower() == "password" else v) for n, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


def _mine(path: Path) -> bool:
    """Whether ``path`` is a file of this user's (another's could name any database)."""
    try:
        return path.stat().st_uid == os.getuid()
    except OSError:
        return False


def _owner(path: Path) -> int | None:
    try:
        pid = json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
