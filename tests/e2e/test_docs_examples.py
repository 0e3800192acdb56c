"""Every shell example in README.md and docs/*.md, run as written against a live `make run`.

The examples are what a new user copies first; they rot silently unless something runs them.
This test starts the dev stack (`cascade-gateway dev`, as `make run` does) on a data folder of
its own, then runs each fenced ``sh`` block of ``docs/*.md``, then of the README, in document
order, with bash (``set -eo pipefail``), from the repository root. The only rewrite is the
port: ``127.0.0.1:8080`` and ``localhost:8080`` become the port the stack got.

A block passes when it exits 0 and its output holds every ``"key":value`` pair its expected-
output comments show (``# {"status":"succeeded",...}``; values with ``…`` or ``<…>`` are
placeholders and not compared). ``curl`` runs with ``--fail-with-body``: an answer of 400 or
more fails the block, unless the block is preceded by ``<!-- docs-test: error answers -->``
(it shows one on purpose; its expected pairs are still compared). A block that only reads (no
``-X``, ``-d``, ``--data``, ``--json``, ``--request``, ``cascade-gateway``) is retried until it
matches, for up to 60 s: the docs say "a second later" where a person would wait. A block that
cannot run here (Kubernetes, docker, `make run` itself) is preceded by
``<!-- docs-test: skip: <reason> -->``, and the reason is required.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.embedded import free_port
from tests.conftest import ROOT

# docs/ first: the README's flags examples switch the cohort back and forth, and the gateway
# sees the file's last state only at its next reload (5 s), so a later example of another
# document would depend on when that reload comes.
DOCUMENTS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
SKIP = re.compile(r"<!-- docs-test: skip: (.+?) -->")
ERRORS_SHOWN = "<!-- docs-test: error answers -->"
FAIL_ON_ERRORS = 'curl() { command curl --fail-with-body "$@"; }\n'
SHELLS = {"sh", "bash", "shell"}
EXPECTED_PAIR = re.compile(r'"(\w+)":\s*("[^"…<>]*"|null|true|false|-?\d+(?:\.\d+)?)(?=[,}\]])')
MUTATING = re.compile(r"\s-X|\s-d\s|\s--data|\s--json\s|\s--request\s|cascade-gateway\s")
PORT = re.compile(r"(127\.0\.0\.1|localhost):8080\b")
RETRY_SECONDS = 60.0
BLOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    text: str
    skip_reason: str | None
    shows_errors: bool = False

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    def expected_pairs(self) -> list[str]:
        """The ``"key":value`` pairs of the block's expected-output comments, spaces removed."""
        comments = [
            line.strip()[1:] for line in self.text.splitlines() if line.strip().startswith("#")
        ]
        return [f'"{key}":{value}' for key, value in EXPECTED_PAIR.findall(" ".join(comments))]


def shell_blocks(document: Path) -> Iterator[Block]:
    """The fenced shell blocks of one Markdown document, with the skip reason before each."""
    lines = document.read_text().splitlines()
    index = 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        indent, language = opened.groups()
        end = index + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        if language in SHELLS:
            before = lines[index - 1] if index > 0 else ""
            skip = SKIP.search(before)
            body = "\n".join(line.removeprefix(indent) for line in lines[index + 1 : end])
            reason = skip.group(1) if skip else None
            yield Block(document, index + 1, body, reason, ERRORS_SHOWN in before)
        index = end + 1


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in shell_blocks(document)]


def test_the_documents_have_shell_examples_and_every_skip_says_why() -> None:
    """The extraction itself: it finds the README's walk-through and honours skip markers."""
    blocks = all_blocks()
    readme = [b for b in blocks if b.document.name == "README.md"]
    assert any("wd_demo_1" in b.text for b in readme)
    assert any(b.skip_reason for b in blocks)
    for document in DOCUMENTS:
        text = document.read_text()
        markers = text.count("<!-- docs-test:")
        known = len(SKIP.findall(text)) + text.count(ERRORS_SHOWN)
        assert markers == known, f"{document}: a marker without its reason, or an unknown one"


@dataclass
class DevStack:
    port: int
    data_dir: Path
    process: subprocess.Popen[str]

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "DATA_DIR": str(self.data_dir)}
        for name in ("DATABASE_URL", "NATS_URL", "FLAGS_FILE", "PROVIDERS_FILE", "HTTP_PORT"):
            env.pop(name, None)
        return env


@pytest.fixture
def dev_stack() -> Iterator[DevStack]:
    """`make run` on a data folder and a copy of the flags file of its own."""
    data = Path(tempfile.mkdtemp(prefix="cascade-docs-", dir="/tmp"))
    data.chmod(0o755)
    flags = data / "flags.json"
    shutil.copy(ROOT / "config" / "flags.json", flags)
    port = free_port()
    env = {**os.environ, "HTTP_PORT": str(port), "DATA_DIR": str(data), "FLAGS_FILE": str(flags)}
    for name in ("DATABASE_URL", "NATS_URL", "PROVIDERS_FILE", "GATEWAY_API_TOKENS"):
        env.pop(name, None)
    process = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "cascade-gateway"), "dev"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    drain: threading.Thread | None = None
    try:
        drain = _await_ready(process)
        yield DevStack(port, data, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if drain is not None:
            drain.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(data, ignore_errors=True)


def _await_ready(process: subprocess.Popen[str]) -> threading.Thread:
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    seen: list[str] = []
    while not any("press Ctrl-C" in line for line in seen):
        assert time.monotonic() < deadline, "".join(seen)
        line = process.stdout.readline()
        assert line or process.poll() is None, "".join(seen)
        seen.append(line)
    # From here on nobody reads the stack's log lines: drain them, or a full pipe would block
    # the stack.
    drain = threading.Thread(target=process.stdout.read, daemon=True)
    drain.start()
    return drain


def run_block(block: Block, stack: DevStack) -> str | None:
    """Run one block; the reason it failed, or ``None``."""
    strict = "" if block.shows_errors else FAIL_ON_ERRORS
    script = "set -eo pipefail\n" + strict + PORT.sub(rf"\g<1>:{stack.port}", block.text)
    expected = block.expected_pairs()
    retry = MUTATING.search(f" {block.text} ") is None
    deadline = time.monotonic() + (RETRY_SECONDS if retry else 0)
    while True:
        result = subprocess.run(
            ["bash", "-c", script],
            env=stack.environment(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
        output = re.sub(r'":\s+', '":', result.stdout)
        missing = [pair for pair in expected if pair not in output]
        if result.returncode == 0 and not missing:
            return None
        if time.monotonic() >= deadline:
            return (
                f"{block.where}: exit {result.returncode}, missing {missing}\n"
                f"--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-2000:]}"
            )
        time.sleep(0.5)


@pytest.mark.e2e
def test_every_documented_example_runs_as_written(dev_stack: DevStack) -> None:
    blocks = [block for block in all_blocks() if block.skip_reason is None]
    assert len(blocks) >= 8, [block.where for block in blocks]
    failures = [failure for block in blocks if (failure := run_block(block, dev_stack))]
    assert not failures, "\n\n".join(failures)


def test_expected_pairs_are_read_from_comments() -> None:
    block = Block(
        ROOT / "README.md",
        1,
        'curl -s x\n# {"status":"succeeded","reference":"sbx-…", "n": 2,\n#  "code":null}',
        None,
    )
    assert block.expected_pairs() == ['"status":"succeeded"', '"n":2', '"code":null']
    assert json.loads("{" + ",".join(block.expected_pairs()) + "}")["n"] == 2
