"""The exchange replayer: sends recorded requests over real HTTP and checks the answers.

Implements the comparison rules of ``docs/legacy-api/README.md``: status, the listed headers
(names case-insensitive, ``null`` = must be absent), and the body byte for byte except for
placeholders, each standing for one JSON string's inner text (or a whole value for
``{{ref}}`` and ``{{code}}``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

FAILURE_CODES = "declined|provider_error|timeout|manual_rejected|cancelled"
PLACEHOLDERS = {
    "ts": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",
    "hex32": r"[0-9a-f]{32}",
    "status": r"(?:processing|succeeded|failed|cancelled)",
    "any": r'[^"\\]*',
    "ref": r'(?:null|"[^"\\]*")',
    "code": rf'(?:null|"(?:{FAILURE_CODES})")',
}
# The transport rule every response obeys, whatever the recording lists.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_FRESH_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_TOKEN = re.compile(r"\{\{(ts|rid|hex32|status|any|ref|code)\}\}")


@dataclass(frozen=True)
class Step:
    method: str
    path: str
    headers: dict[str, str]
    body: str | None
    status: int
    expected_headers: dict[str, str | None]
    template: str


@dataclass(frozen=True)
class Exchange:
    name: str
    about: str
    steps: tuple[Step, ...]


def load_exchange(path: Path) -> Exchange:
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    steps = tuple(
        Step(
            method=s["request"]["method"],
            path=s["request"]["path"],
            headers=dict(s["request"]["headers"]),
            body=s["request"]["body"],
            status=s["response"]["status"],
            expected_headers=dict(s["response"]["headers"]),
            template=s["response"]["body"],
        )
        for s in raw["steps"]
    )
    return Exchange(name=raw["name"], about=raw["about"], steps=steps)


def template_regex(template: str, request_id: str) -> re.Pattern[str]:
    """The body template as a full-match regex; ``{{rid}}`` is the response's own id."""
    parts: list[str] = []
    last = 0
    for match in _TOKEN.finditer(template):
        parts.append(re.escape(template[last : match.start()]))
        name = match.group(1)
        parts.append(re.escape(request_id) if name == "rid" else PLACEHOLDERS[name])
        last = match.end()
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts), re.DOTALL)


def normalise(body: str, template: str, request_id: str) -> str:
    """``body`` with every placeholder's text replaced by the placeholder (for comparisons)."""
    groups: list[str] = []
    parts: list[str] = []
    last = 0
    for match in _TOKEN.finditer(template):
        parts.append(re.escape(template[last : match.start()]))
        name = match.group(1)
        pattern = re.escape(request_id) if name == "rid" else PLACEHOLDERS[name]
        parts.append(f"({pattern})")
        groups.append(match.group(0))
        last = match.end()
    parts.append(re.escape(template[last:]))
    found = re.fullmatch("".join(parts), body, re.DOTALL)
    if found is None:
        return body
    out = body
    for index in range(len(groups), 0, -1):
        out = out[: found.start(index)] + groups[index - 1] + out[found.end(index) :]
    return out


@dataclass(frozen=True)
class Outcome:
    step: Step
    response: httpx.Response

    @property
    def body(self) -> str:
        return self.response.content.decode("utf-8")

    def problems(self) -> list[str]:
        """Every way the response differs from the recording (empty when it matches)."""
        found: list[str] = []
        response = self.response
        if response.status_code != self.step.status:
            found.append(f"status {response.status_code}, expected {self.step.status}")
        for name, expected in self.step.expected_headers.items():
            actual = response.headers.get(name)
            if expected is None and actual is not None:
                found.append(f"header {name} must be absent, got {actual!r}")
            elif expected is not None and actual != expected:
                found.append(f"header {name} is {actual!r}, expected {expected!r}")
        request_id = response.headers.get("x-request-id", "")
        sent = next((v for k, v in self.step.headers.items() if k.lower() == "x-request-id"), None)
        if sent is not None and _VALID_REQUEST_ID.fullmatch(sent):
            if request_id != sent:
                found.append(f"X-Request-Id {request_id!r}, expected the request's {sent!r}")
        elif not _FRESH_REQUEST_ID.fullmatch(request_id):
            found.append(f"X-Request-Id {request_id!r} is not a fresh 32-character lowercase hex")
        if not template_regex(self.step.template, request_id).fullmatch(self.body):
            found.append(f"body {self.body!r} does not match {self.step.template!r}")
        return found


async def replay(client: httpx.AsyncClient, exchange: Exchange) -> list[Outcome]:
    """Send every step in order; the bodies go out exactly as recorded (no re-encoding)."""
    outcomes = []
    for step in exchange.steps:
        content = None if step.body is None else step.body.encode("utf-8")
        response = await client.request(
            step.method, step.path, headers=step.headers, content=content
        )
        outcomes.append(Outcome(step=step, response=response))
    return outcomes
