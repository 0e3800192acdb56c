"""The benchmark registry: named functions returning a :class:`Report`."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One measured or derived number."""

    key: str
    label: str
    value: float
    unit: str

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "unit": self.unit}


@dataclass
class Report:
    """What one benchmark measured: figures (baselines and ratios included) and notes."""

    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, label: str, value: float, unit: str) -> None:
        self.figures.append(Figure(key, label, value, unit))


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[[], Report]
    default: bool = True
    """Part of a plain ``python -m bench``; False for one that must be named (it is long)."""


REGISTRY: dict[str, Benchmark] = {}
_INFRASTRUCTURE = frozenset({"__main__", "registry"})


def benchmark(
    name: str, description: str, *, default: bool = True
) -> Callable[[Callable[[], Report]], Callable[[], Report]]:
    """Register ``fn`` under ``name`` (``python -m bench NAME``); ``default=False`` keeps it
    out of a plain ``python -m bench``."""

    def register(fn: Callable[[], Report]) -> Callable[[], Report]:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        REGISTRY[name] = Benchmark(name, description, fn, default)
        return fn

    return register


def discover() -> dict[str, Benchmark]:
    """Import every module of the ``bench`` package; their decorators fill the registry."""
    import bench  # noqa: PLC0415 — the package itself, to walk its modules

    for module in pkgutil.iter_modules(bench.__path__):
        if module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"bench.{module.name}")
    return dict(sorted(REGISTRY.items()))
