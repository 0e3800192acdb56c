"""``cascade-gateway report``: the command around the report (:mod:`gateway.report`) and its
page (:mod:`gateway.report_page`): checks the output paths, reads, prints and draws."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from gateway.report import ReportError, cohort_report, render_table
from gateway.report_page import NO_BROWSER, find_browser, render_page, write_png
from gateway.settings import Settings
from gateway.stackfile import redact_dsn


def unwritable(option: str, path: Path) -> str | None:
    """Why ``path`` cannot take the page (``--html``) or its picture (``--png``), in one line;
    None when it can."""
    if path.is_dir():
        return f"{option} {path} is a folder, not a file"
    folder = path.parent
    if not folder.is_dir():
        return f"{option} {path}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"{option} {path}: the folder {folder} is not writable"
    return None


async def run_report(
    settings: Settings,
    *,
    as_json: bool,
    since: str | None,
    until: str | None,
    merchant: str | None,
    html: Path | None = None,
    png: Path | None = None,
) -> int:
    """``cascade-gateway report``: the table (or JSON) on stdout, the page to ``html``, its
    picture to ``png``."""
    for option, path in (("--html", html), ("--png", png)):
        problem = None if path is None else unwritable(option, path)
        if problem is not None:
            return _refuse(problem)
    if png is not None and find_browser() is None:
        return _refuse(NO_BROWSER)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        report = await cohort_report(conn, since=since, until=until, merchant=merchant)
    except ReportError as exc:
        return _refuse(str(exc))
    finally:
        await conn.close()
    database = redact_dsn(settings.asyncpg_dsn)
    if as_json:
        print(msgspec.json.encode(report).decode())  # noqa: T201
    else:
        print(render_table(report, database=database))  # noqa: T201
    return _write_pictures(report, database=database, html=html, png=png)


def _write_pictures(
    report: dict[str, Any], *, database: str, html: Path | None, png: Path | None
) -> int:
    if html is not None:
        try:
            html.write_text(render_page(report, database=database), encoding="utf-8")
        except OSError as exc:
            return _refuse(f"cannot write --html {html}: {exc.strerror or exc}")
        print(f"cascade-gateway: wrote the cohort comparison to {html}", file=sys.stderr)  # noqa: T201
    if png is not None:
        problem = write_png(report, png, database=database)
        if problem is not None:
            return _refuse(problem)
        print(f"cascade-gateway: drew the cohort comparison to {png}", file=sys.stderr)  # noqa: T201
    return 0


def _refuse(message: str) -> int:
    print(f"cascade-gateway: {message}", file=sys.stderr)  # noqa: T201
    return 2
