"""A/B: the cascade benchmark on an earlier commit and on this checkout, in one run.

``python -m bench.ab BASE`` (``make bench-ab BASE=<commit>``) checks ``BASE`` out in a git
worktree in a temporary directory (and ``--head COMMIT``, if given, in another; otherwise the
head side is this checkout as it is), then runs ``python -m bench cascade`` ``--pairs`` times
for each side, alternately (base, head, base, ...), with this environment's interpreter
and the side's own code first on ``PYTHONPATH`` (the child processes it starts inherit it). So
both sides see the same machine on the same day, which absolute figures from different days
never do (they swing far more than the differences measured here). Per scenario it prints the
best final rate of each side and the ratio, and writes ``bench/results/ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCENARIO_KEYS = ("sync_ok_final_rate", "mixed_final_rate")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _run_cascade(side: Path) -> dict[str, Any]:
    """One ``python -m bench cascade`` with ``side``'s code; its figures."""
    env = {**os.environ, "PYTHONPATH": str(side)}
    subprocess.run([sys.executable, "-m", "bench", "cascade"], cwd=side, env=env, check=True)
    latest = json.loads((side / "bench" / "results" / "latest.json").read_text())
    figures: dict[str, Any] = latest["benchmarks"]["cascade"]["figures"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("base", help="the commit to compare this checkout with")
    parser.add_argument("--head", help="a commit to measure instead of this checkout")
    parser.add_argument("--pairs", type=int, default=2, help="runs per side (default 2)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    base = _git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    head = _git("rev-parse", "--verify", f"{args.head or 'HEAD'}^{{commit}}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cascade-ab-") as tmp:
        sides = {"base": Path(tmp) / "base", "head": Path(tmp) / "head" if args.head else ROOT}
        for side, commit in (("base", base), ("head", head)):
            if sides[side] != ROOT:
                _git("worktree", "add", "--detach", str(sides[side]), commit)
        try:
            runs: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
            for _ in range(args.pairs):
                for side, path in sides.items():
                    runs[side].append(_run_cascade(path))
        finally:
            for path in sides.values():
                if path != ROOT:
                    _git("worktree", "remove", "--force", str(path))
    summary: dict[str, Any] = {"base": base, "head": head, "pairs": args.pairs, "scenarios": {}}
    print(f"\n== A/B cascade: base {base[:10]} vs head {head[:10]} ({args.pairs} pairs)")
    for key in SCENARIO_KEYS:
        best = {side: max(run[key]["value"] for run in runs[side]) for side in runs}
        all_runs = {side: [round(run[key]["value"], 1) for run in runs[side]] for side in runs}
        label = runs["head"][0][key]["label"]
        ratio = best["head"] / best["base"]
        summary["scenarios"][key] = {"best": best, "runs": all_runs, "ratio": ratio}
        print(
            f"  {label:<44} base {best['base']:8.1f}/s  head {best['head']:8.1f}/s"
            f"  head/base {ratio:.2f}×   (runs: base {all_runs['base']}, head {all_runs['head']})"
        )
    (RESULTS / "ab.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
