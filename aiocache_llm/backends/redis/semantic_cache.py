"""``RedisSemanticCache``: paraphrase -> stored answer, shared by every process on one Redis 7.

Plain Redis (no modules) holds the entries; every process keeps a numpy mirror of
the vectors of the scopes it looks up and searches it locally. The data layout and
the scripts are in :mod:`semantic_scripts <aiocache_llm.backends.redis.semantic_scripts>`,
the mirrors in :mod:`semantic_mirror <aiocache_llm.backends.redis.semantic_mirror>`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from itertools import count
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

from aiocache_llm.backends.promotion import SemanticHit, promotion_ttl
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.backends.redis.exact_cache import RedisExactCache
from aiocache_llm.backends.redis.semantic_mirror import ScopeMirrors
from aiocache_llm.backends.redis.semantic_scripts import (
    DROP_PROMOTIONS,
    FETCH,
    INVALIDATE,
    LINK_PROMOTION,
    LOG_FLOOR,
    PUT,
    REAP_LIMIT,
    SYNC,
    SYNC_SLACK,
)
from aiocache_llm.backends.vectors import CANDIDATES, EmbeddingAdapter, EmbedFn, UnitVector
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES, UndeclaredTypes, ValueCodec
from aiocache_llm.core.errors import CorruptEntryError, InvalidInputError, UndeclaredTypeError
from aiocache_llm.core.query import Normalizer, NoSemanticTextError, Query, QueryKeys
from aiocache_llm.core.stats import CacheStats
from aiocache_llm.core.validation import (
    check_optional_positive_number,
    check_similarity,
    check_size_limit,
)

__all__ = ["RedisSemanticCache"]

_HEX64 = "[0-9a-f]" * 64
# the connection settings that say two clients talk to the same server and database
_SERVER_SETTINGS = ("host", "port", "db", "path", "server")


class RedisSemanticCache(RedisBackend):
    """Paraphrased request -> stored answer, by cosine similarity, shared through plain Redis 7.

    Answers every call like :class:`MemorySemanticCache` (drop-in): same scopes,
    similarity scale (cosine in [-1, 1], ``>= similarity_threshold`` is a hit,
    overridable per call), exact-repeat shortcut, TTLs and errors, and queries whose
    last user message has no text (a tool result, an image) are not questions for it
    either: ``get`` and ``lookup`` return ``None`` without counting a miss (and without
    a round trip), ``put`` stores nothing, ``invalidate`` returns False. Entries are
    shared by every process using the same ``key_prefix``; a process sees what another
    wrote, invalidated or cleared on its very next ``get``.

    ``embed_fn`` is called and its vectors validated as in
    :class:`MemorySemanticCache`; the dimension is also checked across processes
    through ``{key_prefix}:dim``.

    ``max_size=None`` (or 0) is unbounded; a positive ``max_size`` keeps a global
    LRU index (a sorted set) that costs one index write per hit and put, and an
    expiry index of the entries with a TTL: as in :class:`MemorySemanticCache`,
    expired entries of any scope give up their slots before a live entry is evicted.
    Expiry follows the server clock: values carry ``PX``, vectors their expiry
    (masked in mirrors), and each put removes up to 16 expired vectors of its scope;
    a scope's keys expire with its longest-lived entry.

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
    holds Redis for long. Later syncs transfer only the changes. ``stats().size``
    counts live entries: O(log n) for a bounded cache, O(keys in the database) with
    SCAN for an unbounded one.

    Promotions (:meth:`promote`, see :mod:`aiocache_llm.backends.promotion`) go into
    a :class:`RedisExactCache` on the same server only, and are deleted by the same
    script that removes their entry.

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
        self._lru_exp_key = f"{self._lru_key}:exp"
        # `?` would match colons too, and so other objects' keys: hex classes only
        self._scope_pattern = f"{self._prefix}:s:{_HEX64}:*"
        self._value_pattern = f"{self._prefix}:s:{_HEX64}:v:{_HEX64}"
        self._promotions_pattern = f"{self._prefix}:s:{_HEX64}:pr:{_HEX64}"
        # what the scope pattern matches that is ours: the suffixes the scripts write
        self._scope_keys = re.compile(
            re.escape(self._prefix).encode()
            + rb":s:[0-9a-f]{64}:(?:vec|log|exp|(?:v|pr):[0-9a-f]{64})"
        )
        self._sync = self._redis.register_script(SYNC)
        self._fetch = self._redis.register_script(FETCH)
        self._put = self._redis.register_script(PUT)
        self._invalidate = self._redis.register_script(INVALIDATE)
        self._link_promotion = self._redis.register_script(LINK_PROMOTION)
        self._drop_promotions = self._redis.register_script(DROP_PROMOTIONS)
        self._mirrors = ScopeMirrors(self._redis, self._prefix)
        self._token_prefix = os.urandom(6).hex()
        self._tokens = count()
        self._log_floor = LOG_FLOOR
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._corrupt = 0
        self._undeclared = UndeclaredTypes()

    def __repr__(self) -> str:
        bound = self._max_size or "unbounded"
        return (
            f"RedisSemanticCache(key_prefix={self._prefix!r}, max_size={bound}, "
            f"similarity_threshold={self._threshold}, ttl_seconds={self._ttl}, "
            f"embed_fn={self._embedding!r}, mirrored_scopes={len(self._mirrors)}, "
            f"hits={self._hits}, misses={self._misses})"
        )

    @property
    def codec(self) -> ValueCodec:
        """The codec this cache stores values with (it knows the declared ``value_types``)."""
        return self._codec

    async def get(self, query: Query, *, similarity_threshold: float | None = None) -> Any | None:
        """Return the value of the most similar live entry of the query's scope, or ``None``.

        ``similarity_threshold`` overrides the cache's threshold for this call. An
        exact repeat of a stored query, and any query of a scope with no entries, is
        answered without calling ``embed_fn``; a query whose last user message has
        no text is ``None`` at once, and not a miss. One round trip for an exact
        repeat or a miss, two for a semantic hit. Raises
        :class:`InvalidInputError`/:class:`InvalidInputTypeError` for a bad query,
        threshold or embedding, before anything stored changes;
        :class:`BackendError` when Redis fails.
        """
        hit = await self.lookup(query, similarity_threshold=similarity_threshold)
        return None if hit is None else hit.value

    async def lookup(
        self, query: Query, *, similarity_threshold: float | None = None
    ) -> SemanticHit | None:
        """:meth:`get`, also telling which entry answered and its remaining lifetime.

        The lifetime is the entry's value's ``PTTL`` read in the same script that
        read the value (server clock). Same round trips and errors as :meth:`get`.
        """
        self._check_open()
        threshold = self._threshold
        if similarity_threshold is not None:
            threshold = check_similarity("similarity_threshold", similarity_threshold)
        try:
            scope, text, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return None  # no text to compare: not a question for this cache, nor a miss
        point = self._mirrors.start(scope)
        reply = await self._sync_scope(scope, digest, point.cursor)
        now_ms, stored_dimension, mode = float(reply[0]), reply[1], reply[2]
        if mode == b"e":
            return self._hit(reply[3], reply[4], scope, digest)
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

        Replaces the entry of the same query; stores nothing for a query whose last
        user message has no text. ``ttl_seconds`` overrides the cache's default for
        this entry. The query, value and embedding are all validated before anything
        changes, so bad input raises and leaves Redis as it was, and so does an
        embedding whose dimension differs from the vectors already stored by any
        process. One round trip; :class:`BackendError` when Redis fails.
        """
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds) or self._ttl
        try:
            scope, text, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return  # no text to compare: a later get could never find it
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
                    self._lru_exp_key,
                    f"{base}:pr:{digest}",
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

    async def promote(
        self,
        hit: SemanticHit,
        exact_cache: object,
        digest: str,
        *,
        ttl_seconds: float | None = None,
    ) -> bool:
        """Store ``hit.value`` in ``exact_cache`` under ``digest``, tied to ``hit``'s entry.

        The promotion lives ``ttl_seconds`` (None: the exact cache's default), never
        longer than the entry has left, and is deleted whenever the entry is removed
        (invalidated, replaced, reaped, evicted or cleared), by whichever process.
        ``exact_cache`` must be a :class:`RedisExactCache` on the same Redis server
        and database; for any other cache, or an entry that expired, nothing is
        stored and False is returned. Two round trips: the exact cache's put, then
        one script that ties the promotion to the entry and trims its lifetime to
        what the entry has left (or deletes it if the entry went meanwhile, then
        returns False). Raises what the exact cache's put raises
        (:class:`ValueTooLargeError`, :class:`BackendError`, ...).
        """
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        if not isinstance(exact_cache, RedisExactCache) or not _same_server(
            exact_cache.client, self._redis
        ):
            return False
        ttl = promotion_ttl(ttl, exact_cache.ttl_seconds, hit.ttl_seconds)
        scope, _, entry = hit.entry.partition(":")
        if (ttl is not None and ttl <= 0) or not (len(scope) == len(entry) == 64):
            return False
        await exact_cache.put_by_signature(digest, hit.value, ttl_seconds=ttl)
        base = f"{self._prefix}:s:{scope}"
        try:
            linked = await self._link_promotion(
                keys=[
                    f"{base}:v:{entry}",
                    f"{base}:pr:{entry}",
                    f"{exact_cache.key_prefix}:{digest}",
                ]
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "promote") from exc
        return bool(linked)

    async def invalidate(self, query: Query) -> bool:
        """Remove the entry stored for exactly this query; return whether a live one was there.

        One round trip; other processes' mirrors drop it on their next ``get``. The
        entry's promotions in an exact cache are deleted in the same step.
        """
        self._check_open()
        try:
            scope, _, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return False  # never stored
        base = f"{self._prefix}:s:{scope}"
        try:
            removed = await self._invalidate(
                keys=[
                    f"{base}:vec",
                    f"{base}:log",
                    f"{base}:exp",
                    f"{base}:v:{digest}",
                    self._lru_key,
                    self._lru_exp_key,
                    f"{base}:pr:{digest}",
                ],
                args=[digest, base, f"{scope}:{digest}", self._log_floor, self._token()],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "invalidate") from exc
        return bool(removed)

    async def clear(self) -> None:
        """Remove every entry of every scope; counters and the learned dimension are kept.

        Deletes this cache's keys (SCAN + UNLINK, never KEYS; O(N)) and this process's
        mirrors, and the entries' promotions in an exact cache. Only the keys the
        scripts write are deleted (``{key_prefix}:s:<scope>:`` + ``vec``, ``log``,
        ``exp``, ``v:<digest>``, ``pr:<digest>``; ``{key_prefix}:dim``,
        ``{key_prefix}:lru``, ``{key_prefix}:lru:exp``): other keys, nested prefixes
        such as ``{key_prefix}:v2`` included, stay. Not atomic: a put (or promotion)
        racing with ``clear`` may survive it.
        """
        self._check_open()
        self._mirrors.clear()
        try:
            records: list[bytes] = []
            async for key in self._redis.scan_iter(match=self._promotions_pattern, count=500):
                records.append(key)
                if len(records) >= 500:
                    await self._drop_promotions(keys=records)
                    records = []
            if records:
                await self._drop_promotions(keys=records)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc
        await self._delete_matching(self._scope_pattern, keep=self._scope_keys)
        try:
            await self._redis.unlink(self._dim_key, self._lru_key, self._lru_exp_key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc

    async def stats(self) -> CacheStats:
        """Return this process's hits, misses, evictions and corrupt entries; the size in Redis.

        The size counts live entries only (see the class docstring for its cost).
        """
        self._check_open()
        index = self._lru_key if self._max_size else None
        size = await self._entry_count(index, self._value_pattern, expiries_key=self._lru_exp_key)
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            size=size,
            evictions=self._evictions,
            corrupt_entries=self._corrupt + self._mirrors.corrupt,
            undeclared_entries=self._undeclared.count,
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

    async def _fetch_first(self, scope: str, digests: list[str]) -> SemanticHit | None:
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
            return self._hit(found[1], found[2], scope, digests[status - 1])
        self._miss(corrupt=status < 0)
        return None

    def _hit(self, data: bytes, left_ms: int, scope: str, digest: str) -> SemanticHit | None:
        """The hit of entry ``digest`` read as ``data`` with ``left_ms`` to live (-1: none)."""
        try:
            value = self._codec.decode(data)
        except UndeclaredTypeError as exc:
            self._undeclared.note(exc)
            self._miss()
            return None
        except CorruptEntryError:
            self._miss(corrupt=True)
            return None
        self._hits += 1
        left = int(left_ms)
        return SemanticHit(value, None if left < 0 else left / 1000, f"{scope}:{digest}")

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


def _same_server(first: Redis, second: Redis) -> bool:
    """Whether two clients talk to the same Redis server and database."""
    if first is second:
        return True
    mine = first.connection_pool.connection_kwargs
    theirs = second.connection_pool.connection_kwargs
    return all(mine.get(name) == theirs.get(name) for name in _SERVER_SETTINGS)


def _dimension_error(vector: UnitVector, stored: bytes) -> InvalidInputError:
    return InvalidInputError(
        f"embedding has dimension {vector.shape[0]}, but the entries of this cache in Redis "
        f"have dimension {stored.decode(errors='replace')}: another embedder uses the same "
        "key_prefix (clear() the cache to switch embedders, or use another key_prefix)"
    )
