"""The JSON log formatter: ids from ``extra`` kept, uvicorn's terminal colours dropped."""

from __future__ import annotations

import logging

import msgspec

from gateway.logs import JsonFormatter


def _format(extra: dict[str, object]) -> dict[str, object]:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s", ("hi",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    line: dict[str, object] = msgspec.json.decode(JsonFormatter().format(record))
    return line


def test_uvicorn_color_message_is_dropped() -> None:
    # What uvicorn passes: extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"}
    line = _format({"color_message": "Started \x1b[36m%s\x1b[0m", "withdrawal_id": "wd_1"})
    assert "color_message" not in line
    assert line["msg"] == "hi"
    assert line["withdrawal_id"] == "wd_1"
