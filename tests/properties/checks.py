"""Assertions and fixtures shared by the property tests."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, settings

from aiocache_llm import InvalidInputError, InvalidInputTypeError

__all__ = ["FAST", "REAL", "REFUSED", "assert_identical", "fresh_query"]

REFUSED = (InvalidInputError, InvalidInputTypeError)
"""The only errors bad input may raise (ValueTooLargeError is an InvalidInputError)."""

# one backend object serves every example of a test, so examples use fresh keys
_FIXTURE_PER_TEST = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=_FIXTURE_PER_TEST)
"""Memory and fakeredis: cheap, so many examples."""
REAL = settings(max_examples=25, deadline=None, suppress_health_check=_FIXTURE_PER_TEST)
"""The real server: the same properties, fewer examples."""

_numbers = itertools.count()


def fresh_query() -> dict[str, Any]:
    """A query no earlier example used."""
    return {"model": "m", "messages": [{"role": "user", "content": f"q{next(_numbers)}"}]}


def assert_identical(got: Any, expected: Any) -> None:
    """Equal, and of exactly the same type at every depth (so True never becomes 1)."""
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert_identical(got[key], value)
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for got_item, item in zip(got, expected, strict=True):
            assert_identical(got_item, item)
    else:
        assert got == expected
