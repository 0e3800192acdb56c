"""The replayer's placeholder rules, so a lenient matcher cannot hide a contract break."""

from __future__ import annotations

from tests.contract.replay import normalise, template_regex

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
