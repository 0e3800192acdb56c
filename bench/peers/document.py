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
    from bench.peers.run import Result
    from bench.registry import Report

COLOURS = {"ours": "#2b6cb0", "temporal": "#6b46c1", "dbos": "#2f855a"}
PROFILE_MARK = "<!-- profile notes below are kept across runs -->"


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}×" if value >= 0.1 else f"{value:.3f}×"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table(results: list[Result]) -> list[str]:
    from bench.peers.run import FIGURES, values  # noqa: PLC0415

    rate = os.environ.get("PEERS_RATE", "50")
    names = [r.system for r in results]
    peers = [n for n in names if n != "ours"]
    head = ["figure", *names, *(f"ours ÷ {p}" for p in peers if "ours" in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    vals = {r.system: values(r) for r in results}
    for key, label, unit, better_high in FIGURES:
        row = [
            f"{label.format(rate=rate)} ({unit}, {'higher' if better_high else 'lower'} is better)"
        ]
        row += [_fmt(vals[n][key], unit) for n in names]
        if "ours" in names:
            row += [_fmt(vals["ours"][key] / vals[p][key], "x") for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    row = ["crash check (kill -9 of the worker(s) mid-run)"]
    row += ["PASS" if r.crash_ok else "FAIL" for r in results]
    row += [""] * len(peers if "ours" in names else [])
    lines.append("| " + " | ".join(row) + " |")
    return lines


def chart_html(results: list[Result]) -> str:
    from bench.peers.run import FIGURES, values  # noqa: PLC0415

    rate = os.environ.get("PEERS_RATE", "50")
    vals = {r.system: values(r) for r in results}
    panels = []
    for key, label, unit, better_high in FIGURES:
        top = max(vals[n][key] for n in vals) or 1.0
        bars = "".join(
            f'<div class="row"><span class="name">{html.escape(n)}</span>'
            f'<span class="bar" style="width:{300 * vals[n][key] / top:.0f}px;'
            f'background:{COLOURS.get(n, "#555")}"></span>'
            f'<span class="val">{_fmt(vals[n][key], unit)} {html.escape(unit)}</span></div>'
            for n in vals
        )
        hint = "higher is better" if better_high else "lower is better"
        panels.append(
            f'<div class="panel"><h3>{html.escape(label.format(rate=rate))}</h3>'
            f"<p>{hint}</p>{bars}</div>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><style>"
        "body{font-family:sans-serif;margin:16px;background:#fff;width:960px}"
        ".panel{display:inline-block;vertical-align:top;width:460px;margin:0 8px 14px 0}"
        "h3{font-size:14px;margin:0 0 2px} p{font-size:11px;color:#666;margin:0 0 4px}"
        ".row{display:flex;align-items:center;height:22px;font-size:12px}"
        ".name{width:70px}.bar{height:16px;display:inline-block;margin-right:6px}"
        "</style></head><body><h2>cascade-gateway vs Temporal vs DBOS — same cascade, same "
        f"sandbox, one run</h2>{''.join(panels)}</body></html>"
    )


def draw(results: list[Result], path: Path) -> str:
    browser = find_browser()
    if browser is None:
        return "no chromium: the chart was not drawn"
    with tempfile.TemporaryDirectory(prefix="cascade-peers-chart-") as folder:
        page = Path(folder) / "chart.html"
        page.write_text(chart_html(results), encoding="utf-8")
        rows = (7 + 1) // 2
        command = [
            browser,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={folder}/profile",
            f"--window-size=1000,{90 + rows * 140}",
            f"--screenshot={path.resolve()}",
            page.as_uri(),
        ]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # our own page, no script
        subprocess.run(command, capture_output=True, timeout=120, check=False)
    return f"chart: {path.name}" if path.is_file() else "chromium did not draw the chart"


def write(report: Report, results: list[Result], loads: list[str], doc: Path, chart: Path) -> None:
    drawn = draw(results, chart)
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
    text = [
        "# Performance: ours against Temporal and DBOS",
        "",
        "Generated by `python -m bench peers` (`make bench-peers`); see",
        "`bench/peers/README.md` for how each peer is built and made fair. The same withdrawal",
        "cascade runs on each system in turn against one sandbox process (cascade-core",
        "simulator and sandbox providers) over HTTP,",
        "with the same load generator and the same number of withdrawals. CPU and memory (PSS)",
        "count the",
        "system's own processes, its database and its broker; the sandbox and the load client are",
        "excluded.",
        "",
        f"Run of {when}; {settings or 'default sizes'}.",
        "**Machine:** a shared 2-core machine where other engineers work at the same time — the",
        "figures are noisy; read the ratios of one run, not the absolute numbers.",
        "Load average (1 / 5 / 15 min) at the start and after each system:",
        "",
        *(f"- {n}" for n in loads),
        "",
        *table(results),
        "",
        f"![bar chart of the figures](performance.png) ({drawn})",
        "",
        "Per system:",
        "",
        *(f"- {n}" for n in notes),
        "",
        PROFILE_MARK,
    ]
    doc.write_text("\n".join(text) + kept.rstrip("\n") + "\n" if kept else "\n".join(text) + "\n")
