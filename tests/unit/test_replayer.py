"""The replayer's placeholder rules, so a lenient matcher cannot hide a contract break."""

from __future__ import annotations

import httpx
import pytest

from tests.contract.replay import Outcome, Step, normalise, template_regex

TEMPLATE = '{"a":"{{ts}}","b":{{ref}},"c":{{code}},"d":"{{status}}","e":"{{rid}}"}'


def test_template_accepts_what_the_contract_allows() -> None:
    body = '{"a":"2026-01-02T03:04:05.678Z","b":null,"c":"declined","d":"failed","e":"r-1"}'
    assert template_regex(TEMPLATE, "r-1").fullmatch(body)


def test_template_rejects_near_misses() -> None:
    near_misses = [
        '{"a":"2026-01-02T03:04:05Z","b":null,"c":null,"d":"failed","e":"r-1"}',
        '{"a":"2026-01-02T03:04:05.678Z","b":null,"c":"oops","d":"failed","e":"r-1"}',
        '{"a":"2026-01-02T03:04:05.678Z","b":null,"c":null,"d":"manual","e":"r-1"}',
        '{"a":"2026-01-02T03:04:05.678Z","b":null,"c":null,"d":"failed","e":"r-2"}',
        '{"a":"2026-01-02T03:04:05.678Z", "b":null,"c":null,"d":"failed","e":"r-1"}',
        '{"a":"2026-01-02T03:04:05.678Z","b":7,"c":null,"d":"failed","e":"r-1"}',
    ]
    pattern = template_regex(TEMPLATE, "r-1")
    assert not [b for b in near_misses if pattern.fullmatch(b)]


def test_normalise_replaces_placeholder_text_only() -> None:
    body = '{"a":"2026-01-02T03:04:05.678Z","b":"ref-9","c":null,"d":"processing","e":"r-1"}'
    assert normalise(body, TEMPLATE, "r-1") == TEMPLATE


def _outcome(sent: str | None, answered: str) -> Outcome:
    step = Step(
        method="GET",
        path="/v1/withdrawals/x",
        headers={} if sent is None else {"X-Request-Id": sent},
        body=None,
        status=404,
        expected_headers={},
        template='{"id":"{{rid}}"}',
    )
    response = httpx.Response(
        404, headers={"X-Request-Id": answered}, content=f'{{"id":"{answered}"}}'.encode()
    )
    return Outcome(step=step, response=response)


@pytest.mark.parametrize(
    ("sent", "answered", "ok"),
    [
        ("abc-123.XYZ_9", "abc-123.XYZ_9", True),
        ("abc-123.XYZ_9", "0123456789abcdef0123456789abcdef", False),  # a valid id is echoed
        ("bad id!", "0123456789abcdef0123456789abcdef", True),
        ("bad id!", "bad id!", False),  # an invalid one is replaced...
        (None, "0123456789ABCDEF0123456789ABCDEF", False),  # ...by 32 lowercase hex
        (None, "0123456789abcdef", False),
    ],
)
def test_request_id_rule_is_checked_on_every_step(
    sent: str | None, answered: str, ok: bool
) -> None:
    problems = _outcome(sent, answered).problems()
    assert (problems == []) is ok, problems
