"""Just enough PromQL reading to list the metrics and labels an expression depends on.

Not a parser: it removes strings, range selectors and grouping clauses, then takes every
identifier that is neither a function call nor a keyword as a metric name. That holds for
the expressions the chart writes (its tests include cases that would trip a naive version).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "atan2",
        "inf",
        "nan",
    }
)


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass
class Query:
    """What one expression reads: metric -> its label matchers, and the grouping labels."""

    metrics: dict[str, list[Matcher]] = field(default_factory=dict)
    grouping_labels: set[str] = field(default_factory=set)


def read(expr: str) -> Query:
    """List metric names, label matchers and grouping labels of ``expr``."""
    query = Query()
    label_values = _LABEL_VALUES.match(expr)
    if label_values:  # Grafana's variable query: label_values(<selector>, <label>)
        inner = read(label_values.group(1))
        inner.grouping_labels.add(label_values.group(2))
        return inner

    def selector(match: re.Match[str]) -> str:
        name, body = match.group(1), match.group(2)
        if name is None or name in _KEYWORDS:
            raise ValueError(f"selector without a metric name in {expr!r}")
        matchers = [Matcher(m.group(1), m.group(2), m.group(3)) for m in _MATCHER.finditer(body)]
        rest = _MATCHER.sub("", body).replace(",", "").strip()
        if rest:
            raise ValueError(f"cannot read the label matchers {body!r} in {expr!r}")
        query.metrics.setdefault(name, []).extend(matchers)
        return f" {name} "

    text = _SELECTOR.sub(selector, expr)
    text = _STRING.sub(" ", text)
    text = _RANGE.sub(" ", text)

    def grouping(match: re.Match[str]) -> str:
        query.grouping_labels.update(x.strip() for x in match.group(2).split(",") if x.strip())
        return " "

    text = _GROUPING.sub(grouping, text)
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS:
            continue
        query.metrics.setdefault(name, [])
    return query
