"""Fault points do nothing until a harness installs a hook; the crash launcher's hook kills."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator import faults
from tests.conftest import ROOT


@pytest.fixture
def no_hook() -> Iterator[None]:
    faults.uninstall()
    yield
    faults.uninstall()


@pytest.mark.usefixtures("no_hook")
def test_a_point_without_a_hook_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment variables that used to arm a point are ignored.
    monkeypatch.setenv("CASCADE_FAULT_POINT", "after_freeze")
    monkeypatch.setenv("CASCADE_FAULT_AFTER", "0")
    for point in faults.POINTS:
        faults.fault_point(point)


@pytest.mark.usefixtures("no_hook")
def test_an_installed_hook_hears_every_point_until_uninstalled() -> None:
    heard: list[str] = []
    faults.install(heard.append)
    faults.fault_point("after_freeze")
    faults.install(lambda name: heard.append(name.upper()))  # replaces, does not add
    faults.fault_point("after_publish")
    faults.uninstall()
    faults.fault_point("after_publish")
    assert heard == ["after_freeze", "AFTER_PUBLISH"]


def test_the_crash_launcher_kills_at_the_point_after_the_passes_it_allows() -> None:
    script = (
        "import sys\n"
        "from orchestrator import faults\n"
        "from tests.crashpoint import kill_at\n"
        "faults.install(kill_at('after_balance_call', 2))\n"
        "for point in ('after_freeze', 'after_balance_call', 'after_balance_call'):\n"
        "    faults.fault_point(point)\n"
        "    print(point, flush=True)\n"
        "faults.fault_point('after_balance_call')\n"
        "print('survived', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == -9, result.stderr
    assert result.stdout.split() == ["after_freeze", "after_balance_call", "after_balance_call"]
