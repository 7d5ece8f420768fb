"""``RedisExactCache``: the exact cache shared by every process that uses the same key prefix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aiocache_llm.backends.redis.batching import GetBatcher
from aiocache_llm.backends.redis.cluster import (
    execute_during_migration,
    has_hash_tag,
    is_slot_in_motion,
    scan_keys,
)
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES, UndeclaredTypes, ValueCodec
from aiocache_llm.core.errors import (
    BackendError,
    CorruptEntryError,
    InvalidInputError,
    UndeclaredTypeError,
)
from aiocache_llm.core.query import Normalizer, Query, QueryKeys
from aiocache_llm.core.stats import CacheStats
from aiocache_llm.core.validation import check_optional_positive_number, check_size_limit

__all__ = ["RedisExactCache"]

GET_AND_TOUCH = """
-- Read an entry of a bounded cache and mark it most recently used.
-- KEYS[1] entry key, KEYS[2] recency index (zset: entry key -> use tick),
-- KEYS[3] use tick counter (a tick, unlike a timestamp, never ties),
-- KEYS[4] expiry index (zset: entry key -> expiry in server ms)
-- returns the stored bytes, nil on a miss (the entry is dropped from both indexes), or
-- {0} when the entry key holds another Redis type (someone else's data: a miss)
-- Index keys of another type are left for the next put to replace: a read never fails
-- because of them, it only skips the touch.
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' then
    redis.pcall('ZREM', KEYS[2], KEYS[1])
    redis.pcall('ZREM', KEYS[4], KEYS[1])
    return {0}
end
if value then
    local tick = redis.pcall('INCR', KEYS[3])
    if type(tick) == 'number' then
        redis.pcall('ZADD', KEYS[2], 'XX', tick, KEYS[1])
    end
else
    redis.pcall('ZREM', KEYS[2], KEYS[1])
    redis.pcall('ZREM', KEYS[4], KEYS[1])
end
return value
"""

_BOUNDED_HELPERS = """
local function claim(key, kind)
    -- an index key holding someone else's data is replaced, never written into
    local found = redis.call('TYPE', key)['ok']
    if found ~= 'none' and found ~= kind then
        redis.call('UNLINK', key)
    end
end

local function is_entry(member, entry_prefix)
    -- only '{key_prefix}:<64-character digest>' members name entries of this cache
    return #member == #entry_prefix + 64 and string.sub(member, 1, #entry_prefix) == entry_prefix
end
"""

PUT_BOUNDED = (
    """
-- Store an entry of a bounded cache; drop expired entries, then evict the least
-- recently used beyond the bound.
-- KEYS[1] entry key, KEYS[2] recency index (zset: entry key -> use tick),
-- KEYS[3] use tick counter, KEYS[4] expiry index (zset: entry key -> expiry, server ms)
-- ARGV[1] encoded value, ARGV[2] ttl in ms ('0' = none), ARGV[3] max entries,
-- ARGV[4] entry key prefix ('{key_prefix}:'): only index members that are such a prefix
-- and a 64-character digest are deleted, whatever else someone wrote into the indexes,
-- ARGV[5] expired entries reaped at most beyond what the bound needs
-- returns the number of live entries evicted (expired ones reaped are not counted)
-- Index keys holding someone else's data are replaced, never written into: an index of
-- another type is dropped (its entries stay until they expire or are overwritten), a
-- tick that is not a number restarts above the highest tick in the index.
"""
    + _BOUNDED_HELPERS
    + """
claim(KEYS[2], 'zset')
claim(KEYS[4], 'zset')
local tick = redis.pcall('INCR', KEYS[3])
if type(tick) ~= 'number' then
    local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
    tick = math.floor(tonumber(newest[2]) or 0) + 1
    redis.call('SET', KEYS[3], tick)
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[2] == '0' then
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[4], KEYS[1])
else
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[2]), KEYS[1])
end
redis.call('ZADD', KEYS[2], tick, KEYS[1])
local overflow = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
-- an expired entry still holds a slot until it is reaped: reap before evicting, as
-- many as the bound needs plus a few, so a live entry never goes while one is left
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now,
    'LIMIT', 0, math.max(overflow, 0) + tonumber(ARGV[5]))
for _, member in ipairs(expired) do
    redis.call('ZREM', KEYS[4], member)
    if redis.call('ZREM', KEYS[2], member) == 1 then
        overflow = overflow - 1
    end
    if is_entry(member, ARGV[4]) then
        redis.call('UNLINK', member)
    end
end
if overflow <= 0 then
    return 0
end
local victims = redis.call('ZPOPMIN', KEYS[2], overflow)
for i = 1, #victims, 2 do
    local victim = victims[i]
    redis.call('ZREM', KEYS[4], victim)
    if is_entry(victim, ARGV[4]) then
        redis.call('UNLINK', victim)
    end
end
return overflow
"""
)

DROP_ENTRIES = """
-- Delete entries of a bounded cache together with their index members (clear, a batch).
-- KEYS[1] recency index (zset), KEYS[2] expiry index (zset), KEYS[3..n] entry keys
-- returns the number of entry keys deleted
-- An entry and its members go in one step: a put racing clear() leaves its entry
-- either deleted or still indexed, never stored but unknown to the bound.
local entries = {unpack(KEYS, 3)}
redis.pcall('ZREM', KEYS[1], unpack(entries))
redis.pcall('ZREM', KEYS[2], unpack(entries))
return redis.call('UNLINK', unpack(entries))
"""

PRUNE_INDEX = (
    """
-- Drop index members whose entry is gone; remove the index keys once nothing is left.
-- KEYS[1] recency index (zset), KEYS[2] use tick counter, KEYS[3] expiry index (zset)
-- ARGV[1] entry key prefix, ARGV[2..n] members of the recency index to check
-- returns the number of members dropped
-- Entries put while clear() ran are kept, with their members (and the tick counter,
-- so that later puts stay the most recently used).
"""
    + _BOUNDED_HELPERS
    + """
local dropped = 0
for i = 2, #ARGV do
    local member = ARGV[i]
    if not is_entry(member, ARGV[1]) or redis.call('EXISTS', member) == 0 then
        dropped = dropped + (tonumber(redis.pcall('ZREM', KEYS[1], member)) or 0)
        redis.pcall('ZREM', KEYS[3], member)
    end
end
local left = redis.pcall('ZCARD', KEYS[1])
if left == 0 or type(left) ~= 'number' then
    redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
end
return dropped
"""
)

REAP_LIMIT = 16
"""Expired entries a bounded put reaps at most, beyond those its bound needs."""

_CLEAR_BATCH = 500
_HEX = "[0-9a-f]"
_INDEX_SUFFIX = "lru"
_WRONG_TYPE: list[Any] = [0]  # what GET_AND_TOUCH answers for a key of another type


def _is_wrong_type(exc: BaseException | None) -> bool:
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("WRONGTYPE")


class RedisExactCache(RedisBackend):
    """Identical request -> stored answer, shared through Redis.

    Answers every call like :class:`MemoryExactCache` (drop-in), with the entries in
    Redis under ``{key_prefix}:{signature}``. Each ``get``/``put``/``invalidate`` is
    one round trip and atomic on the server; concurrent ``get``s of an unbounded
    cache share round trips (one ``MGET`` per batch, see :class:`GetBatcher`), while
    a lone ``get`` is sent at once. Values are ``SET`` with ``PX`` expiry
    (``ttl_seconds`` default, overridden per put; None = never).

    ``max_size=None`` (or 0) leaves the size unbounded: Redis's own ``maxmemory``
    policy is the only bound. A positive ``max_size`` keeps an exact LRU bound with
    a recency index (a sorted set ``{key_prefix}:lru`` scored by a use counter
    ``{key_prefix}:lru:tick``) and an expiry index (``{key_prefix}:lru:exp``: the
    entries with a TTL, scored by their expiry on the server's clock) maintained by
    Lua scripts. As in :class:`MemoryExactCache`, entries that have expired give up
    their slots before a live entry is evicted: each put reaps the expired entries
    the bound needs, plus up to :data:`REAP_LIMIT`. It costs one index write per hit.

    On a Redis Cluster (``client=RedisCluster(...)`` or a cluster ``url=``) every call
    keeps its contract: an unbounded cache's entries spread over every primary
    (concurrent gets go out as one ``MGET`` per slot, ``clear()`` and ``size`` SCAN
    every primary); a bounded cache's scripts touch an entry and the indexes together,
    so its ``key_prefix`` must hold a hash tag (``"{llm-cache}"``; else
    :class:`InvalidInputError`) and the whole cache lives in that tag's slot: the LRU
    bound stays exact, on one primary.

    Hits and misses are counted per process; ``size`` is read from Redis and counts
    live entries only: O(log n) for a bounded cache, O(keys in the database) with
    SCAN for an unbounded one. Data under our keys that this library
    did not write is a miss, counted in ``corrupt_entries``, never decoded further (a
    value of a model type not declared in ``value_types=`` is a miss counted in
    ``undeclared_entries`` instead, and logged once per type);
    so is a key of another Redis type (uncounted when read in a batch: ``MGET``
    answers nil for it), which the next put replaces. Foreign data under the index
    keys never fails a call: reads skip the touch, the next put replaces them.
    Driver errors become :class:`BackendUnavailableError`/:class:`BackendError`.
    Cancelling a call may leave its command executed or not, never half executed.
    """

    supports_cluster = True

    def __init__(
        self,
        *,
        url: str | None = None,
        client: Redis | None = None,
        ttl_seconds: float | None = None,
        key_prefix: str = "aiocache_llm:exact",
        max_size: int | None = None,
        normalize: Normalizer | None = None,
        value_types: Iterable[type[BaseModel]] = (),
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self._max_size = check_size_limit("max_size", max_size, allow_none=True) or 0
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        self._keys = QueryKeys(normalize)
        self._codec = ValueCodec(value_types, max_value_bytes=max_value_bytes)
        super().__init__(url=url, client=client, key_prefix=key_prefix)
        if self._cluster is not None and self._max_size and not has_hash_tag(self._prefix):
            raise InvalidInputError(
                "a bounded RedisExactCache on a Redis Cluster needs a key_prefix holding a "
                f"hash tag, e.g. '{{{self._prefix}}}': its entries and LRU index are "
                "updated together by one script, so they must share a hash slot"
            )
        self._index_key = f"{self._prefix}:{_INDEX_SUFFIX}"
        self._expiries_key = f"{self._index_key}:exp"
        # recency index, use tick counter, expiry index: KEYS[2..4] of the scripts
        self._index_keys = (self._index_key, f"{self._index_key}:tick", self._expiries_key)
        # entry keys end in a 64-character hex digest; other keys under the prefix do
        # not. `?` would match any character, colons included, and so other objects'
        # keys such as `{prefix}:chat:<59 characters>`: each position is a hex class.
        self._entry_prefix = f"{self._prefix}:"
        self._entry_pattern = self._entry_prefix + _HEX * 64
        self._reads = GetBatcher(self._redis)
        self._get_and_touch = self._redis.register_script(GET_AND_TOUCH)
        self._put_bounded = self._redis.register_script(PUT_BOUNDED)
        self._drop_entries = self._redis.register_script(DROP_ENTRIES)
        self._prune_index = self._redis.register_script(PRUNE_INDEX)
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._corrupt = 0
        self._undeclared = UndeclaredTypes()

    def __repr__(self) -> str:
        bound = self._max_size or "unbounded"
        return (
            f"RedisExactCache(key_prefix={self._prefix!r}, max_size={bound}, "
            f"ttl_seconds={self._ttl}, hits={self._hits}, misses={self._misses})"
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

    def key(self, query: Query) -> str:
        """Return the Redis key of ``query``: ``{key_prefix}:{signature}``."""
        return f"{self._prefix}:{self._keys.digest(query)}"

    async def get(self, query: Query) -> Any | None:
        """Return the value stored for ``query`` (a fresh copy if mutable) or ``None``.

        One round trip. Raises :class:`BackendError` (or its subclass
        :class:`BackendUnavailableError`) when Redis fails; bad input raises before
        any I/O.
        """
        return await self.get_by_signature(self._keys.digest(query))

    async def get_by_signature(self, digest: str) -> Any | None:
        """:meth:`get` for a digest already computed with :meth:`signature`."""
        self._check_open()
        key = f"{self._prefix}:{digest}"
        try:
            await self._ready()
            if self._max_size:
                data = await self._get_and_touch(keys=[key, *self._index_keys])
            else:
                data = await self._reads.get(key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc
        except BackendError as exc:  # mapped by the read batcher
            if not _is_wrong_type(exc.__cause__):
                raise
            data = _WRONG_TYPE
        return self._decode(data)

    def _decode(self, data: bytes | list[Any] | None) -> Any | None:
        if data is None:
            self._misses += 1
            return None
        try:
            if not isinstance(data, bytes):  # the key holds a list, hash, ...: not ours
                raise CorruptEntryError("another Redis type is stored under the entry's key")
            value = self._codec.decode(data)
        except UndeclaredTypeError as exc:
            self._undeclared.note(exc)
            self._misses += 1
            return None
        except CorruptEntryError:
            self._corrupt += 1
            self._misses += 1
            return None
        self._hits += 1
        return value

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` for ``query`` with ``SET ... PX``; one round trip.

        The value is validated and encoded before any I/O, so bad input raises and
        leaves Redis unchanged.
        """
        await self.put_by_signature(self._keys.digest(query), value, ttl_seconds=ttl_seconds)

    async def put_by_signature(
        self, digest: str, value: Any, *, ttl_seconds: float | None = None
    ) -> None:
        """:meth:`put` for a digest already computed with :meth:`signature`."""
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds) or self._ttl
        key = f"{self._prefix}:{digest}"
        data = self._codec.encode(value)
        ttl_ms = max(1, round(ttl * 1000)) if ttl is not None else None
        try:
            await self._ready()
            if self._max_size:
                evicted = await self._put_bounded(
                    keys=[key, *self._index_keys],
                    args=[data, ttl_ms or 0, self._max_size, self._entry_prefix, REAP_LIMIT],
                )
                self._evictions += int(evicted)
            else:
                await self._set(key, data, ttl_ms)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "put") from exc

    async def _set(self, key: str, data: bytes, ttl_ms: int | None) -> None:
        """``SET key data [PX ttl_ms]``; on a cluster, through a slot migration.

        redis-py can exhaust its redirections for a key already migrated (it sends
        ``ASKING`` on another connection than the ``SET``): the ``SET`` did not run,
        and is sent again with ``ASKING`` on its own connection
        (:func:`execute_during_migration`, bounded by ``SLOT_IN_MOTION_GET_DEADLINE_S``).
        """
        client: Redis | RedisCluster = self._redis  # a RedisCluster on a cluster
        try:
            await client.set(key, data, px=ttl_ms)
        except DRIVER_ERRORS as exc:
            if not isinstance(client, RedisCluster) or not is_slot_in_motion(exc):
                raise
            command = ("SET", key, data) + (("PX", ttl_ms) if ttl_ms is not None else ())
            await execute_during_migration(client, key, command)

    async def invalidate(self, query: Query) -> bool:
        """Delete the entry of ``query``; return whether one was there. One round trip."""
        self._check_open()
        return await self.invalidate_by_signature(self._keys.digest(query))

    async def invalidate_by_signature(self, digest: str) -> bool:
        """:meth:`invalidate` for a digest already computed with :meth:`signature`."""
        self._check_open()
        key = f"{self._prefix}:{digest}"
        try:
            await self._ready()
            if self._max_size:
                # one slot on a cluster too: a bounded cache's keys share its hash tag
                async with self._redis.pipeline(transaction=True) as pipe:
                    # execute_command: a cluster pipeline's unlink() is a coroutine, never queued
                    pipe.execute_command("UNLINK", key)
                    pipe.zrem(self._index_key, key)
                    pipe.zrem(self._expiries_key, key)
                    # an index of another type fails its ZREM only: the next put replaces it
                    removed, _, _ = await pipe.execute(raise_on_error=False)
                if isinstance(removed, BaseException):
                    raise removed
            else:
                removed = await self._redis.unlink(key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "invalidate") from exc
        return bool(removed)

    async def clear(self) -> None:
        """Delete this cache's entries and indexes (SCAN + UNLINK, never KEYS); O(N).

        Only ``{key_prefix}:<64-character hex digest>`` keys and the index keys are
        deleted: other keys, nested prefixes such as ``{key_prefix}:v2`` and other
        objects' keys under ``{key_prefix}:`` included, stay. Not atomic: an entry
        put while it runs may survive it. In a bounded cache such an entry stays in
        the indexes (counted and evictable): each batch of entries is deleted with
        their index members in one script, then members whose entry is gone are
        dropped, and the index keys go once nothing is left in them.
        """
        self._check_open()
        if not self._max_size:
            await self._delete_matching(self._entry_pattern, batch=_CLEAR_BATCH)
            return
        try:
            await self._ready()
            batch: list[bytes] = []
            # every primary of a cluster (the entries all live on the tag's one)
            scan = scan_keys(self._cluster or self._redis, self._entry_pattern, count=_CLEAR_BATCH)
            async for keys in scan:
                batch.extend(keys)
                if len(batch) >= _CLEAR_BATCH:
                    await self._drop_entries(keys=[self._index_key, self._expiries_key, *batch])
                    batch.clear()
            if batch:
                await self._drop_entries(keys=[self._index_key, self._expiries_key, *batch])
            await self._prune()
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc

    async def _prune(self) -> None:
        """Drop recency index members whose entry is gone (ZSCAN in batches)."""
        members: list[bytes] = []
        try:
            async for member, _ in self._redis.zscan_iter(self._index_key, count=_CLEAR_BATCH):
                members.append(member)
        except redis_errors.ResponseError as exc:
            if not _is_wrong_type(exc):
                raise
            # someone else's data under the index key: PRUNE_INDEX drops it
        for start in range(0, max(len(members), 1), _CLEAR_BATCH):
            await self._prune_index(
                keys=list(self._index_keys),
                args=[self._entry_prefix, *members[start : start + _CLEAR_BATCH]],
            )

    async def stats(self) -> CacheStats:
        """Return this process's hits and misses and the number of live entries in Redis."""
        self._check_open()
        index = self._index_key if self._max_size else None
        size = await self._entry_count(index, self._entry_pattern, expiries_key=self._expiries_key)
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            size=size,
            evictions=self._evictions,
            corrupt_entries=self._corrupt,
            undeclared_entries=self._undeclared.count,
        )

    async def _release(self) -> None:
        await self._reads.aclose()
        await super()._release()
