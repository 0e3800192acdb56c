"""``cascade-gateway report --html FILE``: the cohort comparison as one self-contained page
(and ``--png FILE``: that page as a picture, drawn by headless chromium).

The charts are inline SVG drawn here from the report's own numbers (no script, no stylesheet or
font from elsewhere: the file opens offline and can be mailed as it is). Bars are horizontal,
on a linear axis that starts at 0, so their lengths compare; an interval is a whisker over its
bar. Each bar carries its number as ``data-value`` and as text beside it, in the units of the
terminal table (rates in %, differences in pp, times in ms/s/min/h).

The page is built as an :mod:`xml.etree.ElementTree` tree, so every name from the record
(merchant ids) is escaped by the serializer, not by hand.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, SubElement, tostring

from gateway.report import (
    COHORTS,
    TABLE_MERCHANTS,
    describe_window,
    format_points,
    format_rate,
    format_seconds,
)

LABEL_WIDTH = 220  # the labels' column, left of the bars
PLOT_WIDTH = 420  # the axis: a bar of the scale's full value is this long
TEXT_WIDTH = 300  # the values' column, right of the bars
ROW = 30
BAR = 18
TOP = 8
AXIS = 28
WIDTH = LABEL_WIDTH + PLOT_WIDTH + TEXT_WIDTH
PERCENTILES = ("p50", "p95", "p99")
# --png: the browsers that can draw the page, the window's width, how long one may take.
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PAGE_WIDTH = 1000
PNG_TIMEOUT = 120
NO_BROWSER = "--png needs chromium to draw the page (Debian: apt-get install chromium)"
CHARACTERS_PER_LINE = 110  # about 130 fit in the page's 932 px at 14 px: lines over-counted
# Rendered line height and vertical margins (px) of the page's text, from _STYLE's fonts.
_TEXT_BOXES = {"h1": (31, 19), "h2": (23, 31), "p": (20, 6)}

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1a202c; margin: 2em auto; max-width: 960px;
       padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.1em; margin: 1.6em 0 .4em; }
.source, .note { color: #4a5568; margin: .2em 0; }
.legend span { display: inline-block; margin-right: 1.5em; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: .4em;
          vertical-align: -1px; }
svg text { font: 12px system-ui, sans-serif; fill: #1a202c; }
svg .track { fill: #f4f5f7; }
svg .legacy { fill: #8a94a6; }
svg .cascade { fill: #2b6cb0; }
svg .whisker { stroke: #1a202c; stroke-width: 1.5; }
svg .tick { stroke: #cbd2d9; }
svg .zero { stroke: #1a202c; }
table { border-collapse: collapse; }
th, td { padding: .2em .8em; text-align: right; border-bottom: 1px solid #e2e8f0; }
th:first-child, td:first-child { text-align: left; }
"""


@dataclass(frozen=True)
class Bar:
    """One row of a bar chart: ``value`` on the chart's axis (None: nothing to draw)."""

    label: str
    cohort: str
    value: float | None
    text: str
    interval: tuple[float, float] | None = None


def render_page(report: dict[str, Any], *, database: str | None = None) -> str:
    """The report (as :func:`gateway.report.cohort_report` returns it) as an HTML document."""
    return _document(_page(report, database))


def write_png(report: dict[str, Any], path: Path, *, database: str | None = None) -> str | None:
    """The page as a PNG picture, drawn by headless chromium; why not, in one line."""
    browser = find_browser()
    if browser is None:
        return NO_BROWSER
    html = _page(report, database)
    with tempfile.TemporaryDirectory(prefix="cascade-report-") as folder:
        source = Path(folder) / "cohorts.html"
        source.write_text(_document(html), encoding="utf-8")
        path.unlink(missing_ok=True)  # so that a picture there afterwards is this one
        command = [
            browser,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={folder}/profile",
            f"--window-size={PAGE_WIDTH},{_height(html)}",
            f"--screenshot={path.resolve()}",
            source.as_uri(),
        ]
        if os.geteuid() == 0:
            # Chromium refuses to start as root with its sandbox; the page is ours, no script.
            command.insert(1, "--no-sandbox")
        try:
            drawn = subprocess.run(  # noqa: S603 — a browser found on PATH, fixed arguments
                command, capture_output=True, text=True, timeout=PNG_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            return f"chromium did not draw --png {path} within {PNG_TIMEOUT} s"
    if drawn.returncode != 0 or not path.is_file():
        last = (drawn.stderr.strip().splitlines() or ["no message"])[-1]
        return f"chromium could not draw --png {path}: {last}"
    return None


def find_browser() -> str | None:
    """The chromium that draws ``--png``, from PATH."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def _document(html: Element) -> str:
    return "<!DOCTYPE html>\n" + tostring(html, encoding="unicode", method="html") + "\n"


def _height(html: Element) -> int:
    """An upper bound of the page's height at :data:`PAGE_WIDTH` pixels: chromium's screenshot
    is of the window, so the window must hold the page (blank below it is harmless)."""
    body = html.find("body")
    assert body is not None
    height = 120  # the body's margins (2 × 28 px), and room to spare
    for element in body:
        if element.tag == "svg":
            height += int(float(element.get("height", "0"))) + 6
        elif element.tag == "table":
            height += 28 * len(element.findall(".//tr")) + 10
        else:  # a heading or a paragraph: its lines (over-counted), and its margins
            text = "".join(element.itertext())
            lines = max(1, math.ceil(len(text) / CHARACTERS_PER_LINE))
            line, margins = _TEXT_BOXES.get(element.tag, (20, 6))
            extra = 28 if element.get("class") == "legend" else 0
            height += line * lines + margins + extra
    return height


def _page(report: dict[str, Any], database: str | None) -> Element:
    html = Element("html", lang="en")
    head = SubElement(html, "head")
    SubElement(head, "meta", charset="utf-8")
    _text(head, "title", "Cohort comparison: legacy vs cascade")
    _text(head, "style", _STYLE)
    body = SubElement(html, "body")
    _text(body, "h1", "Cohort comparison: legacy vs cascade")
    if database is not None:
        _text(body, "p", f"Database: {database}", cls="source", id="database")
    _text(body, "p", f"Window: {describe_window(report['window'])}", cls="source", id="window")
    _text(body, "p", f"Generated {report['generated_at']}", cls="source")
    _legend(body)
    _verdict(body, report["comparison"])
    cohorts = report["cohorts"]
    _section(body, "success-rate", "Success rate of finished withdrawals (95 % interval)")
    body.append(_rate_chart(_cohort_rate_bars(cohorts), "success rate"))
    _section(body, "attempts", "Provider attempts per finished withdrawal")
    body.append(_attempts_chart(cohorts))
    _section(body, "time-to-final", "Time to final, from creation (p50, p95, p99)")
    body.append(_time_chart(cohorts))
    _merchants(body, report["merchants"])
    _counts_table(body, cohorts)
    return html


def _text(parent: Element, tag: str, text: str, *, cls: str = "", **attributes: str) -> Element:
    element = SubElement(parent, tag, attributes)
    if cls:
        element.set("class", cls)
    element.text = text
    return element


def _section(body: Element, section_id: str, title: str) -> None:
    _text(body, "h2", title, id=section_id)


def _legend(body: Element) -> None:
    legend = SubElement(body, "p", {"class": "legend"})
    for cohort in COHORTS:
        item = SubElement(legend, "span")
        swatch = SubElement(item, "svg", {"class": "swatch", "viewBox": "0 0 12 12"})
        SubElement(swatch, "rect", {"class": cohort, "width": "12", "height": "12"})
        swatch.tail = cohort


def _verdict(body: Element, comparison: dict[str, Any]) -> None:
    _section(body, "verdict", f"Verdict: {comparison['verdict']}")
    _text(body, "p", comparison["verdict_note"], cls="note")
    _text(body, "p", f"Design: {comparison['design']} — {comparison['design_note']}", cls="note")
    if comparison["difference"] is None:
        return
    low, high = comparison["difference_ci95"]
    _text(
        body,
        "p",
        f"Difference cascade − legacy: {format_points(comparison['difference'])}, 95 % CI "
        f"{format_points(low)} to {format_points(high)} (Newcombe)",
        cls="note",
        id="difference",
    )
    body.append(_difference_chart(comparison["difference"], (low, high)))


def _cohort_rate_bars(cohorts: dict[str, Any]) -> list[Bar]:
    bars = []
    for name in COHORTS:
        c = cohorts[name]
        interval = c["success_rate_ci95"]
        text = f"{format_rate(c['success_rate'])} of {c['finished']} finished"
        if interval:
            text += f" (CI {format_rate(interval[0])}–{format_rate(interval[1])})"
        if c.get("returned"):
            text += (
                f"; {c['returned']} returned since,"
                f" {format_rate(c['net_success_rate'])} net of returns"
            )
        bars.append(
            Bar(
                name,
                name,
                c["success_rate"],
                text,
                (interval[0], interval[1]) if interval else None,
            )
        )
    return bars


def _rate_chart(bars: Sequence[Bar], name: str) -> Element:
    ticks = [(share, f"{share:.0%}") for share in (0, 0.25, 0.5, 0.75, 1)]
    return _bar_chart(bars, scale=1.0, ticks=ticks, name=name)


def _attempts_chart(cohorts: dict[str, Any]) -> Element:
    values = [cohorts[c]["attempts_per_withdrawal"] for c in COHORTS]
    scale = _nice_ceiling(max((v for v in values if v is not None), default=1.0))
    bars = [
        Bar(name, name, value, "n/a" if value is None else f"{value:.2f} attempts")
        for name, value in zip(COHORTS, values, strict=True)
    ]
    return _bar_chart(bars, scale=scale, ticks=_ticks(scale, lambda v: f"{v:g}"), name="attempts")


def _time_chart(cohorts: dict[str, Any]) -> Element:
    bars = [
        Bar(
            f"{name} {quantile}",
            name,
            cohorts[name]["time_to_final_seconds"].get(quantile),
            format_seconds(cohorts[name]["time_to_final_seconds"].get(quantile)),
        )
        for name in COHORTS
        for quantile in PERCENTILES
    ]
    longest = max((b.value for b in bars if b.value is not None), default=1.0)
    unit = _time_unit(longest)
    scale = _nice_ceiling(longest / unit) * unit
    ticks = _ticks(scale, format_seconds, unit)
    return _bar_chart(bars, scale=scale, ticks=ticks, name="time to final")


def _merchants(body: Element, merchants: list[dict[str, Any]]) -> None:
    shown = merchants[:TABLE_MERCHANTS]
    _section(
        body, "merchants", f"Success rate per merchant (top {len(shown)} by volume, 95 % interval)"
    )
    if len(merchants) > len(shown):
        _text(body, "p", f"{len(merchants) - len(shown)} more in --json", cls="note")
    bars = []
    for m in shown:
        interval = m["success_rate_ci95"]
        bars.append(
            Bar(
                f"{m['merchant_id']} ({m['cohort']})",
                m["cohort"],
                m["success_rate"],
                f"{format_rate(m['success_rate'])} of {m['finished']} finished",
                (interval[0], interval[1]) if interval else None,
            )
        )
    body.append(_rate_chart(bars, "merchant success rate"))


def _bar_chart(
    bars: Sequence[Bar], *, scale: float, ticks: Sequence[tuple[float, str]], name: str
) -> Element:
    """Horizontal bars on one linear axis from 0 to ``scale``, with their whiskers."""
    height = TOP + ROW * len(bars) + AXIS
    svg = _svg(height, name)
    for i, bar in enumerate(bars):
        y = TOP + ROW * i
        _label(svg, LABEL_WIDTH - 8, y + BAR / 2, bar.label, anchor="end", cls="label")
        SubElement(svg, "rect", _box(LABEL_WIDTH, y, PLOT_WIDTH, BAR, "track"))
        _label(svg, LABEL_WIDTH + PLOT_WIDTH + 8, y + BAR / 2, bar.text, cls="value")
        if bar.value is None:
            continue
        rect = SubElement(svg, "rect", _box(LABEL_WIDTH, y, _x(bar.value, scale), BAR, "bar"))
        rect.set("class", f"bar {bar.cohort}")
        rect.set("data-cohort", bar.cohort)
        rect.set("data-value", repr(float(bar.value)))
        _text(rect, "title", f"{bar.label}: {bar.text}")
        if bar.interval is not None:
            _whisker(svg, y + BAR / 2, bar.interval, scale)
    _axis(svg, TOP + ROW * len(bars), ticks, scale)
    return svg


def _difference_chart(difference: float, interval: tuple[float, float]) -> Element:
    """The difference and its interval on an axis centred on 0 (no difference)."""
    reach = _nice_ceiling(max(abs(interval[0]), abs(interval[1]), abs(difference), 0.01))
    svg = _svg(TOP + ROW + AXIS, "difference")
    centre = LABEL_WIDTH + PLOT_WIDTH / 2

    def at(value: float) -> float:
        return centre + value / reach * PLOT_WIDTH / 2

    y = TOP + BAR / 2
    _label(svg, LABEL_WIDTH - 8, y, "cascade − legacy", anchor="end")
    SubElement(svg, "rect", _box(LABEL_WIDTH, TOP, PLOT_WIDTH, BAR, "track"))
    SubElement(svg, "line", _line(centre, TOP - 4, centre, TOP + BAR + 4, "zero"))
    SubElement(svg, "line", _line(at(interval[0]), y, at(interval[1]), y, "whisker"))
    point = SubElement(svg, "circle", {"cx": _n(at(difference)), "cy": _n(y), "r": "5"})
    point.set("class", "difference")
    point.set("data-value", repr(float(difference)))
    _label(svg, LABEL_WIDTH + PLOT_WIDTH + 8, y, format_points(difference), cls="value")
    for value in (-reach, -reach / 2, 0.0, reach / 2, reach):
        text = format_points(value) if value else "0 pp"
        _label(svg, at(value), TOP + ROW + 12, text, anchor="middle", cls="tick")
    return svg


def _svg(height: float, name: str) -> Element:
    svg = Element("svg", width=str(WIDTH), height=_n(height), viewBox=f"0 0 {WIDTH} {_n(height)}")
    svg.set("role", "img")
    svg.set("aria-label", name)
    svg.set("class", "chart")
    svg.set("data-chart", name)
    return svg


def _whisker(svg: Element, y: float, interval: tuple[float, float], scale: float) -> None:
    low, high = (LABEL_WIDTH + _x(v, scale) for v in interval)
    whisker = SubElement(svg, "g", {"class": "interval"})
    whisker.set("data-low", repr(float(interval[0])))
    whisker.set("data-high", repr(float(interval[1])))
    SubElement(whisker, "line", _line(low, y, high, y, "whisker"))
    for x in (low, high):
        SubElement(whisker, "line", _line(x, y - 5, x, y + 5, "whisker"))


def _axis(svg: Element, y: float, ticks: Sequence[tuple[float, str]], scale: float) -> None:
    for value, text in ticks:
        x = LABEL_WIDTH + _x(value, scale)
        SubElement(svg, "line", _line(x, TOP, x, y, "tick"))
        _label(svg, x, y + 14, text, anchor="middle", cls="tick")


def _label(
    svg: Element, x: float, y: float, text: str, *, anchor: str = "start", cls: str = ""
) -> None:
    label = _text(svg, "text", text, cls=cls, x=_n(x), y=_n(y))
    label.set("dominant-baseline", "middle")
    label.set("text-anchor", anchor)


def _x(value: float, scale: float) -> float:
    return max(0.0, min(value, scale)) / scale * PLOT_WIDTH


def _box(x: float, y: float, width: float, height: float, cls: str) -> dict[str, str]:
    return {"x": _n(x), "y": _n(y), "width": _n(width), "height": _n(height), "class": cls}


def _line(x1: float, y1: float, x2: float, y2: float, cls: str) -> dict[str, str]:
    return {"x1": _n(x1), "y1": _n(y1), "x2": _n(x2), "y2": _n(y2), "class": cls}


def _n(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10ᵏ at least ``value``: an axis end a reader can divide."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1.0, 2.0, 2.5, 5.0, 10.0) if step * power >= value)


def _ticks(
    scale: float, text: Callable[[float], str], unit: float = 1.0
) -> list[tuple[float, str]]:
    """Round ticks from 0 to ``scale``, a :func:`_nice_ceiling` counted in ``unit``: quarters
    of 1 and 2 × 10ᵏ, fifths of 2.5, 5 and 10 × 10ᵏ."""
    leading = scale / unit / 10.0 ** math.floor(math.log10(scale / unit))
    count = 4 if round(leading, 6) in (1.0, 2.0) else 5
    return [(0.0, "0")] + [
        (scale * i / count, text(scale * i / count)) for i in range(1, count + 1)
    ]


def _time_unit(seconds: float) -> float:
    """The unit (in seconds) :func:`gateway.report.format_seconds` shows ``seconds`` in above
    a second: an axis of times is divided in that unit, so its ticks read round."""
    if seconds < 59.95:
        return 1.0
    return 60.0 if seconds < 59.95 * 60 else 3600.0


def _counts_table(body: Element, cohorts: dict[str, Any]) -> None:
    _section(body, "counts", "Counts")
    table = SubElement(body, "table")
    columns = ("created", "succeeded", "failed", "cancelled", "processing", "manual_checked")
    header = SubElement(SubElement(table, "thead"), "tr")
    for title in ("cohort", *columns):
        _text(header, "th", title.replace("_", " "))
    rows = SubElement(table, "tbody")
    for name in COHORTS:
        row = SubElement(rows, "tr")
        _text(row, "td", name)
        for column in columns:
            _text(row, "td", str(cohorts[name][column]))
