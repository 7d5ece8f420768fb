"""Hypothesis strategies for hostile input: any Unicode, any JSON-ish tree, bad numbers.

Text includes lone surrogates (which no backend can store and must be refused), NUL,
line separators and astral characters. Trees mix what JSON can hold with what it
cannot (NaN, infinities, integers beyond 64 bits, tuples, sets, bytes, non-``str``
keys). Deeply nested and huge values are built directly (hypothesis would take
ages to find them by chance).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = [
    "any_text",
    "deep_trees",
    "hostile_trees",
    "huge_values",
    "nested",
    "storable_text",
    "storable_trees",
]

any_text = st.text(st.characters(), max_size=40)
"""Any Unicode, lone surrogates included."""

storable_text = st.text(st.characters(codec="utf-8"), max_size=40)
"""Text UTF-8 can encode: what a backend must store and give back exactly."""

_edge_floats = st.sampled_from(
    [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-320]
)
_storable_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _edge_floats
    | storable_text
)
_hostile_scalars = (
    _storable_scalars
    | st.none()
    | st.floats()  # NaN and infinities
    | st.integers(min_value=2**64, max_value=2**200)
    | st.integers(min_value=-(2**200), max_value=-(2**63) - 1)
    | any_text
    | st.binary(max_size=8)
    | st.builds(object)
)

storable_trees = st.recursive(
    _storable_scalars | st.none(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(storable_text, children, max_size=4)
    ),
    max_leaves=25,
)
"""JSON a cache must round-trip exactly (``None`` inside containers included)."""

hostile_trees = st.recursive(
    _hostile_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(any_text, children, max_size=4)
        | st.dictionaries(st.integers() | st.booleans(), children, min_size=1, max_size=2)
        | st.tuples(children, children)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=25,
)
"""Anything at all: each value either round-trips exactly or is refused."""


def nested(depth: int, *, leaf: Any = "leaf", as_dict: bool = False) -> Any:
    """A list (or dict) nested ``depth`` levels deep around ``leaf``."""
    value = leaf
    for _ in range(depth):
        value = {"k": value} if as_dict else [value]
    return value


deep_trees = st.builds(nested, st.integers(min_value=1, max_value=2000), as_dict=st.booleans())
"""Nesting around the JSON encoder's limit (orjson stops at 255 levels) and far beyond."""

huge_values = st.builds(
    lambda size, char: char * size,
    st.integers(min_value=1, max_value=3 * 1024 * 1024),
    st.sampled_from(["a", "é", "🦜", "\x00"]),
)
"""Text up to 12 MB encoded, below the 16 MiB default bound."""
