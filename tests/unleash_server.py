"""A real Unleash server for the tests: npm ``unleash-server`` 8.2 on its own Postgres database.

The package is installed once into a cache directory (``~/.cache/cascade-gateway/unleash-server``
or ``$XDG_CACHE_HOME``; ``CASCADE_UNLEASH_DIR`` overrides) and reused; a failed install is an
error, not a skip. The server runs on a free port of 127.0.0.1 with an admin token and a backend
(client) token created at start (``INIT_ADMIN_API_TOKENS`` / ``INIT_BACKEND_API_TOKENS``), and
:class:`UnleashAdmin` drives the Admin API the way a release manager's tooling would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devstack.embedded import free_port
from tests.waiting import wait_until

# 8.2 is what runs on this project's Node 20 (npm warns that 8.x wants Node 22): patch updates only.
PACKAGE = "unleash-server@~8.2.0"
ENVIRONMENT = "development"
PROJECT = "default"
INSTALL_TIMEOUT = 600.0
READY_TIMEOUT = 60.0


class UnleashUnavailable(Exception):
    """Node.js or npm is missing: the only reason to skip a live-Unleash test."""


def install_dir() -> Path:
    if override := os.environ.get("CASCADE_UNLEASH_DIR"):
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cascade-gateway" / "unleash-server"


def _entry_point(directory: Path) -> Path:
    return directory / "node_modules" / "unleash-server" / "dist" / "server.js"


def _installed_version(directory: Path) -> str | None:
    manifest = directory / "node_modules" / "unleash-server" / "package.json"
    if not manifest.is_file() or not _entry_point(directory).is_file():
        return None
    version: str = json.loads(manifest.read_text())["version"]
    return version


def ensure_installed() -> Path:
    """Install ``unleash-server`` 8.2 into the cache directory unless it is there; return it."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise UnleashUnavailable("node and npm are needed to run a real Unleash server")
    directory = install_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # Parallel test runs share the cache: one installs, the others wait for it.
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = _installed_version(directory)
        if version is not None and version.startswith("8.2."):
            return directory
        (directory / "package.json").write_text('{"private": true}\n')
        command = [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefer-offline",
            "--no-progress",
            "--loglevel=error",
            PACKAGE,
        ]
        try:
            done = subprocess.run(
                command,
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"npm install {PACKAGE} took over {INSTALL_TIMEOUT:g} s") from exc
        if done.returncode != 0 or _installed_version(directory) is None:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"npm install {PACKAGE} failed ({done.returncode}):\n{tail}")
        return directory


@dataclass
class UnleashServer:
    """A running unleash-server process."""

    base_url: str
    admin_token: str
    client_token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def api_url(self) -> str:
        """What ``UNLEASH_URL`` points at (the SDKs append ``/client/features``)."""
        return f"{self.base_url}/api"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye, as in a crash."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


async def _wait_ready(server: UnleashServer) -> None:
    async with httpx.AsyncClient(timeout=2) as client:

        async def health() -> int | None:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"unleash-server exited ({server.process.returncode}):\n{server.log_tail()}"
                )
            try:
                return (await client.get(f"{server.base_url}/health")).status_code
            except httpx.HTTPError:
                return None  # not listening yet

        try:
            await wait_until(
                health,
                done=lambda status: status == 200,
                timeout=READY_TIMEOUT,
                interval=0.1,
                what="unleash-server's /health to answer 200",
            )
        except AssertionError as timeout:
            raise RuntimeError(f"{timeout}\n{server.log_tail()}") from timeout


@contextlib.asynccontextmanager
async def running_unleash(database_url: str, workdir: Path) -> AsyncIterator[UnleashServer]:
    """Start unleash-server on ``database_url`` (a database it may own) until the block ends."""
    directory = await asyncio.to_thread(ensure_installed)
    port = free_port()
    admin_token = f"*:*.{secrets.token_hex(16)}"
    client_token = f"{PROJECT}:{ENVIRONMENT}.{secrets.token_hex(16)}"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATABASE_SSL": "false",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "INIT_ADMIN_API_TOKENS": admin_token,
        "INIT_BACKEND_API_TOKENS": client_token,
        "SEND_TELEMETRY": "false",
        "CHECK_VERSION": "false",
        "LOG_LEVEL": "warn",
        "NODE_ENV": "production",
    }
    log_path = workdir / f"unleash-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["node", str(_entry_point(directory))],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = UnleashServer(
        base_url=f"http://127.0.0.1:{port}",
        admin_token=admin_token,
        client_token=client_token,
        process=process,
        log_path=log_path,
    )
    try:
        await _wait_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 10)


class UnleashAdmin:
    """The Admin API calls a release manager's tooling makes for ``withdrawals.cascade``."""

    def __init__(self, server: UnleashServer) -> None:
        self._client = httpx.AsyncClient(
            base_url=f"{server.base_url}/api/admin",
            headers={"Authorization": server.admin_token},
            timeout=10,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = await self._client.request(method, path, json=body)
        if response.status_code >= 300:
            raise AssertionError(
                f"Admin API {method} {path} → {response.status_code}: {response.text}"
            )
        return response.json() if response.content else None

    async def define_merchant_context(self) -> None:
        """``merchantId`` as a context field usable for constraints and stickiness."""
        await self._call("POST", "/context", {"name": "merchantId", "stickiness": True})

    async def create_toggle(self, name: str) -> None:
        await self._call("POST", f"/projects/{PROJECT}/features", {"name": name, "type": "release"})

    def _strategies(self, name: str) -> str:
        return f"/projects/{PROJECT}/features/{name}/environments/{ENVIRONMENT}/strategies"

    async def add_allow_list(self, name: str, merchants: list[str]) -> str:
        """A 100 % rollout constrained to ``merchantId IN merchants``; returns its id."""
        strategy = await self._call("POST", self._strategies(name), _allow_list(name, merchants))
        strategy_id: str = strategy["id"]
        return strategy_id

    async def set_allow_list(self, name: str, strategy_id: str, merchants: list[str]) -> None:
        await self._call(
            "PUT", f"{self._strategies(name)}/{strategy_id}", _allow_list(name, merchants)
        )

    async def enable(self, name: str) -> None:
        await self._call(
            "POST", f"/projects/{PROJECT}/features/{name}/environments/{ENVIRONMENT}/on"
        )

    async def disable(self, name: str) -> None:
        await self._call(
            "POST", f"/projects/{PROJECT}/features/{name}/environments/{ENVIRONMENT}/off"
        )


def _allow_list(name: str, merchants: list[str]) -> dict[str, Any]:
    return {
        "name": "flexibleRollout",
        "parameters": {"rollout": "100", "stickiness": "default", "groupId": name},
        "constraints": [
            {"contextName": "merchantId", "operator": "IN", "values": merchants, "inverted": False}
        ],
    }
