"""``GET /ops/cohorts``: the cohort comparison of ``cascade-gateway report --json`` (ops token).

Query parameters ``since`` and ``until`` (on ``created_at``: an ISO date/time with a zone, or
a date alone for midnight UTC; parsed by :func:`gateway.report._parse_time`, as the CLI's
options) and ``merchant``.
"""

from __future__ import annotations

import msgspec
from litestar import Response, get

from gateway.api import runtime_of
from gateway.ops import AnyRequest, _denied, _error
from gateway.protocol import json_response
from gateway.report import ReportError, cohort_report


@get("/ops/cohorts")
async def cohorts(request: AnyRequest) -> Response[bytes]:
    denied = _denied(request)
    if denied:
        return denied
    params = request.query_params
    try:
        async with runtime_of(request).pool.acquire() as conn:
            report = await cohort_report(
                conn,
                since=params.get("since"),
                until=params.get("until"),
                merchant=params.get("merchant"),
            )
    except ReportError as exc:
        return _error(400, "invalid_parameter", str(exc))
    return json_response(msgspec.json.encode(report))
