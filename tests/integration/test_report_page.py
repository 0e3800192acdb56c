"""``cascade-gateway report``'s table and ``--html`` page, on withdrawals in both cohorts.

The page is opened from its file in Debian's headless chromium (driven by playwright, no
browser download; ``make tools`` installs chromium) and measured as rendered: each bar's length
against its axis must be the report's number, each interval's ends the report's bounds.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright

from gateway.report import cohort_report
from gateway.report_command import run_report
from tests.conftest import Stack, StackFactory, flags_document, new_id, withdrawal_body

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]


async def _create(stack: Stack, merchant: str, providers: list[str]) -> str:
    wid = new_id()
    response = await stack.client.post(
        "/v1/withdrawals",
        headers=stack.headers,
        json=withdrawal_body(wid, providers, merchant=merchant),
    )
    assert response.status_code == 201, response.text
    return wid


async def _both_cohorts(make_stack: StackFactory) -> tuple[Stack, str, str]:
    """A stack whose record holds 3 cascade withdrawals (all paid, after 2, 3 and 1 provider
    attempts) and 3 legacy ones (one paid, two declined); returns the two merchants."""
    listed, other = new_id("m"), new_id("m")
    stack = await make_stack(flags=flags_document(enabled=True, merchants=[listed]))
    created = [
        await _create(stack, listed, ["sbx_decline", "sbx_ok"]),
        await _create(stack, listed, ["sbx_decline", "sbx_no_funds", "sbx_ok"]),
        await _create(stack, listed, ["sbx_ok"]),
        await _create(stack, other, ["sbx_sync_ok"]),
        await _create(stack, other, ["sbx_decline", "sbx_ok"]),
        await _create(stack, other, ["sbx_decline"]),
    ]
    for wid in created:
        await stack.wait_final(wid)
    return stack, listed, other


def _need_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: `make tools` installs Debian's chromium where it runs as "
            "root with apt-get; elsewhere install it to run this test"
        )


@asynccontextmanager
async def _browser_page(
    path: Path, viewport: tuple[int, int] = (1000, 900)
) -> AsyncIterator[tuple[Page, list[str]]]:
    """``path`` opened in headless chromium; also every URL the page requested."""
    _need_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = await browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(path.as_uri())
            yield page, requested
        finally:
            await browser.close()


_MEASURE = """(chart) => {
    const svg = document.querySelector(`svg[data-chart="${chart}"]`);
    const track = svg.querySelector("rect.track").getBoundingClientRect();
    const box = (element) => {
        const b = element.getBoundingClientRect();
        return {left: b.left - track.left, width: b.width};
    };
    return {
        track: track.width,
        bars: [...svg.querySelectorAll("rect.bar")].map((bar) => ({
            cohort: bar.dataset.cohort, ...box(bar),
            interval: bar.nextElementSibling && bar.nextElementSibling.matches("g.interval")
                ? box(bar.nextElementSibling.querySelector("line")) : null,
        })),
        values: [...svg.querySelectorAll("text.value")].map((t) => t.textContent),
        labels: [...svg.querySelectorAll("text.label")].map((t) => t.textContent),
    };
}"""


async def _measure(page: Page, chart: str) -> dict[str, Any]:
    measured: dict[str, Any] = await page.evaluate(_MEASURE, chart)
    return measured


def _assert_drawn_to_scale(measured: dict[str, Any], values: list[float], scale: float) -> None:
    assert [round(b["width"] / measured["track"] * scale, 3) for b in measured["bars"]] == [
        pytest.approx(v, abs=0.005 * scale) for v in values
    ]


async def test_the_html_page_draws_the_reports_numbers_in_a_browser(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _need_chromium()
    stack, listed, other = await _both_cohorts(make_stack)
    page_file = tmp_path / "cohorts.html"
    code = await run_report(
        stack.settings, as_json=True, since=None, until=None, merchant=None, html=page_file
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"wrote the cohort comparison to {page_file}" in printed.err
    report = json.loads(printed.out)
    cohorts = report["cohorts"]
    assert (cohorts["cascade"]["success_rate"], cohorts["legacy"]["success_rate"]) == (1.0, 1 / 3)
    assert cohorts["cascade"]["attempts_per_withdrawal"] == pytest.approx(6 / 3)

    async with _browser_page(page_file) as (page, requested):
        # Self-contained: the browser fetched the file and nothing else.
        assert requested == [page_file.as_uri()]
        assert "Cohort comparison" in await page.title()
        window = await page.text_content("#window")
        assert window is not None
        assert "all withdrawals" in window

        rates = await _measure(page, "success rate")
        assert [b["cohort"] for b in rates["bars"]] == ["legacy", "cascade"]
        _assert_drawn_to_scale(rates, [1 / 3, 1.0], scale=1.0)
        for bar, name in zip(rates["bars"], ("legacy", "cascade"), strict=True):
            low, high = cohorts[name]["success_rate_ci95"]
            assert bar["interval"]["left"] / rates["track"] == pytest.approx(low, abs=0.005)
            right = bar["interval"]["left"] + bar["interval"]["width"]
            assert right / rates["track"] == pytest.approx(high, abs=0.005)
        assert rates["values"][0].startswith("33.3% of 3 finished")
        assert rates["values"][1].startswith("100.0% of 3 finished")

        attempts = await _measure(page, "attempts")
        legacy_bar, cascade_bar = (b["width"] for b in attempts["bars"])
        assert cascade_bar / legacy_bar == pytest.approx(
            cohorts["cascade"]["attempts_per_withdrawal"]
            / cohorts["legacy"]["attempts_per_withdrawal"],
            rel=0.01,
        )

        times = await _measure(page, "time to final")
        quantiles = [
            cohorts[c]["time_to_final_seconds"][q]
            for c in ("legacy", "cascade")
            for q in ("p50", "p95", "p99")
        ]
        widths = [b["width"] for b in times["bars"]]
        longest = max(range(6), key=lambda i: quantiles[i])
        for width, quantile in zip(widths, quantiles, strict=True):
            assert width / widths[longest] == pytest.approx(quantile / quantiles[longest], abs=0.01)
        # Sandbox withdrawals finish within a second: shown in ms, never as "0.0s".
        assert any(text.endswith(" ms") for text in times["values"]), times["values"]

        merchants = await _measure(page, "merchant success rate")
        assert merchants["labels"] == [
            f"{m['merchant_id']} ({m['cohort']})" for m in report["merchants"]
        ]
        assert set(merchants["labels"]) == {f"{listed} (cascade)", f"{other} (legacy)"}
        _assert_drawn_to_scale(
            merchants, [m["success_rate"] for m in report["merchants"]], scale=1.0
        )

        difference = await page.text_content("#difference")
        assert difference is not None
        assert "+66.7 pp" in difference

        await page.screenshot(path=tmp_path / "cohorts.png", full_page=True)


async def test_the_table_names_its_database_and_window_and_keeps_its_units(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, _, _ = await _both_cohorts(make_stack)
    dsn = stack.settings.asyncpg_dsn.replace("://postgres@", "://postgres:s3cret@", 1)
    assert "s3cret" in dsn  # the test database trusts local users: the password goes unused
    settings = dataclasses.replace(stack.settings, database_url=dsn)

    code = await run_report(settings, as_json=False, since="2026-01-01", until=None, merchant=None)
    table = capsys.readouterr().out
    assert code == 0
    lines = table.splitlines()
    assert lines[1] == f"Database: {dsn.replace(':s3cret@', ':***@')}"
    assert "s3cret" not in table
    assert lines[2].startswith("Window:   created from 2026-01-01 00:00:00 UTC (inclusive);")
    assert "found withdrawals created" in lines[2]
    assert "Difference cascade − legacy: +66.7 pp, 95 % CI [" in table
    assert " points" not in table
    assert " ms / " in table  # sub-second times keep their precision
    assert "0.0s" not in table

    # JSON consumers keep their numbers: fractions of 1 and seconds; new fields only added.
    async with stack.runtime.pool.acquire() as conn:
        report = await cohort_report(conn, since="2026-01-01")
    cascade = report["cohorts"]["cascade"]
    assert isinstance(cascade["success_rate"], float)
    assert all(isinstance(v, float) for v in cascade["success_rate_ci95"])
    assert set(cascade["time_to_final_seconds"]) == {"p50", "p95", "p99"}
    assert 0 < cascade["time_to_final_seconds"]["p50"] < 10
    assert report["comparison"]["difference"] == pytest.approx(2 / 3)
    assert report["window"]["since"] == "2026-01-01T00:00:00+00:00"


_PIXELS = """async ([source, points]) => {
    const image = new Image();
    image.src = source;
    await image.decode();
    const canvas = document.createElement("canvas");
    canvas.width = image.width;
    canvas.height = image.height;
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    return {
        width: image.width,
        height: image.height,
        colors: points.map(
            ([x, y]) => Array.from(context.getImageData(x, y, 1, 1).data.slice(0, 3))
        ),
    };
}"""
_BARS = """() => [...document.querySelectorAll('svg[data-chart="success rate"] rect.bar')].map(
    (bar) => {
        const b = bar.getBoundingClientRect();
        const t = bar.parentNode.querySelector("rect.track").getBoundingClientRect();
        return {cohort: bar.dataset.cohort, left: b.left, top: b.top, width: b.width,
                track: t.width, page: document.body.getBoundingClientRect().bottom
                    + parseFloat(getComputedStyle(document.body).marginBottom)};
    })"""
CASCADE_BLUE, LEGACY_GREY, TRACK = (43, 108, 176), (138, 148, 166), (244, 245, 247)


async def test_the_png_is_the_page_as_chromium_draws_it(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _need_chromium()
    stack, _, _ = await _both_cohorts(make_stack)
    html, png = tmp_path / "cohorts.html", tmp_path / "cohorts.png"
    code = await run_report(
        stack.settings, as_json=False, since=None, until=None, merchant=None, html=html, png=png
    )
    assert code == 0, capsys.readouterr().err
    assert f"drew the cohort comparison to {png}" in capsys.readouterr().err
    picture = png.read_bytes()
    assert picture[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(picture[16:20], "big"), int.from_bytes(picture[20:24], "big")
    assert width == 1000

    async with _browser_page(html, viewport=(width, height)) as (page, _):
        bars = await page.evaluate(_BARS)
        page_height = bars[0]["page"]
        assert page_height <= height, "the picture cuts the page off"
        assert height - page_height < 300, "the picture is mostly blank below the page"
        legacy, cascade = bars
        # Inside each bar, above the whisker; then the track past the legacy bar's end (1/3).
        points = [
            (legacy["left"] + legacy["width"] * 0.5, legacy["top"] + 3),
            (cascade["left"] + cascade["width"] * 0.4, cascade["top"] + 3),
            (legacy["left"] + legacy["track"] * 0.62, legacy["top"] + 3),
        ]
        source = "data:image/png;base64," + base64.b64encode(picture).decode()
        drawn = await page.evaluate(_PIXELS, [source, [[round(x), round(y)] for x, y in points]])
    assert (drawn["width"], drawn["height"]) == (width, height)
    assert [tuple(color) for color in drawn["colors"]] == [LEGACY_GREY, CASCADE_BLUE, TRACK]


@pytest.mark.parametrize(
    ("option", "where", "path"),
    [
        ("--html", "missing-folder/cohorts.html", None),
        ("--html", ".", None),
        ("--png", "missing-folder/cohorts.png", None),
        ("--png", "cohorts.png", "/nonexistent"),  # no chromium on PATH: "--png needs chromium"
    ],
)
def test_an_unusable_path_is_one_line_and_exit_2(
    tmp_path: Path, option: str, where: str, path: str | None
) -> None:
    # Refused before any database is read: this DSN answers nothing.
    env = {**os.environ, "DATABASE_URL": "postgresql://u:p@127.0.0.1:1/none"}
    if path is not None:
        env["PATH"] = path
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "report", option, str(tmp_path / where)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cascade-gateway: {option} "), lines[0]


def test_report_help_names_the_units_and_the_page() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "report", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in (
        "--html FILE",
        "self-contained HTML page",
        "--png FILE",
        "percentage points (pp)",
        "times in ms below a second",
        "password hidden",
        "DATA_DIR/stack.json",
    ):
        assert words in text, words
