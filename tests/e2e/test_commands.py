"""The commands people run: bad configuration fails fast; the dev stack stops cleanly."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from devstack.embedded import free_port
from orchestrator import bus
from tests.conftest import (
    API_TOKEN,
    ROOT,
    Services,
    create_database,
    flags_document,
    new_id,
    withdrawal_body,
)
from tests.waiting import wait_until_sync

CLI = [sys.executable, "-m", "gateway.cli"]


def _run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        CLI + args,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    result = _run(
        ["serve"],
        {
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
            "NATS_URL": "nats://127.0.0.1:1",
            "SANDBOX_ENABLED": "true",
            "HTTP_PORT": str(free_port()),
        },
    )
    _one_line_error(result, "DATABASE_URL")


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}, ["DATABASE_URL"]),
        ({"DATABASE_URL": ""}, ["DATABASE_URL is not set"]),
        (
            {"DATABASE_URL": "postgresql://127.0.0.1:1/x", "DEPLOYMENT_ENV": "production"},
            ["DEPLOYMENT_ENV is production"],
        ),
        ({"SANDBOX_PORT": "eighty"}, ["SANDBOX_PORT"]),
    ],
)
def test_sandbox_that_cannot_start_is_one_line(env: dict[str, str], words: list[str]) -> None:
    result = _run(["sandbox"], {"SANDBOX_PORT": str(free_port()), **env})
    _one_line_error(result, *words)


def test_malformed_flags_file_is_one_line(tmp_path: Path) -> None:
    flags = tmp_path / "flags.json"
    flags.write_text('{"features": [{"name": 1}]')
    result = _run(
        ["serve"],
        {
            "FLAGS_FILE": str(flags),
            "SANDBOX_ENABLED": "true",
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
            "NATS_URL": "nats://127.0.0.1:1",
            "HTTP_PORT": str(free_port()),
        },
    )
    _one_line_error(result, "FLAGS_FILE")


def test_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run(["dev"], {"HTTP_PORT": str(port)})
    _one_line_error(result, "HTTP_PORT", str(port))


@pytest.mark.parametrize(
    ("name", "value", "word"),
    [
        ("HTTP_PORT", "eighty", "HTTP_PORT"),
        ("SANDBOX_ENABLED", "maybe", "SANDBOX_ENABLED"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL"),
        ("PROVIDERS_FILE", "/nonexistent/providers.json", "PROVIDERS_FILE"),
        ("WORKER_CONCURRENCY", "nan", "WORKER_CONCURRENCY"),
        ("LOG_LEVEL", "verbose", "LOG_LEVEL"),
    ],
)
def test_bad_settings_are_one_line(name: str, value: str, word: str) -> None:
    result = _run(["worker"], {"SANDBOX_ENABLED": "true", name: value})
    _one_line_error(result, word)


def test_migrate_needs_only_the_database_url(services: Services) -> None:
    """The migration Job carries no providers file, flags or tokens: nothing else is read."""
    empty = f"cg_{secrets.token_hex(6)}"
    asyncio.run(create_database(services.admin_dsn, empty))
    result = _run(
        ["migrate"],
        {"DATABASE_URL": services.dsn(empty), "PROVIDERS_FILE": "/nonexistent/providers.json"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "migrations applied"


@pytest.mark.parametrize("limit", ["0", "-3", "ten"])
def test_dlq_replay_limit_must_be_positive(limit: str) -> None:
    result = _run(["dlq", "replay", "--limit", limit], {"NATS_URL": "nats://127.0.0.1:1"})
    assert result.returncode == 2, result.stderr
    assert f"argument --limit: must be a whole number of at least 1, not '{limit}'" in result.stderr


def test_version_prints_the_installed_version() -> None:
    result = _run(["--version"], {})
    assert result.returncode == 0, result.stderr
    version = importlib.metadata.version("cascade-gateway")
    assert result.stdout.strip() == f"cascade-gateway {version}"


@pytest.mark.parametrize(
    ("command", "needs"),
    [
        (["serve"], ["DATABASE_URL", "NATS_URL", "CORE_URL", "SANDBOX_ENABLED", "HTTP_PORT"]),
        (["worker"], ["DATABASE_URL", "NATS_URL", "CORE_URL", "WORKER_CONCURRENCY"]),
        (["migrate"], ["DATABASE_URL"]),
        (["dev"], ["embedded Postgres and NATS"]),
        (["sandbox"], ["DATABASE_URL", "PUBLIC_URL", "PROVIDERS_FILE", "SANDBOX_PORT"]),
        (["transitions"], ["reads no environment"]),
        (["dlq"], ["NATS_URL", "NATS_NAMESPACE"]),
        (["dlq", "list"], ["NATS_URL", "NATS_NAMESPACE"]),
        (["dlq", "replay"], ["NATS_URL", "NATS_NAMESPACE"]),
        (["report"], ["DATABASE_URL", "a date alone is midnight UTC"]),
        (["manual-checks"], ["GATEWAY_URL", "OPS_API_TOKEN", "stack.json"]),
        (["manual-checks", "list"], ["GATEWAY_URL", "OPS_API_TOKENS"]),
        (["manual-checks", "show"], ["GATEWAY_URL", "TASK_OR_WITHDRAWAL_ID"]),
        (["manual-checks", "resolve"], ["GATEWAY_URL", "--operator", "--reason", "--unverified"]),
        (["providers", "list"], ["GATEWAY_URL", "OPS_API_TOKEN", "limits"]),
        (["providers", "open"], ["GATEWAY_URL", "--seconds", "--reason", "--operator"]),
    ],
)
def test_every_command_help_says_what_it_does_and_needs(
    command: list[str], needs: list[str]
) -> None:
    result = _run([*command, "--help"], {})
    assert result.returncode == 0, result.stderr
    description = result.stdout.partition("\n\n")[2].split("options:")[0]  # after the usage
    assert "Environment:" in description, result.stdout
    text = " ".join(result.stdout.split())  # unwrapped
    for word in needs:
        assert word in text, result.stdout


def test_help_describes_every_command() -> None:
    """A command added later without a description fails here, not in an operator's shell."""
    from gateway.cli import build_parser  # noqa: PLC0415

    parser = build_parser()
    pending = [parser]
    seen = 0
    while pending:
        current = pending.pop()
        for action in current._actions:  # argparse keeps its subparsers here
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    assert sub.description, sub.prog
                    assert "Environment:" in sub.description, sub.prog
                    pending.append(sub)
                    seen += 1
    assert seen >= 9


async def test_dlq_list_says_when_the_dlq_is_empty(services: Services) -> None:
    """stdout stays JSON lines (none here); the one line saying it is empty is on stderr."""
    namespace = f"t{secrets.token_hex(4)}."
    nc = await bus.connect(services.nats_url, name="test-dlq-empty")
    try:
        await bus.ensure_streams(nc.jetstream(), bus.Names(namespace))
    finally:
        await nc.close()
    result = _run(["dlq", "list"], {"NATS_URL": services.nats_url, "NATS_NAMESPACE": namespace})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"the DLQ ({bus.Names(namespace).dlq_stream}) is empty"], result.stderr


def test_dev_outside_a_repository_checkout_is_one_line() -> None:
    """An installed wheel has no ``devstack`` package: ``dev`` says why instead of a traceback."""
    script = (
        "import sys\n"
        "sys.modules['devstack'] = None  # what an installed wheel looks like: no such package\n"
        "from gateway.cli import main\n"
        "sys.exit(main(['dev']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    _one_line_error(result, "`dev`", "repository checkout", "make run")


def test_sandbox_refused_in_production() -> None:
    result = _run(["serve"], {"SANDBOX_ENABLED": "true", "DEPLOYMENT_ENV": "production"})
    _one_line_error(result, "SANDBOX_ENABLED", "production")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
def test_dev_stack_serves_and_stops_without_orphans() -> None:
    """`make run`'s supervisor on embedded NATS + Postgres; Ctrl-C leaves nothing behind."""
    data = Path(tempfile.mkdtemp(prefix="cascade-dev-", dir="/tmp"))
    data.chmod(0o755)
    flags = data / "flags.json"
    flags.write_text(json.dumps(flags_document(enabled=True)))
    port = free_port()
    env = {
        **os.environ,
        "HTTP_PORT": str(port),
        "DATA_DIR": str(data),
        "FLAGS_FILE": str(flags),
        "GATEWAY_API_TOKENS": API_TOKEN,
        "SANDBOX_WEBHOOK_DELAY_SECONDS": "0.1",
    }
    env.pop("DATABASE_URL", None)
    env.pop("NATS_URL", None)
    proc = subprocess.Popen(
        [*CLI, "dev"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        lines: list[str] = []
        while not any("press Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
        family = _descendants(proc.pid)
        assert len(family) >= 4, family  # nats-server, postgres, gateway, worker
        wid = new_id()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/withdrawals",
            method="POST",
            data=json.dumps(withdrawal_body(wid, ["sbx_decline", "sbx_ok"])).encode(),
            headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201

        def status() -> str:
            get = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/withdrawals/{wid}",
                headers={"Authorization": f"Bearer {API_TOKEN}"},
            )
            with urllib.request.urlopen(get, timeout=10) as response:
                found: str = json.loads(response.read())["status"]
            return found

        final = wait_until_sync(
            status,
            done=lambda found: found != "processing",
            timeout=90,
            interval=0.1,
            what=f"withdrawal {wid} to be final",
        )
        assert final == "succeeded"
        # A command in another terminal finds the stack's database by itself.
        client_env = {"DATA_DIR": str(data), "DATABASE_URL": "", "NATS_URL": ""}
        report = _run(["report", "--json"], client_env)
        assert report.returncode == 0, report.stderr
        assert f"using the make run stack recorded in {data / 'stack.json'}" in report.stderr
        assert json.loads(report.stdout)["cohorts"], report.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not (data / "stack.json").exists()
        wait_until_sync(
            lambda: [pid for pid in family if _alive(pid)],
            done=lambda alive: not alive,
            timeout=10,
            interval=0.05,
            what="every process of the dev stack to exit",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
