"""What the code may import: production loads no dev or test code, and no package has a cycle.

The product is ``contracts/``, ``flags/``, ``gateway/`` and ``orchestrator/`` (the wheel's
packages). ``sandbox/`` (the simulators) and ``devstack/`` (``make run``) live only in the
repository; ``tests/`` and ``bench/`` too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

PRODUCT = ("contracts", "flags", "gateway", "orchestrator")
DEV_ONLY = ("sandbox", "devstack", "tests", "bench")
# The migration scripts run under Alembic's context (env.py configures it on import).
NOT_IMPORTABLE_ALONE = ("orchestrator/migrations",)


def _modules(packages: tuple[str, ...]) -> dict[str, Path]:
    """Module name → file, for every module of ``packages``."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative.as_posix().startswith(NOT_IMPORTABLE_ALONE):
                continue
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def test_the_wheel_holds_product_code_only() -> None:
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert tuple(build["targets"]["wheel"]["packages"]) == PRODUCT


def test_production_imports_no_dev_or_test_module() -> None:
    """Every product module imported, the app built, with ``DEPLOYMENT_ENV=production``."""
    script = f"""
import importlib, json, sys
for name in {sorted(_modules(PRODUCT))!r}:
    importlib.import_module(name)
from gateway.app import create_app
from gateway.settings import load_settings
settings = load_settings()
assert settings.deployment_env == "production" and not settings.sandbox_enabled
create_app(settings)
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in {DEV_ONLY!r})))
"""
    env = {"PATH": "/usr/bin:/bin", "DEPLOYMENT_ENV": "production"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_sandbox_enabled_where_it_is_not_installed_is_a_settings_error() -> None:
    script = """
import sys
sys.modules["sandbox"] = None  # as in the wheel and the image
from gateway.app import create_app
from gateway.settings import SettingsError, load_settings
try:
    create_app(load_settings({"SANDBOX_ENABLED": "true"}))
except SettingsError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SANDBOX_ENABLED is true but this installation has no sandbox")


def _imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The first-party modules ``name`` imports, anywhere in the file (lazy imports too)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            # ``from package import module`` depends on the module, not just the package.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            module = target
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module and module != name:
                yield module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    known = _modules((*PRODUCT, "sandbox", "devstack"))
    graph = {name: set(_imports(name, path, known)) for name, path in known.items()}
    assert graph["gateway.cli"] >= {"devstack.supervisor"}, "the scan misses lazy imports"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_two_modules_share_a_name() -> None:
    """A reader who sees ``providers`` or ``http`` must not have to ask which one."""
    seen: dict[str, list[str]] = {}
    for name in _modules((*PRODUCT, "sandbox", "devstack")):
        *package, module = name.split(".")
        if package:  # a package's own __init__ is named by the package
            seen.setdefault(module, []).append(name)
    assert {m: names for m, names in seen.items() if len(names) > 1} == {}
