"""The operator named in a resolution's audit row comes from ``X-Operator``, never a default."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from gateway.ops import AnyRequest, _operator


def _request(headers: dict[str, str]) -> AnyRequest:
    return cast(AnyRequest, SimpleNamespace(headers=headers))


@pytest.mark.parametrize("headers", [{}, {"x-operator": ""}, {"x-operator": "  \t "}])
def test_no_operator_is_none_not_unknown(headers: dict[str, str]) -> None:
    assert _operator(_request(headers)) is None


def test_the_operator_is_trimmed_and_capped() -> None:
    assert _operator(_request({"x-operator": "  alice "})) == "alice"
    assert _operator(_request({"x-operator": "b" * 100})) == "b" * 64
