"""``RedisSemanticCache``: paraphrase -> stored answer, shared by every process on one Redis 7.

Plain Redis (no modules) holds the entries; every process keeps a numpy mirror of
the vectors of the scopes it looks up and searches it locally. The data layout and
the scripts are in :mod:`semantic_scripts <aiocache_llm.backends.redis.semantic_scripts>`,
the mirrors in :mod:`semantic_mirror <aiocache_llm.backends.redis.semantic_mirror>`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from itertools import count
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.backends.redis.semantic_mirror import ScopeMirrors
from aiocache_llm.backends.redis.semantic_scripts import (
    FETCH,
    INVALIDATE,
    LOG_FLOOR,
    PUT,
    REAP_LIMIT,
    SYNC,
    SYNC_SLACK,
)
from aiocache_llm.backends.vectors import CANDIDATES, EmbeddingAdapter, EmbedFn, UnitVector
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES, ValueCodec
from aiocache_llm.core.errors import CorruptEntryError, InvalidInputError
from aiocache_llm.core.query import Normalizer, Query, QueryKeys
from aiocache_llm.core.stats import CacheStats
from aiocache_llm.core.validation import (
    check_optional_positive_number,
    check_similarity,
    check_size_limit,
)

__all__ = ["RedisSemanticCache"]


class RedisSemanticCache(RedisBackend):
    """Paraphrased request -> stored answer, by cosine similarity, shared through plain Redis 7.

    Answers every call like :class:`MemorySemanticCache` (drop-in): same scopes,
    similarity scale (cosine in [-1, 1], ``>= similarity_threshold`` is a hit,
    overridable per call), exact-repeat shortcut, TTLs and errors. Entries are shared
    by every process using the same ``key_prefix``; a process sees what another
    wrote, invalidated or cleared on its very next ``get``.

    ``embed_fn`` is called and its vectors validated as in
    :class:`MemorySemanticCache`; the dimension is also checked across processes
    through ``{key_prefix}:dim``.

    ``max_size=None`` (or 0) is unbounded; a positive ``max_size`` keeps a global
    LRU index (a sorted set) that costs one index write per hit and put. Expiry
    follows the server clock: values carry ``PX``, vectors their expiry (masked in
    mirrors), and each put removes up to 16 expired vectors of its scope; a scope's
    keys expire with its longest-lived entry.

    Round trips: a ``get`` is one script call that syncs this process's mirror of the
    query's scope (or answers an exact repeat without embedding); with no candidate
    at or above the threshold it is a miss after that one call. Otherwise a second
    call takes the best few candidates and returns the first whose value still
    exists, so a hit is two round trips. ``put`` and ``invalidate`` are one call
    each; every call is atomic on the server. The vector search is brute force in
    numpy on the mirror (no ANN index), in a worker thread when the scope is large.

    Costs: Redis holds each vector about 1.25 times (the hash, plus a log trimmed to
    a quarter of the scope's entries but at least 64 changes); each process holds
    float32 copies of the scopes it queried (at most 1024 scopes, least recently
    used dropped). A mirror's first sync is a snapshot of its scope (O(n*d) bytes):
    inside the sync reply up to 1 MiB of vectors, else by HSCAN in batches of 1000
    followed by a replay of the changes logged meanwhile, so that no single call
    holds Redis for long. Later syncs transfer only the changes. ``stats().size`` is
    O(1) for a bounded cache (entries expired but not yet reaped included), O(keys
    in the database) with SCAN for an unbounded one.

    Data under our keys that this library did not write (vectors of the wrong length
    or NaN, garbage in the log, values it cannot decode, keys of another type) is
    skipped, counted in ``corrupt_entries`` and never crashes a lookup; nothing read
    from Redis is unpickled or evaluated. Not Redis Cluster compatible: the scripts
    touch keys of several scopes and the global LRU index. Driver errors become
    :class:`BackendUnavailableError`/:class:`BackendError`. Cancelling a call may
    leave its script executed or not, never half executed.
    """

    def __init__(
        self,
        embed_fn: EmbedFn,
        *,
        url: str | None = None,
        client: Redis | None = None,
        similarity_threshold: float = 0.95,
        max_size: int | None = None,
        ttl_seconds: float | None = None,
        key_prefix: str = "aiocache_llm:semantic",
        normalize: Normalizer | None = None,
        value_types: Iterable[type[BaseModel]] = (),
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        dimension: int | None = None,
        embed_in_thread: bool = True,
    ) -> None:
        self._embedding = EmbeddingAdapter(embed_fn, in_thread=embed_in_thread, dimension=dimension)
        self._threshold = check_similarity("similarity_threshold", similarity_threshold)
        self._max_size = check_size_limit("max_size", max_size, allow_none=True) or 0
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        self._keys = QueryKeys(normalize)
        self._codec = ValueCodec(value_types, max_value_bytes=max_value_bytes)
        super().__init__(url=url, client=client, key_prefix=key_prefix)
        self._dim_key = f"{self._prefix}:dim"
        self._lru_key = f"{self._prefix}:lru"
        hex64 = "?" * 64
        self._scope_pattern = f"{self._prefix}:s:{hex64}:*"
        self._value_pattern = f"{self._prefix}:s:{hex64}:v:{hex64}"
        self._sync = self._redis.register_script(SYNC)
        self._fetch = self._redis.register_script(FETCH)
        self._put = self._redis.register_script(PUT)
        self._invalidate = self._redis.register_script(INVALIDATE)
        self._mirrors = ScopeMirrors(self._redis, self._prefix)
        self._token_prefix = os.urandom(6).hex()
        self._tokens = count()
        self._log_floor = LOG_FLOOR
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._corrupt = 0

    def __repr__(self) -> str:
        bound = self._max_size or "unbounded"
        return (
            f"RedisSemanticCache(key_prefix={self._prefix!r}, max_size={bound}, "
            f"similarity_threshold={self._threshold}, ttl_seconds={self._ttl}, "
            f"embed_fn={self._embedding!r}, mirrored_scopes={len(self._mirrors)}, "
            f"hits={self._hits}, misses={self._misses})"
        )

    async def get(self, query: Query, *, similarity_threshold: float | None = None) -> Any | None:
        """Return the value of the most similar live entry of the query's scope, or ``None``.

        ``similarity_threshold`` overrides the cache's threshold for this call. An
        exact repeat of a stored query, and any query of a scope with no entries, is
        answered without calling ``embed_fn``. One round trip for an exact repeat or
        a miss, two for a semantic hit. Raises
        :class:`InvalidInputError`/:class:`InvalidInputTypeError` for a bad query,
        threshold or embedding, before anything stored changes;
        :class:`BackendError` when Redis fails.
        """
        self._check_open()
        threshold = self._threshold
        if similarity_threshold is not None:
            threshold = check_similarity("similarity_threshold", similarity_threshold)
        scope, text, digest = self._keys.semantic_parts(query)
        point = self._mirrors.start(scope)
        reply = await self._sync_scope(scope, digest, point.cursor)
        now_ms, stored_dimension, mode = float(reply[0]), reply[1], reply[2]
        if mode == b"e":
            return self._decode(reply[3])
        if mode not in (b"d", b"s", b"S"):
            self._miss(corrupt=True)
            return None
        if mode == b"s" and not reply[5] and not reply[3]:
            # the scope holds nothing: a miss without an embedding, and no mirror kept
            self._mirrors.forget(point)
            self._miss()
            return None
        vector = await self._embedding.embed(text)
        self._check_open()
        self._embedding.check(vector)
        self._check_stored_dimension(vector, stored_dimension)
        index = await self._mirrors.apply(point, reply, vector.shape[0])
        candidates = (
            [] if index is None else await index.best_async(vector, CANDIDATES, now_ms, threshold)
        )
        if not candidates:
            self._miss()
            return None
        self._check_open()
        return await self._fetch_first(scope, [c.entry_id for c in candidates])

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` under the query's scope and the embedding of its last user message.

        Replaces the entry of the same query. ``ttl_seconds`` overrides the cache's
        default for this entry. The query, value and embedding are all validated
        before anything changes, so bad input raises and leaves Redis as it was, and
        so does an embedding whose dimension differs from the vectors already stored
        by any process. One round trip; :class:`BackendError` when Redis fails.
        """
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds) or self._ttl
        scope, text, digest = self._keys.semantic_parts(query)
        data = self._codec.encode(value)
        vector = await self._embedding.embed(text)
        self._check_open()
        self._embedding.check(vector)
        ttl_ms = max(1, round(ttl * 1000)) if ttl is not None else 0
        base = f"{self._prefix}:s:{scope}"
        try:
            reply = await self._put(
                keys=[
                    f"{base}:vec",
                    f"{base}:log",
                    f"{base}:exp",
                    f"{base}:v:{digest}",
                    self._dim_key,
                    self._lru_key,
                ],
                args=[
                    digest,
                    vector.astype("<f4").tobytes(),
                    data,
                    ttl_ms,
                    vector.shape[0],
                    self._max_size,
                    scope,
                    self._prefix,
                    self._log_floor,
                    REAP_LIMIT,
                    self._token(),
                ],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "put") from exc
        if int(reply[0]) == 0:
            raise _dimension_error(vector, reply[1])
        self._embedding.adopt(vector)
        self._evictions += int(reply[1])

    async def invalidate(self, query: Query) -> bool:
        """Remove the entry stored for exactly this query; return whether a live one was there.

        One round trip; other processes' mirrors drop it on their next ``get``.
        """
        self._check_open()
        scope, _, digest = self._keys.semantic_parts(query)
        base = f"{self._prefix}:s:{scope}"
        try:
            removed = await self._invalidate(
                keys=[
                    f"{base}:vec",
                    f"{base}:log",
                    f"{base}:exp",
                    f"{base}:v:{digest}",
                    self._lru_key,
                ],
                args=[digest, base, f"{scope}:{digest}", self._log_floor, self._token()],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "invalidate") from exc
        return bool(removed)

    async def clear(self) -> None:
        """Remove every entry of every scope; counters and the learned dimension are kept.

        Deletes this cache's keys (SCAN + UNLINK, never KEYS; O(N)) and this process's
        mirrors. Only ``{key_prefix}:s:<scope>:*``, ``{key_prefix}:dim`` and
        ``{key_prefix}:lru`` are deleted: other keys, nested prefixes such as
        ``{key_prefix}:v2`` included, stay. Not atomic: a put racing with ``clear``
        may survive it.
        """
        self._check_open()
        self._mirrors.clear()
        await self._delete_matching(self._scope_pattern)
        try:
            await self._redis.unlink(self._dim_key, self._lru_key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc

    async def stats(self) -> CacheStats:
        """Return this process's hits, misses, evictions and corrupt entries; the size in Redis."""
        self._check_open()
        index = self._lru_key if self._max_size else None
        size = await self._entry_count(index, self._value_pattern)
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            size=size,
            evictions=self._evictions,
            corrupt_entries=self._corrupt + self._mirrors.corrupt,
        )

    async def _sync_scope(self, scope: str, digest: str, cursor: tuple[bytes, bytes]) -> Any:
        base = f"{self._prefix}:s:{scope}"
        try:
            return await self._sync(
                keys=[
                    f"{base}:vec",
                    f"{base}:log",
                    f"{base}:exp",
                    self._dim_key,
                    f"{base}:v:{digest}",
                    self._lru_key,
                ],
                args=[
                    cursor[0],
                    cursor[1],
                    f"{scope}:{digest}" if self._max_size else "",
                    SYNC_SLACK,
                    self._token(),
                    self._mirrors.inline_entries(self._embedding.dimension),
                ],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc

    async def _fetch_first(self, scope: str, digests: list[str]) -> Any | None:
        base = f"{self._prefix}:s:{scope}"
        keys = [f"{base}:v:{digest}" for digest in digests]
        members = [f"{scope}:{digest}" for digest in digests]
        try:
            found = await self._fetch(
                keys=[*keys, self._lru_key], args=[*members, "1" if self._max_size else "0"]
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc
        status = int(found[0])
        if status > 0:
            return self._decode(found[1])
        self._miss(corrupt=status < 0)
        return None

    def _decode(self, data: bytes) -> Any:
        try:
            value = self._codec.decode(data)
        except CorruptEntryError:
            self._miss(corrupt=True)
            return None
        self._hits += 1
        return value

    def _miss(self, *, corrupt: bool = False) -> None:
        self._misses += 1
        self._corrupt += corrupt

    def _check_stored_dimension(self, vector: UnitVector, stored: bytes) -> None:
        try:
            dimension = int(stored)
        except ValueError:
            return  # absent (b"") or garbage, which the next put overwrites
        if dimension != vector.shape[0]:
            raise _dimension_error(vector, stored)

    def _token(self) -> str:
        return f"{self._token_prefix}{next(self._tokens):x}"

    async def _release(self) -> None:
        self._mirrors.clear()
        await super()._release()


def _dimension_error(vector: UnitVector, stored: bytes) -> InvalidInputError:
    return InvalidInputError(
        f"embedding has dimension {vector.shape[0]}, but the entries of this cache in Redis "
        f"have dimension {stored.decode(errors='replace')}: another embedder uses the same "
        "key_prefix (clear() the cache to switch embedders, or use another key_prefix)"
    )
