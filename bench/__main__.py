"""``python -m bench [NAME ...]``: run benchmarks, print a table, write results/latest.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.registry import Report, discover

RESULTS = Path(__file__).resolve().parent / "results"


def _format(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}×" if abs(value) >= 0.1 else f"{value:.3f}×"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}"


def print_table(name: str, report: Report, seconds: float) -> None:
    width = max([len(f.label) for f in report.figures] + [20])
    print(f"\n== {name} ({seconds:.1f} s)")
    for figure in report.figures:
        print(f"  {figure.label:<{width}}  {_format(figure.value, figure.unit):>16}")
    for note in report.notes:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    benchmarks = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        help="default: all but the long ones named explicitly "
        f"({', '.join(b.name for b in benchmarks.values() if b.default)})",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for bench in benchmarks.values():
            print(f"{bench.name:<24} {bench.description}")
        return 0
    unknown = [n for n in args.names if n not in benchmarks]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(benchmarks)}")
    selected = (
        [benchmarks[n] for n in args.names]
        if args.names
        else [b for b in benchmarks.values() if b.default]
    )
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "benchmarks": {},
    }
    failed = False
    for bench in selected:
        print(f"running {bench.name}: {bench.description}", flush=True)
        started = time.monotonic()
        try:
            report = bench.run()
        except Exception:  # noqa: BLE001 — one broken benchmark must not hide the others
            failed = True
            traceback.print_exc()
            results["benchmarks"][bench.name] = {"error": traceback.format_exc(limit=3)}
            continue
        seconds = time.monotonic() - started
        print_table(bench.name, report, seconds)
        results["benchmarks"][bench.name] = {
            "description": bench.description,
            "seconds": round(seconds, 2),
            "figures": {f.key: f.as_json() for f in report.figures},
            "notes": report.notes,
            "details": report.details,
        }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "latest.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"\nresults written to {shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
