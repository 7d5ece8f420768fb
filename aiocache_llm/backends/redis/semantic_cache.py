"""``RedisSemanticCache``: the semantic cache shared by every process on one Redis 7.

Plain Redis (no modules) holds the entries; every process keeps a numpy mirror of
the vectors of the scopes it looks up and searches it locally.

Keys, with ``p`` the key prefix, ``S`` a scope digest and ``D`` an entry digest
(both 64 hex characters)::

    p:s:S:vec     hash    D -> vector (float32, little-endian)
    p:s:S:exp     zset    D -> expiry (server ms), entries with a TTL only
    p:s:S:log     stream  changes: u=token o=a d=D v=vector x=expiry | u o=r d=D | u o=n
    p:s:S:v:D     string  the encoded value (SET PX with the entry's TTL)
    p:dim         string  the dimension of every vector of the cache
    p:lru         zset    "S:D" -> last use (server us), bounded caches only

A process syncs its mirror of scope ``S`` with one script call per ``get``: the log
entries after its cursor, or a full snapshot of the hash when the cursor was trimmed
from the log, the log was deleted or restarted, or catching up would cost more than
a snapshot (a large scope is scanned instead, then caught up from the log). Log
entries carry a random token, so a log deleted and restarted within the same
millisecond is never mistaken for the old one.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import count, repeat
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aiocache_llm.backends import vectors
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.backends.vectors import (
    CANDIDATES,
    EmbeddingAdapter,
    EmbedFn,
    UnitVector,
    VectorIndex,
    as_unit_vector,
    unit_rows,
)
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

_LUA_HELPERS = """
local function try(...)
    -- redis.pcall with an error (another type under one of our keys) turned into nil
    local reply = redis.pcall(...)
    if type(reply) == 'table' and reply.err then
        return nil
    end
    return reply
end

local function token_of(entry)
    -- the token of a log entry: its first field, 'u'
    local fields = entry[2]
    if fields[1] == 'u' and fields[2] then
        return fields[2]
    end
    return ''
end

local function changes_after(log_key, cursor, token, limit)
    -- the log entries after the cursor entry, or nil when that entry is not in the log
    -- any more (trimmed, log deleted or restarted) or more than `limit` follow it
    local changes = try('XRANGE', log_key, cursor, '+', 'COUNT', limit + 1)
    if changes and #changes > 0 and #changes <= limit and changes[1][1] == cursor
            and token_of(changes[1]) == token then
        return changes
    end
    return nil
end

local function log_length(vectors_key, floor)
    -- a log keeps enough changes for mirrors to catch up, about a quarter of the scope
    return math.max(floor, math.floor((try('HLEN', vectors_key) or 0) / 4))
end

local function remove_entry(base, digest, floor, token)
    -- remove entry `digest` of the scope whose keys start with `base` and log it;
    -- returns true if its vector was there
    local vectors_key = base .. ':vec'
    local removed = try('HDEL', vectors_key, digest)
    try('UNLINK', base .. ':v:' .. digest)
    try('ZREM', base .. ':exp', digest)
    if removed ~= 1 then
        return false
    end
    if (try('HLEN', vectors_key) or 0) == 0 then
        -- an empty scope leaves nothing behind; mirrors find the log gone and resync
        redis.call('UNLINK', base .. ':log', base .. ':exp')
    else
        try('XADD', base .. ':log', 'MAXLEN', '~', log_length(vectors_key, floor), '*',
            'u', token, 'o', 'r', 'd', digest)
    end
    return true
end
"""

SYNC = (
    """
-- Bring a process's mirror of one scope up to date, or answer an exact repeat at once.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] dimension (string), KEYS[5] value of the exact query (string), KEYS[6] recency (zset)
-- ARGV[1] cursor: id of the last log entry the mirror holds ('' = no mirror),
-- ARGV[2] that entry's token, ARGV[3] recency member ('' = unbounded cache),
-- ARGV[4] slack: log entries beyond the scope's size still worth fetching over a snapshot,
-- ARGV[5] token for the log entry written when a live scope's log must be restarted,
-- ARGV[6] most entries a snapshot may hold in this reply (larger scopes are scanned)
-- returns {now ms, dimension or '', mode, ...} with mode
--   'e', value                         the exact query is stored (LRU touched)
--   'd', last id, last token, changes  the log entries after the cursor (cursor excluded)
--   's', last id, last token, hgetall, zrange-withscores   a snapshot of the scope
--   'S', last id, last token           the scope is too large for one reply: scan it, then
--                                      fetch the changes after this id
--   'x'                                the exact query's value key holds another type
--   'c'                                the vectors key holds another type
"""
    + _LUA_HELPERS
    + """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dim = try('GET', KEYS[4]) or ''
local value = redis.pcall('GET', KEYS[5])
if type(value) == 'table' and value.err then
    return {now, dim, 'x'}
end
if value then
    if ARGV[3] ~= '' then
        try('ZADD', KEYS[6], 'XX', t[1] * 1000000 + t[2], ARGV[3])
    end
    return {now, dim, 'e', value}
end
local size = try('HLEN', KEYS[1])
if size == nil then
    return {now, dim, 'c'}
end
if ARGV[1] ~= '' then
    local changes = changes_after(KEYS[2], ARGV[1], ARGV[2], size + tonumber(ARGV[4]))
    if changes then
        local last = changes[#changes]
        table.remove(changes, 1)
        return {now, dim, 'd', last[1], token_of(last), changes}
    end
end
local last_id, last_token = '', ''
if size > 0 then
    local tail = try('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if tail and #tail > 0 then
        last_id, last_token = tail[1][1], token_of(tail[1])
    elseif tail then
        -- the log vanished under a live scope: restart it so later syncs are incremental
        last_token = ARGV[5]
        last_id = redis.call('XADD', KEYS[2], '*', 'u', last_token, 'o', 'n')
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl > 0 then
            redis.call('PEXPIRE', KEYS[2], ttl)
        end
    end
end
if size > tonumber(ARGV[6]) then
    return {now, dim, 'S', last_id, last_token}
end
local vectors = try('HGETALL', KEYS[1]) or {}
local expiries = try('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES') or {}
return {now, dim, 's', last_id, last_token, vectors, expiries}
"""
)

CHANGES = (
    """
-- Return the log entries of a scope after a cursor (for a mirror built by scanning).
-- KEYS[1] scope log (stream)
-- ARGV[1] cursor: id of the last log entry the mirror reflects, ARGV[2] its token,
-- ARGV[3] most entries worth fetching
-- returns {last id, last token, changes} (cursor excluded), or {} when the cursor
-- entry is no longer in the log or more than ARGV[3] entries follow it
"""
    + _LUA_HELPERS
    + """
local changes = changes_after(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]))
if not changes then
    return {}
end
local last = changes[#changes]
table.remove(changes, 1)
return {last[1], token_of(last), changes}
"""
)

FETCH = """
-- Return the value of the first candidate that still exists; mark it most recently used.
-- KEYS[1..n] candidate value keys (best first), KEYS[n+1] recency index (zset)
-- ARGV[1..n] the candidates' recency members ('S:D'), ARGV[n+1] '1' if the cache is bounded
-- returns {i, value} for the first existing candidate i, {-i} if candidate i holds
-- another type than a string, {0} if none exists
local n = #KEYS - 1
for i = 1, n do
    local value = redis.pcall('GET', KEYS[i])
    if type(value) == 'table' and value.err then
        return {-i}
    end
    if value then
        if ARGV[n + 1] == '1' then
            local t = redis.call('TIME')
            redis.pcall('ZADD', KEYS[n + 1], 'XX', t[1] * 1000000 + t[2], ARGV[i])
        end
        return {i, value}
    end
end
return {0}
"""

PUT = (
    """
-- Store one entry, reap a few expired entries of its scope, evict beyond max_size.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] entry value (string), KEYS[5] dimension (string), KEYS[6] recency index (zset)
-- ARGV[1] entry digest, ARGV[2] vector bytes, ARGV[3] encoded value, ARGV[4] ttl ms
-- ('0' = never), ARGV[5] dimension, ARGV[6] max entries ('0' = unbounded), ARGV[7] scope
-- digest, ARGV[8] key prefix, ARGV[9] log floor, ARGV[10] reap limit, ARGV[11] token
-- returns {1, entries evicted} once stored, or {0, stored dimension} (nothing written)
-- when the cache already holds vectors of another dimension
"""
    + _LUA_HELPERS
    + """
local dim = try('GET', KEYS[5])
if dim and tonumber(dim) and tonumber(dim) ~= tonumber(ARGV[5]) then
    return {0, dim}
end
if dim ~= ARGV[5] then
    redis.call('SET', KEYS[5], ARGV[5])
end
local function claim(key, kind)
    -- garbage of another type under one of our keys is replaced, never written into
    local found = redis.call('TYPE', key)['ok']
    if found ~= 'none' and found ~= kind then
        redis.call('UNLINK', key)
        return true
    end
    return false
end
if claim(KEYS[1], 'hash') then
    redis.call('UNLINK', KEYS[2], KEYS[3])
end
claim(KEYS[2], 'stream')
claim(KEYS[3], 'zset')
claim(KEYS[6], 'zset')

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local floor = tonumber(ARGV[9])
local bounded = tonumber(ARGV[6]) > 0
local written = 0
local function token()
    written = written + 1
    return ARGV[11] .. '.' .. written
end

local base = ARGV[8] .. ':s:' .. ARGV[7]
local expired = try('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[10])) or {}
for _, digest in ipairs(expired) do
    remove_entry(base, digest, floor, token())
    if bounded then
        redis.call('ZREM', KEYS[6], ARGV[7] .. ':' .. digest)
    end
end

local fresh = redis.call('EXISTS', KEYS[1]) == 0
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[4])
local expires = 0
if ttl > 0 then
    expires = now + ttl
    redis.call('SET', KEYS[4], ARGV[3], 'PX', ttl)
    redis.call('ZADD', KEYS[3], expires, ARGV[1])
else
    redis.call('SET', KEYS[4], ARGV[3])
    redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', log_length(KEYS[1], floor), '*',
    'u', token(), 'o', 'a', 'd', ARGV[1], 'v', ARGV[2], 'x', expires)

-- the scope's keys live as long as its longest-lived entry, or forever
local lifetime = -1
if ttl > 0 then
    lifetime = redis.call('PTTL', KEYS[1])
    if fresh or (lifetime >= 0 and lifetime < ttl) then
        lifetime = ttl
    end
end
for i = 1, 3 do
    if lifetime < 0 then
        redis.call('PERSIST', KEYS[i])
    else
        redis.call('PEXPIRE', KEYS[i], lifetime)
    end
end

local evicted = 0
if bounded then
    redis.call('ZADD', KEYS[6], t[1] * 1000000 + t[2], ARGV[7] .. ':' .. ARGV[1])
    local overflow = redis.call('ZCARD', KEYS[6]) - tonumber(ARGV[6])
    if overflow > 0 then
        local victims = redis.call('ZPOPMIN', KEYS[6], overflow)
        for i = 1, #victims, 2 do
            local scope, digest = string.match(victims[i], '^(%x+):(%x+)$')
            if scope and #scope == 64 and #digest == 64
                    and remove_entry(ARGV[8] .. ':s:' .. scope, digest, floor, token()) then
                evicted = evicted + 1
            end
        end
    end
end
return {1, evicted}
"""
)

INVALIDATE = (
    """
-- Remove one entry and log its removal.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] entry value (string), KEYS[5] recency index (zset)
-- ARGV[1] entry digest, ARGV[2] scope key base ('p:s:S'), ARGV[3] recency member,
-- ARGV[4] log floor, ARGV[5] token
-- returns 1 if a live entry was removed, else 0
"""
    + _LUA_HELPERS
    + """
local live = redis.call('EXISTS', KEYS[4])
remove_entry(ARGV[2], ARGV[1], tonumber(ARGV[4]), ARGV[5])
try('ZREM', KEYS[5], ARGV[3])
return live
"""
)

SYNC_SLACK = 64
"""Log entries beyond a scope's size a mirror still fetches rather than take a snapshot."""

LOG_FLOOR = SYNC_SLACK
"""Changes a scope's log keeps at least; it keeps a quarter of the scope's size if more.

A quarter bounds the log's memory to about a quarter of the vectors' while mirrors
that sync now and then still catch up change by change; a mirror further behind
takes a snapshot, as it would beyond the scope's size plus :data:`SYNC_SLACK` anyway.
"""

REAP_LIMIT = 16
"""Expired entries of its scope a put removes at most (each is O(d) and logged)."""

INLINE_SNAPSHOT_BYTES = 1 << 20
"""Largest scope (in vector bytes) sent whole in the sync reply; larger ones are scanned.

A script holds Redis for its whole run: 1 MiB keeps that to about a millisecond.
"""

SCAN_BATCH = 1000
"""Entries per HSCAN step when mirroring a large scope."""

MAX_MIRRORS = 1024
"""Scopes whose mirrors a process keeps; the least recently used beyond are dropped."""

_DIGEST = re.compile(rb"[0-9a-f]{64}")
_NO_CURSOR = (b"", b"")


class _Mirror:
    """This process's copy of one scope's vectors, as of log entry ``cursor``."""

    __slots__ = ("cursor", "index")

    def __init__(self, index: VectorIndex, cursor: tuple[bytes, bytes]) -> None:
        self.index = index
        self.cursor = cursor  # (stream id, token) of the last log entry applied


class _Snapshot:
    """A scope's vectors parsed from ``HGETALL`` + ``ZRANGE``; built off the loop if large."""

    __slots__ = ("corrupt", "index")

    def __init__(self, vectors: Sequence[bytes], expiries: Sequence[Any], dimension: int) -> None:
        width = 4 * dimension
        fields = list(vectors[0::2])
        blobs = list(vectors[1::2])
        corrupt = 0
        # one C-level pass each in the common case where everything is well formed
        if not (all(map(_DIGEST.fullmatch, fields)) and all(len(blob) == width for blob in blobs)):
            good = [
                i
                for i, (field, blob) in enumerate(zip(fields, blobs, strict=True))
                if _DIGEST.fullmatch(field) and len(blob) == width
            ]
            corrupt += len(fields) - len(good)
            fields = [fields[i] for i in good]
            blobs = [blobs[i] for i in good]
        raw = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(fields), dimension)
        matrix: npt.NDArray[np.float32] = raw.astype(np.float32, copy=True)
        usable = unit_rows(matrix)
        if not usable.all():
            corrupt += int((~usable).sum())
            matrix = matrix[usable]
            fields = [fields[row] for row in np.flatnonzero(usable).tolist()]
        expiry_ms: dict[bytes, float] = {}
        for member, score in zip(expiries[0::2], expiries[1::2], strict=False):
            try:
                expiry_ms[member] = float(score)
            except (TypeError, ValueError):
                corrupt += 1
        expiry = np.fromiter(
            map(expiry_ms.get, fields, repeat(math.inf)), dtype=np.float64, count=len(fields)
        )
        ids = list(map(bytes.decode, fields))
        self.index = VectorIndex.from_rows(ids, matrix, expiry)
        self.corrupt = corrupt


def _fields(raw: object) -> dict[bytes, bytes] | None:
    if not isinstance(raw, list) or len(raw) % 2:
        return None
    return dict(zip(raw[::2], raw[1::2], strict=True))


def _digest(raw: bytes | None) -> str | None:
    if raw is None or not _DIGEST.fullmatch(raw):
        return None
    return raw.decode("ascii")


def _expiry(raw: bytes | None) -> float | None:
    try:
        milliseconds = int(float(raw))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return math.inf if milliseconds == 0 else float(milliseconds)


def _vector(raw: bytes | None, dimension: int) -> UnitVector | None:
    if raw is None or len(raw) != 4 * dimension:
        return None
    try:
        return as_unit_vector(np.frombuffer(raw, dtype="<f4"), dimension)
    except InvalidInputError:
        return None


def _dimension_error(vector: UnitVector, stored: bytes) -> InvalidInputError:
    return InvalidInputError(
        f"embedding has dimension {vector.shape[0]}, but the entries of this cache in Redis "
        f"have dimension {stored.decode(errors='replace')}: another embedder uses the same "
        "key_prefix (clear() the cache to switch embedders, or use another key_prefix)"
    )


class RedisSemanticCache(RedisBackend):
    """Paraphrased request -> stored answer, shared through plain Redis 7.

    Answers every call like :class:`MemorySemanticCache` (drop-in): same scopes,
    similarity scale (cosine in [-1, 1], ``>= similarity_threshold`` is a hit,
    overridable per call), exact-repeat shortcut, TTLs and errors. Entries are shared
    by every process using the same ``key_prefix``; a process sees what another
    wrote, invalidated or cleared on its very next ``get``.

    Round trips: a ``get`` is one script call that syncs this process's mirror of the
    query's scope (or answers an exact repeat without embedding); with no candidate
    at or above the threshold it is a miss after that one call. Otherwise a second
    call takes the best few candidates and returns the first whose value still
    exists, so a hit is two round trips. ``put`` and ``invalidate`` are one call
    each; every call is atomic on the server. The vector search runs in numpy on
    the mirror, in a worker thread when the scope is large.

    Expiry follows the server clock: values carry ``PX``, vectors their expiry
    (masked in mirrors), and each put removes up to 16 expired vectors of its scope;
    a scope's keys expire with its longest-lived entry. ``max_size=None`` (or 0) is
    unbounded; a positive ``max_size`` keeps a global LRU index (a sorted set) that
    costs one index write per hit and put. ``dimension`` is checked across processes
    through ``{key_prefix}:dim``.

    Costs: Redis holds each vector about 1.25 times (the hash, plus a log trimmed to
    a quarter of the scope's entries but at least 64 changes); each process
    holds float32 copies of the scopes it queried (at most 1024 scopes, least
    recently used dropped). A mirror's first sync is a snapshot of its scope (O(n*d)
    bytes): inside the sync reply up to 1 MiB of vectors, else by HSCAN in batches of
    1000 followed by a replay of the changes logged meanwhile, so that no single
    call holds Redis for long. Later syncs transfer only the changes. ``stats().size`` is O(1) for a
    bounded cache (entries expired but not yet reaped included), O(keys in the
    database) with SCAN for an unbounded one.

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
        self._changes = self._redis.register_script(CHANGES)
        self._mirrors: OrderedDict[str, _Mirror] = OrderedDict()
        self._scanning: set[str] = set()  # scopes whose mirror a scan is building
        self._inline_snapshot_bytes = INLINE_SNAPSHOT_BYTES
        self._token_prefix = os.urandom(6).hex()
        self._tokens = count()
        self._log_floor = LOG_FLOOR
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._corrupt = 0
        self._snapshots = 0

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

        One round trip for an exact repeat or a miss, two for a semantic hit. An
        exact repeat, and any query of a scope with no entries, is answered without
        calling ``embed_fn``. Bad input (query, threshold, embedding) raises before
        anything stored changes; :class:`BackendError` when Redis fails.
        """
        self._check_open()
        threshold = self._threshold
        if similarity_threshold is not None:
            threshold = check_similarity("similarity_threshold", similarity_threshold)
        scope, text, digest = self._keys.semantic_parts(query)
        mirror = self._mirrors.get(scope)
        cursor = _NO_CURSOR if mirror is None else mirror.cursor
        reply = await self._sync_scope(scope, digest, cursor)
        now_ms, stored_dimension, mode = float(reply[0]), reply[1], reply[2]
        if mode == b"e":
            return self._decode(reply[3])
        if mode not in (b"d", b"s", b"S"):
            self._miss(corrupt=True)
            return None
        if mode == b"s" and not reply[5] and not reply[3]:
            # the scope holds nothing: a miss without an embedding, and no mirror kept
            if self._unchanged(scope, mirror, cursor):
                self._mirrors.pop(scope, None)
            self._miss()
            return None
        vector = await self._embedding.embed(text)
        self._check_open()
        self._embedding.check(vector)
        self._check_stored_dimension(vector, stored_dimension)
        index = await self._apply(scope, mirror, cursor, reply, vector.shape[0])
        candidates = (
            [] if index is None else await index.best_async(vector, CANDIDATES, now_ms, threshold)
        )
        if not candidates:
            self._miss()
            return None
        self._check_open()
        return await self._fetch_first(scope, [c.entry_id for c in candidates])

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
                    self._inline_snapshot_bytes // (4 * (self._embedding.dimension or 1024)),
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

    async def _apply(
        self,
        scope: str,
        sent_from: _Mirror | None,
        cursor: tuple[bytes, bytes],
        reply: list[Any],
        dimension: int,
    ) -> VectorIndex | None:
        """Bring the mirror of ``scope`` up to date with a SYNC reply; return what to search.

        A reply is applied only to the mirror state it was requested from: when a
        concurrent ``get`` moved the mirror meanwhile, the current mirror is searched
        as it is (it is at most as old as that other reply).
        """
        if not self._unchanged(scope, sent_from, cursor):
            return self._current(scope, dimension)
        mode, last = reply[2], (reply[3], reply[4])
        if mode == b"d":
            if sent_from is None:  # a delta always answers a mirror's cursor
                return None
            if sent_from.index.dimension != dimension:
                del self._mirrors[scope]  # vectors of another embedder: the next get resyncs
                return None
            self._apply_changes(sent_from.index, reply[5], dimension)
            sent_from.cursor = last
            self._mirrors.move_to_end(scope)
            return sent_from.index
        if mode == b"S":
            return await self._scan(scope, sent_from, cursor, last, dimension)
        return await self._install(scope, sent_from, cursor, reply[5], reply[6], last, dimension)

    async def _scan(
        self,
        scope: str,
        sent_from: _Mirror | None,
        cursor: tuple[bytes, bytes],
        start: tuple[bytes, bytes],
        dimension: int,
    ) -> VectorIndex | None:
        """Mirror a scope too large for one reply: HSCAN it, then replay the log.

        Each HSCAN step holds Redis for one batch only. Writes made while scanning
        may or may not show in what the scan returns, but each is logged after the
        log entry ``start`` (read before the scan began); replaying those entries
        in order over the scanned state gives exactly the state at the last one.
        Only one scan per scope runs at a time; meanwhile other lookups of the
        scope search what mirror there is (a miss when there is none).
        """
        if not start[0] or scope in self._scanning:
            return self._current(scope, dimension)
        base = f"{self._prefix}:s:{scope}"
        stored: dict[bytes, bytes] = {}  # HSCAN may return a field twice
        expiries: list[Any] = []
        self._scanning.add(scope)
        try:
            async for field, blob in self._redis.hscan_iter(f"{base}:vec", count=SCAN_BATCH):
                stored[field] = blob
            async for member, score in self._redis.zscan_iter(f"{base}:exp", count=SCAN_BATCH):
                expiries += (member, score)
            caught_up = await self._changes(
                keys=[f"{base}:log"], args=[start[0], start[1], len(stored) + SYNC_SLACK]
            )
        except redis_errors.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise backend_error(exc, "get") from exc
            self._corrupt += 1
            return None
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc
        finally:
            self._scanning.discard(scope)
        if not caught_up:  # the log moved on too far while scanning; the next get retries
            return self._current(scope, dimension)
        flat = [item for pair in stored.items() for item in pair]
        last = (caught_up[0], caught_up[1])
        return await self._install(
            scope, sent_from, cursor, flat, expiries, last, dimension, changes=caught_up[2]
        )

    async def _install(
        self,
        scope: str,
        sent_from: _Mirror | None,
        cursor: tuple[bytes, bytes],
        stored: list[Any],
        expiries: list[Any],
        last: tuple[bytes, bytes],
        dimension: int,
        *,
        changes: Sequence[Any] = (),
    ) -> VectorIndex | None:
        """Replace the mirror of ``scope`` with a parsed snapshot (plus later ``changes``)."""
        self._snapshots += 1
        # parsing costs a few microseconds per entry: beyond what fits in one sync
        # reply, it would hold the loop for milliseconds
        if (len(stored) // 2) * 4 * dimension > self._inline_snapshot_bytes:
            snapshot = await vectors.run_in_thread(_Snapshot, stored, expiries, dimension)
        else:
            snapshot = _Snapshot(stored, expiries, dimension)
        self._corrupt += snapshot.corrupt
        self._apply_changes(snapshot.index, changes, dimension)
        if not self._unchanged(scope, sent_from, cursor):
            return self._current(scope, dimension)
        self._mirrors[scope] = _Mirror(snapshot.index, last)
        self._mirrors.move_to_end(scope)
        while len(self._mirrors) > MAX_MIRRORS:
            self._mirrors.popitem(last=False)
        return snapshot.index

    def _unchanged(
        self, scope: str, sent_from: _Mirror | None, cursor: tuple[bytes, bytes]
    ) -> bool:
        current = self._mirrors.get(scope)
        return current is sent_from and (current is None or current.cursor == cursor)

    def _current(self, scope: str, dimension: int) -> VectorIndex | None:
        current = self._mirrors.get(scope)
        if current is None or current.index.dimension != dimension:
            return None
        return current.index

    def _apply_changes(self, index: VectorIndex, changes: Sequence[Any], dimension: int) -> None:
        for change in changes:
            fields = _fields(change[1]) if isinstance(change, list) and len(change) == 2 else None
            op = None if fields is None else fields.get(b"o")
            if fields is None or op not in (b"a", b"r", b"n"):
                self._corrupt += 1
                continue
            if op == b"n":
                continue
            digest = _digest(fields.get(b"d"))
            if digest is None:
                self._corrupt += 1
                continue
            if op == b"r":
                index.remove(digest)
                continue
            vector = _vector(fields.get(b"v"), dimension)
            expiry = _expiry(fields.get(b"x"))
            if vector is None or expiry is None:
                self._corrupt += 1
                index.remove(digest)  # whatever the entry held before is superseded
                continue
            index.upsert(digest, vector, expiry)

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` under the query's scope and the embedding of its last user message.

        One round trip, after the query, value and embedding are validated: bad input
        raises and leaves Redis unchanged, and so does an embedding whose dimension
        differs from the vectors already stored by any process.
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
        """Delete this cache's keys (SCAN + UNLINK, never KEYS) and this process's mirrors; O(N).

        Only ``{key_prefix}:s:<scope>:*``, ``{key_prefix}:dim`` and ``{key_prefix}:lru``
        are deleted: other keys, nested prefixes such as ``{key_prefix}:v2`` included,
        stay. Not atomic: a put racing with ``clear`` may survive it.
        """
        self._check_open()
        self._mirrors.clear()
        await self._delete_matching(self._scope_pattern)
        try:
            await self._redis.unlink(self._dim_key, self._lru_key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc

    async def stats(self) -> CacheStats:
        """Return this process's counters and the number of entries held in Redis."""
        self._check_open()
        try:
            if self._max_size:
                size = await self._redis.zcard(self._lru_key)
            else:
                size = 0
                async for _ in self._redis.scan_iter(match=self._value_pattern, count=1000):
                    size += 1
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "stats") from exc
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            size=size,
            evictions=self._evictions,
            corrupt_entries=self._corrupt,
        )

    def _token(self) -> str:
        return f"{self._token_prefix}{next(self._tokens):x}"

    async def _release(self) -> None:
        self._mirrors.clear()
        await super()._release()
