"""``docs/performance.md`` and its bar chart, from one run of ``python -m bench peers``.

The chart is an HTML page of plain bars drawn by the headless chromium the cohort report page
already uses (:func:`gateway.report_page.find_browser`): no plotting library to install.
"""

from __future__ import annotations

import html
import os
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.report_page import find_browser

if TYPE_CHECKING:
    from bench.peers.run import Result, Round, Spread
    from bench.registry import Report

COLOURS = {"ours": "#2b6cb0", "temporal": "#6b46c1", "dbos": "#2f855a"}
PROFILE_MARK = "<!-- profile notes below are kept across runs -->"


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}×" if value >= 0.1 else f"{value:.3f}×"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _cell(s: Spread, unit: str, rounds: int) -> str:
    if rounds == 1:
        return _fmt(s.median, unit)
    return f"{_fmt(s.median, unit)} ({_fmt(s.low, unit)}–{_fmt(s.high, unit)})"


def table(names: list[str], results: list[Result], rounds: list[Round]) -> list[str]:
    from bench.peers.run import FIGURES, labels, summary  # noqa: PLC0415

    figures = summary(results)
    text = labels(rounds)
    peers = [n for n in names if n != "ours"] if "ours" in names else []
    head = ["figure", *names, *(f"ours ÷ {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, _label, unit, better_high in FIGURES:
        row = [f"{text[key]} ({unit}, {'higher' if better_high else 'lower'} is better)"]
        row += [_cell(figures[n][key], unit, len(rounds)) for n in names]
        row += [_fmt(figures["ours"][key].median / figures[p][key].median, "x") for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    row = ["crash check (kill -9 of the worker(s) mid-run), every round"]
    for n in names:
        passed = [r.crash_ok for r in results if r.system == n]
        row.append("PASS" if all(passed) else f"FAIL in {passed.count(False)} of {len(passed)}")
    row += [""] * len(peers)
    lines.append("| " + " | ".join(row) + " |")
    lines += ["", *reference_table(figures, results, rounds)]
    return lines


def reference_table(
    figures: dict[str, dict[str, Spread]], results: list[Result], rounds: list[Round]
) -> list[str]:
    """The baseline, and the ceiling the co-located environment puts on every system."""
    from bench.peers.run import ceilings, spread  # noqa: PLC0415

    baseline = spread([r.baseline_tx_s for r in rounds])
    top = ceilings(results)
    n = len(rounds)
    cores = os.cpu_count()

    def row(label: str, cells: list[str]) -> str:
        return "| " + " | ".join([label, *cells]) + " |"

    lines = [
        "| same machine, every round | `[sbx_sync_ok]` | `[sbx_decline, sbx_ok]` |",
        "|---|---|---|",
        row(
            "asyncpg 4-round-trip transactions, tx/s (the baseline, `bench/baselines.py`)",
            [_cell(baseline, "/s", n)] * 2,
        ),
        row(
            "environment's CPU ms per withdrawal (sandbox, its Postgres, load client; median "
            "over every system's turns, lowest–highest)",
            [_cell(top[s].env_ms, "ms", n) for s in ("sync", "mixed")],
        ),
        row(
            "of which per withdrawal, and per second (fitted over every turn: env ms = "
            "per withdrawal + per second ÷ rate)",
            [
                f"{_fmt(top[s].per_withdrawal_ms, 'ms')} ms + {top[s].per_second_ms:.0f} ms/s"
                if top[s].fitted
                else "too few turns to fit"
                for s in ("sync", "mixed")
            ],
        ),
        row(
            f"**ceiling**: ({cores} cores × 1000 − per second) ÷ per withdrawal, final "
            "withdrawals/s",
            [_fmt(top[s].rate, "/s") for s in ("sync", "mixed")],
        ),
        row(
            "ceiling ÷ baseline: the highest ratio *any* system can reach here",
            [_fmt(top[s].rate / baseline.median, "x") for s in ("sync", "mixed")],
        ),
    ]
    if "ours" in figures:
        ours = [figures["ours"][k].median for k in ("rate_sync", "rate_mixed")]
        lines.append(
            row(
                "ours ÷ baseline (target ≥ 0.10)",
                [_fmt(v / baseline.median, "x") for v in ours],
            )
        )
        lines.append(
            row(
                "ours ÷ ceiling",
                [_fmt(v / top[s].rate, "x") for v, s in zip(ours, ("sync", "mixed"), strict=True)],
            )
        )
    return lines


def chart_html(names: list[str], results: list[Result], rounds: list[Round]) -> str:
    from bench.peers.run import FIGURES, labels, summary  # noqa: PLC0415

    figures = summary(results)
    text = labels(rounds)
    panels = []
    for key, _label, unit, better_high in FIGURES:
        top = max(figures[n][key].high for n in names) or 1.0

        def px(value: float, top: float = top) -> float:
            return 300 * value / top

        bars = "".join(
            f'<div class="row"><span class="name">{html.escape(n)}</span>'
            f'<span class="track"><span class="bar" style="width:{px(s.median):.0f}px;'
            f'background:{COLOURS.get(n, "#555")}"></span>'
            f'<span class="whisker" style="left:{px(s.low):.0f}px;'
            f'width:{max(1.0, px(s.high) - px(s.low)):.0f}px"></span></span>'
            f'<span class="val">{_fmt(s.median, unit)} {html.escape(unit)}</span></div>'
            for n in names
            for s in (figures[n][key],)
        )
        hint = "higher is better" if better_high else "lower is better"
        panels.append(
            f'<div class="panel"><h3>{html.escape(text[key])}</h3><p>{hint}</p>{bars}</div>'
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><style>"
        "body{font-family:sans-serif;margin:16px;background:#fff;width:960px}"
        ".panel{display:inline-block;vertical-align:top;width:460px;margin:0 8px 14px 0}"
        "h3{font-size:14px;margin:0 0 2px} p{font-size:11px;color:#666;margin:0 0 4px}"
        ".row{display:flex;align-items:center;height:22px;font-size:12px}"
        ".name{width:70px}.track{position:relative;width:306px;height:16px}"
        ".bar{position:absolute;left:0;top:0;height:16px}"
        ".whisker{position:absolute;top:7px;height:2px;background:#000}"
        "h2{font-size:20px}</style></head><body><h2>cascade-gateway vs Temporal vs DBOS, "
        f"same cascade and sandbox: median of {len(rounds)} interleaved round(s), the line "
        f"spans lowest to highest</h2>{''.join(panels)}</body></html>"
    )


def draw(names: list[str], results: list[Result], rounds: list[Round], path: Path) -> str:
    from bench.peers.run import FIGURES  # noqa: PLC0415

    browser = find_browser()
    if browser is None:
        return "no chromium: the chart was not drawn"
    with tempfile.TemporaryDirectory(prefix="cascade-peers-chart-") as folder:
        page = Path(folder) / "chart.html"
        page.write_text(chart_html(names, results, rounds), encoding="utf-8")
        rows = (len(FIGURES) + 1) // 2
        command = [
            browser,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={folder}/profile",
            f"--window-size=1000,{110 + rows * 140}",
            f"--screenshot={path.resolve()}",
            page.as_uri(),
        ]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # our own page, no script
        subprocess.run(command, capture_output=True, timeout=120, check=False)
    return f"chart: {path.name}" if path.is_file() else "chromium did not draw the chart"


def load_table(results: list[Result], rounds: list[Round]) -> list[str]:
    from bench.peers.run import load_text  # noqa: PLC0415

    lines = [
        "| round | system | turn | load average before (1 / 5 / 15 min) | after |",
        "|---|---|---|---|---|",
    ]
    for this in rounds:
        mine = {r.system: r for r in results if r.round == this.number}
        for phase in ("saturation", "latency"):
            for name in this.order:
                before, after = mine[name].loads[phase]
                lines.append(
                    f"| {this.number} | {name} | {phase} | {load_text(before)} | "
                    f"{load_text(after)} |"
                )
    return lines


def write(
    report: Report,
    names: list[str],
    results: list[Result],
    rounds: list[Round],
    doc: Path,
    chart: Path,
) -> None:
    from bench.peers.run import load_text  # noqa: PLC0415

    drawn = draw(names, results, rounds, chart)
    kept = ""
    if doc.is_file() and PROFILE_MARK in doc.read_text():
        kept = doc.read_text().split(PROFILE_MARK, 1)[1]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    settings = ", ".join(
        f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("PEERS_")
    )
    notes = [
        n
        for n in report.notes
        if "crash check" in n or "CPU ms per withdrawal [" in n or "at its peak" in n
    ]
    everything = [x for r in results for loads in r.loads.values() for x in loads]
    lowest = min(everything, key=lambda load: load[0])
    highest = max(everything, key=lambda load: load[0])
    text = [
        "# Performance: ours against Temporal and DBOS",
        "",
        "Generated by `python -m bench peers` (`make bench-peers`); see",
        "`bench/peers/README.md` for how each peer is built and made fair. The same withdrawal",
        "cascade runs on each system against one sandbox process (cascade-core simulator and",
        "sandbox providers) over HTTP, with the same load generator and the same number of",
        "withdrawals. CPU and memory (PSS) count the system's own processes, its database and",
        "its broker; the sandbox and the load client are excluded.",
        "",
        f"Run of {when}; {settings or 'default sizes'}. **{len(rounds)} round(s)**, the systems",
        "interleaved (each round starts one system later); every system gets a saturation turn",
        "and, once all have had theirs, a latency turn, each on a freshly started instance.",
        "A cell is the **median over the rounds (lowest–highest)**; every ratio is of medians.",
        "The sustainable rate is half the slowest system's `[sbx_sync_ok]` saturation rate in",
        "the same round ("
        + ", ".join(f"round {r.number}: {r.sustainable_rate:g}/s" for r in rounds)
        + "): a load every system carries, so its latency is the flow's and not a queue's.",
        "",
        f"**Machine:** {os.cpu_count()} CPUs, shared with other engineers' work during the run:",
        f"load average (1 / 5 / 15 min) between {load_text(lowest)} and {load_text(highest)}",
        "over the turns (each turn's load below). Read the ratios and the spreads, not one",
        "absolute number.",
        "",
        *table(names, results, rounds),
        "",
        f"![bar chart of the figures](performance.png) ({drawn})",
        "",
        "Load average before and after each turn:",
        "",
        *load_table(results, rounds),
        "",
        "Per system and round:",
        "",
        *(f"- {n}" for n in notes),
        "",
        PROFILE_MARK,
    ]
    doc.write_text("\n".join(text) + kept.rstrip("\n") + "\n" if kept else "\n".join(text) + "\n")
