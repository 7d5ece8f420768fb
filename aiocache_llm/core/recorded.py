"""``RecordedStream``: a streamed answer as a cacheable value (its chunks, in order)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["RecordedStream"]


class RecordedStream:
    """The ordered chunks of a streamed answer that ended normally.

    This is what the gateway stores for a streamed request and what a cache hands
    back for it: one entry, read in one round trip. Each chunk is itself a cacheable
    value (a ``str``, JSON data or a registered pydantic model); the codec stores
    them one after another, so a hit rebuilds every chunk afresh (of the same type)
    and a caller that mutates one never changes what is stored.

    It is deliberately not a list: a cache answering a non-streaming request with a
    recording (or the reverse) is recognised by type and treated as a miss.
    """

    __slots__ = ("chunks",)

    def __init__(self, chunks: Iterable[Any]) -> None:
        self.chunks: list[Any] = list(chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.chunks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordedStream):
            return NotImplemented
        return self.chunks == other.chunks

    __hash__ = None  # type: ignore[assignment]  # mutable container

    def __repr__(self) -> str:
        return f"RecordedStream({len(self.chunks)} chunks)"
