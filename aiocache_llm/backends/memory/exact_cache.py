"""``MemoryExactCache``: an LRU dict of encoded values with per-entry expiry, in one process."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, ClassVar

from pydantic import BaseModel

from aiocache_llm.core.clock import Clock
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES, IMMUTABLE_VALUE_TYPES, ValueCodec
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.query import Normalizer, Query, QueryKeys
from aiocache_llm.core.recorded import RecordedStream
from aiocache_llm.core.stats import CacheStats
from aiocache_llm.core.validation import check_optional_positive_number, check_size_limit

__all__ = ["MemoryExactCache"]

_NEVER = 0.0


class MemoryExactCache(AsyncResource):
    """Identical request -> stored answer, in this process.

    Entries are kept in least-recently-used order: a hit refreshes an entry, and a
    put beyond ``max_size`` (0 = unbounded) evicts the least recently used one.
    ``ttl_seconds`` (None = never) is the default lifetime, overridden per put; an
    expired entry is a miss. Immutable values (``str``, numbers) are kept and
    returned as they are; others are held encoded, so every hit returns a fresh copy
    of a ``dict``, ``list`` or model and nothing a caller does to it changes the
    cache.

    Every method completes without yielding to the event loop, so each is atomic
    with respect to other tasks and cancellation cannot leave it half done.
    ``get``/``put``/``invalidate`` are O(1) plus the size of the value (expired
    entries are purged in O(log n) each); ``clear`` is O(n).
    """

    completes_inline: ClassVar[bool] = True
    """Capability flag: no coroutine of this cache ever suspends, so a sync caller (the
    LangChain adapter) may drive one to completion without an event loop."""

    def __init__(
        self,
        max_size: int = 1024,
        ttl_seconds: float | None = None,
        *,
        normalize: Normalizer | None = None,
        value_types: Iterable[type[BaseModel]] = (),
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        clock: Clock | None = None,
    ) -> None:
        self._max_size = check_size_limit("max_size", max_size)
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        self._keys = QueryKeys(normalize)
        self._codec = ValueCodec(value_types, max_value_bytes=max_value_bytes)
        self._clock: Clock = clock or time.monotonic
        # digest -> (value, expiry on self._clock or _NEVER), oldest use first; the
        # value is the object itself when immutable, else its encoded bytes
        self._entries: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        # (expiry, digest) of every entry written with a TTL; may hold stale pairs
        self._expiries: list[tuple[float, str]] = []
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def __repr__(self) -> str:
        bound = self._max_size or "unbounded"
        return (
            f"MemoryExactCache(size={len(self._entries)}/{bound}, ttl_seconds={self._ttl}, "
            f"hits={self._hits}, misses={self._misses})"
        )

    @property
    def codec(self) -> ValueCodec:
        """The codec this cache stores values with (it knows the declared ``value_types``)."""
        return self._codec

    @property
    def ttl_seconds(self) -> float | None:
        """The lifetime of an entry put without ``ttl_seconds`` (None = never expires)."""
        return self._ttl

    def signature(self, query: Query) -> str:
        """Return the digest this cache files ``query`` under (its ``normalize`` applied)."""
        return self._keys.digest(query)

    async def get(self, query: Query) -> Any | None:
        """Return the value stored for ``query`` (a fresh copy if mutable) or ``None``.

        Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` for a query
        that cannot be keyed.
        """
        return self._lookup(self._keys.digest(query))

    async def get_by_signature(self, digest: str) -> Any | None:
        """:meth:`get` for a digest already computed with :meth:`signature`."""
        return self._lookup(digest)

    def _lookup(self, digest: str) -> Any | None:
        # shared by both reads, called without a coroutine of its own: this is the
        # whole cost of a hit besides the digest
        self._check_open()
        entry = self._entries.get(digest)
        if entry is not None:
            stored, expires_at = entry
            if expires_at == _NEVER or expires_at > self._clock():
                self._entries.move_to_end(digest)
                self._hits += 1
                # bytes is never a cached value type: bytes here means "encoded"
                if type(stored) is bytes:
                    return self._codec.decode(stored)
                if type(stored) is tuple:  # a recording of text chunks, kept as is
                    return RecordedStream(stored)
                return stored
            del self._entries[digest]
        self._misses += 1
        return None

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` for ``query``, replacing any previous value.

        ``ttl_seconds`` overrides the cache's default for this entry. The value is
        validated and encoded before anything changes, so a bad value (or query)
        raises and leaves the cache as it was.
        """
        await self.put_by_signature(self._keys.digest(query), value, ttl_seconds=ttl_seconds)

    async def put_by_signature(
        self, digest: str, value: Any, *, ttl_seconds: float | None = None
    ) -> None:
        """:meth:`put` for a digest already computed with :meth:`signature`."""
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds) or self._ttl
        data = self._codec.encode(value)  # validates, even when the object itself is kept
        stored = value if type(value) in IMMUTABLE_VALUE_TYPES else data
        if type(value) is RecordedStream and all(type(c) is str for c in value.chunks):
            # immutable chunks: a hit hands out a new list of them, nothing to decode
            stored = tuple(value.chunks)
        now = self._clock()
        expires_at = _NEVER
        if ttl is not None:
            expires_at = now + ttl
            heapq.heappush(self._expiries, (expires_at, digest))
        self._entries[digest] = (stored, expires_at)
        self._entries.move_to_end(digest)
        self._purge_expired(now)
        if self._max_size:
            while len(self._entries) > self._max_size:
                self._entries.popitem(last=False)
                self._evictions += 1

    async def invalidate(self, query: Query) -> bool:
        """Remove the entry of ``query``; return whether a live one was there."""
        self._check_open()
        return await self.invalidate_by_signature(self._keys.digest(query))

    async def invalidate_by_signature(self, digest: str) -> bool:
        """:meth:`invalidate` for a digest already computed with :meth:`signature`."""
        self._check_open()
        entry = self._entries.pop(digest, None)
        return entry is not None and (entry[1] == _NEVER or entry[1] > self._clock())

    async def clear(self) -> None:
        """Remove every entry; counters are kept."""
        self._check_open()
        self._entries.clear()
        self._expiries.clear()

    async def stats(self) -> CacheStats:
        """Return hits, misses, evictions and the number of live entries."""
        self._check_open()
        self._purge_expired(self._clock())
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            size=len(self._entries),
            evictions=self._evictions,
        )

    def _purge_expired(self, now: float) -> None:
        expiries = self._expiries
        entries = self._entries
        while expiries and expiries[0][0] <= now:
            expires_at, digest = heapq.heappop(expiries)
            entry = entries.get(digest)
            # the entry may have been rewritten since: only its current expiry counts
            if entry is not None and entry[1] == expires_at:
                del entries[digest]
        # rewrites leave stale pairs behind; rebuild before they outnumber entries
        if len(expiries) > 2 * len(entries) + 64:
            self._expiries = [(e[1], d) for d, e in entries.items() if e[1] != _NEVER]
            heapq.heapify(self._expiries)

    async def _release(self) -> None:
        self._entries.clear()
        self._expiries.clear()
