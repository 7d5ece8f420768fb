"""The shared argument validator: right value back, or a library error naming the argument."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocache_llm.core.errors import AiocacheLLMError, InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import (
    check_callable,
    check_finite_number,
    check_id,
    check_key_prefix,
    check_optional_positive_number,
    check_positive_int,
    check_positive_number,
    check_similarity,
    check_size_limit,
)

NAME = "my_argument"


def test_library_errors_are_also_the_builtin_errors() -> None:
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(InvalidInputTypeError, TypeError)
    assert issubclass(InvalidInputError, AiocacheLLMError)
    assert issubclass(InvalidInputTypeError, AiocacheLLMError)


@given(st.integers(min_value=1))
def test_positive_int_accepts_every_positive_int(value: int) -> None:
    assert check_positive_int(NAME, value) == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_number_accepts_every_finite_float(value: float) -> None:
    result = check_finite_number(NAME, value)
    assert type(result) is float
    assert result == value


def test_finite_number_turns_ints_into_floats() -> None:
    result = check_finite_number(NAME, 3)
    assert type(result) is float
    assert result == 3.0


@pytest.mark.parametrize(
    ("check", "value", "error"),
    [
        (check_positive_int, 0, InvalidInputError),
        (check_positive_int, -1, InvalidInputError),
        (check_positive_int, True, InvalidInputTypeError),
        (check_positive_int, 1.0, InvalidInputTypeError),
        (check_positive_int, "1", InvalidInputTypeError),
        (check_positive_int, None, InvalidInputTypeError),
        (check_size_limit, -1, InvalidInputError),
        (check_size_limit, False, InvalidInputTypeError),
        (check_size_limit, None, InvalidInputTypeError),
        (check_size_limit, 2.0, InvalidInputTypeError),
        (check_finite_number, math.nan, InvalidInputError),
        (check_finite_number, -math.inf, InvalidInputError),
        (check_finite_number, True, InvalidInputTypeError),
        (check_finite_number, "1.5", InvalidInputTypeError),
        (check_finite_number, 1j, InvalidInputTypeError),
        (check_positive_number, 0, InvalidInputError),
        (check_positive_number, -0.0, InvalidInputError),
        (check_positive_number, math.inf, InvalidInputError),
        (check_positive_number, None, InvalidInputTypeError),
        (check_optional_positive_number, 0, InvalidInputError),
        (check_optional_positive_number, -1e-9, InvalidInputError),
        (check_optional_positive_number, math.nan, InvalidInputError),
        (check_optional_positive_number, False, InvalidInputTypeError),
        (check_optional_positive_number, "1", InvalidInputTypeError),
        (check_similarity, 1.0000001, InvalidInputError),
        (check_similarity, -1.5, InvalidInputError),
        (check_similarity, math.nan, InvalidInputError),
        (check_similarity, True, InvalidInputTypeError),
        (check_id, "", InvalidInputError),
        (check_id, None, InvalidInputTypeError),
        (check_id, 42, InvalidInputTypeError),
        (check_id, b"bytes", InvalidInputTypeError),
        (check_callable, 42, InvalidInputTypeError),
        (check_callable, "print", InvalidInputTypeError),
    ],
    ids=lambda v: getattr(v, "__name__", repr(v)),
)
def test_bad_values_raise_an_error_naming_the_argument(
    check: Any, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match=NAME):
        check(NAME, value)


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (check_positive_int, 1, 1),
        (check_size_limit, 0, 0),
        (check_size_limit, 10**12, 10**12),
        (check_positive_number, 1e-9, 1e-9),
        (check_optional_positive_number, None, None),
        (check_optional_positive_number, 2, 2.0),
        (check_similarity, -1, -1.0),
        (check_similarity, 1.0, 1.0),
        (check_similarity, 0, 0.0),
        (check_id, " ", " "),
        (check_id, "ü:🦜", "ü:🦜"),
    ],
    ids=lambda v: getattr(v, "__name__", repr(v)),
)
def test_good_values_come_back(check: Any, value: Any, expected: Any) -> None:
    result = check(NAME, value)
    assert result == expected
    assert type(result) is type(expected)


def test_size_limit_accepts_none_only_when_allowed() -> None:
    assert check_size_limit(NAME, None, allow_none=True) is None
    with pytest.raises(InvalidInputTypeError, match=NAME):
        check_size_limit(NAME, None)


def test_callable_comes_back_unchanged() -> None:
    def hook() -> None:
        return None

    assert check_callable(NAME, hook) is hook
    assert check_callable(NAME, len) is len


@pytest.mark.parametrize("prefix", ["app", "app:v2", "ü-🦜", "a.b-c_d"])
def test_key_prefix_accepts_plain_prefixes(prefix: str) -> None:
    assert check_key_prefix(prefix) == prefix


@pytest.mark.parametrize(
    ("prefix", "error"),
    [
        ("app*", InvalidInputError),
        ("app?", InvalidInputError),
        ("app[1]", InvalidInputError),
        ("app\\x", InvalidInputError),
        ("", InvalidInputError),
        (None, InvalidInputTypeError),
    ],
    ids=["star", "question", "brackets", "backslash", "empty", "none"],
)
def test_key_prefix_refuses_glob_characters(prefix: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="key_prefix"):
        check_key_prefix(prefix)
