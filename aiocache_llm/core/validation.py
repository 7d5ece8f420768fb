"""The one shared argument validator.

Constructors and call sites use these helpers so that every bad argument fails the
same way: an :class:`InvalidInputError` (a ``ValueError``) or an
:class:`InvalidInputTypeError` (a ``TypeError``) whose message names the argument.
All helpers return the validated value so they compose in assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError

__all__ = [
    "check_bool",
    "check_callable",
    "check_finite_number",
    "check_id",
    "check_key_prefix",
    "check_optional_positive_number",
    "check_positive_number",
    "check_positive_int",
    "check_size_limit",
    "check_similarity",
]

_GLOB_CHARACTERS = frozenset("*?[]\\")


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool`` (1 and 0 are refused: they hide typos)."""
    if type(value) is not bool:
        raise InvalidInputTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_positive_int(name: str, value: object, *, at_most: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) greater than zero.

    ``at_most`` bounds it from above (inclusive): a backend that cannot hold larger
    values exactly refuses them here, before anything changes.
    """
    if type(value) is not int:
        raise InvalidInputTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise InvalidInputError(f"{name} must be > 0, got {value}")
    if at_most is not None and value > at_most:
        raise InvalidInputError(f"{name} must be at most {at_most}, got {value}")
    return value


def check_size_limit(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """Return a size bound: an ``int`` >= 0 where 0 means unbounded (or ``None`` if allowed)."""
    if value is None and allow_none:
        return None
    if type(value) is not int:
        raise InvalidInputTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise InvalidInputError(f"{name} must be >= 0 (0 means unbounded), got {value}")
    return value


def check_finite_number(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputTypeError(f"{name} must be a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise InvalidInputError(f"{name} must be finite, got {value}")
    return result


def check_positive_number(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number strictly greater than zero."""
    result = check_finite_number(name, value)
    if result <= 0:
        raise InvalidInputError(f"{name} must be > 0, got {value}")
    return result


def check_optional_positive_number(name: str, value: object) -> float | None:
    """Return ``None`` or a finite number of seconds (or tokens) strictly greater than zero."""
    if value is None:
        return None
    result = check_finite_number(name, value)
    if result <= 0:
        raise InvalidInputError(f"{name} must be > 0 or None, got {value}")
    return result


def check_similarity(name: str, value: object) -> float:
    """Return a cosine-similarity threshold, which must lie in [-1, 1]."""
    result = check_finite_number(name, value)
    if not -1.0 <= result <= 1.0:
        raise InvalidInputError(f"{name} must be within [-1, 1] (cosine similarity), got {value}")
    return result


def check_id(name: str, value: object) -> str:
    """Return an identifier (user id, conversation id, prefix): a non-empty ``str``.

    Lone surrogates are refused: no backend could store such a key, and the memory
    and Redis twins must answer the same call the same way.
    """
    if type(value) is not str:
        raise InvalidInputTypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{name} must not be empty")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{name} is not valid Unicode text: {exc}") from exc
    return value


def check_key_prefix(value: object) -> str:
    """Return a Redis key prefix: non-empty and free of glob characters.

    Glob characters are refused because ``clear()`` scans ``{prefix}:*``; a prefix
    such as ``app*`` would make it match (and delete) other applications' keys.
    """
    prefix = check_id("key_prefix", value)
    bad = _GLOB_CHARACTERS.intersection(prefix)
    if bad:
        raise InvalidInputError(
            f"key_prefix must not contain glob characters {sorted(bad)}, got {prefix!r}"
        )
    return prefix


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    """Return ``value`` if it can be called."""
    if not callable(value):
        raise InvalidInputTypeError(f"{name} must be callable, got {type(value).__name__}")
    return value  # type: ignore[no-any-return]
