"""What every Redis backend shares: the client it talks through and the error boundary.

A backend is given either ``url=`` (it builds and owns a client, closed by
``aclose()``) or ``client=`` (a ``redis.asyncio.Redis`` the application owns and
closes). Every redis-py error is mapped here to the library's own hierarchy with
``raise backend_error(exc, ...) from exc``, so callers never see driver exceptions.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocache_llm.core.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidInputError,
    InvalidInputTypeError,
)
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.validation import check_key_prefix

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "LIVE_ENTRIES",
    "DEFAULT_SOCKET_TIMEOUT",
    "DRIVER_ERRORS",
    "RedisBackend",
    "backend_error",
    "bind_to_running_loop",
]

DEFAULT_SOCKET_TIMEOUT = 5.0
"""Seconds a client built from ``url=`` waits to connect, for each reply, and for a free
connection of its pool."""

DEFAULT_MAX_CONNECTIONS = 64
"""Connections a client built from ``url=`` opens at most; more callers wait their turn."""

DRIVER_ERRORS: tuple[type[BaseException], ...] = (redis_errors.RedisError, OSError)
"""What a Redis call may raise besides cancellation; caught only at the backend boundary."""

LIVE_ENTRIES = """
-- Count the live entries of a bounded cache.
-- KEYS[1] recency index (zset: one member per entry),
-- KEYS[2] expiry index (zset: entry -> expiry in server ms; entries with a TTL only)
-- returns the index's size less the entries whose expiry has passed but that no put
-- has reaped yet (0 when the index holds another Redis type)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local size = redis.pcall('ZCARD', KEYS[1])
if type(size) ~= 'number' then
    return 0
end
local expired = redis.pcall('ZCOUNT', KEYS[2], '-inf', now)
if type(expired) ~= 'number' then
    expired = 0
end
return math.max(0, size - expired)
"""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # includes BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica promoted mid-failover
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    OSError,
)


def _pool_options() -> dict[str, Any]:
    """Options for pools we build that only some redis-py versions know."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # redis-py < 7: no maintenance notifications, nothing to turn off
        return {}
    # with notifications on ("auto" by default), redis-py hands out idle pooled sockets
    # without checking them: after a server restart each would fail its next command
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


_POOL_OPTIONS = _pool_options()


def backend_error(exc: BaseException, operation: str) -> BackendError:
    """Return the library error for a driver error raised during ``operation``."""
    message = f"redis {operation} failed: {type(exc).__name__}: {exc}"
    # redis-py derives AuthenticationError from ConnectionError, but a wrong password
    # is a configuration error that no retry will cure, not an unreachable server
    if isinstance(exc, _UNAVAILABLE) and not isinstance(exc, redis_errors.AuthenticationError):
        return BackendUnavailableError(message)
    return BackendError(message)


_POOL_LOOPS: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()


def bind_to_running_loop(client: Redis) -> None:
    """Let ``client`` serve the running event loop; call it inside a coroutine. O(1).

    A connection belongs to the event loop that opened it. When the client is used
    from another loop (a second ``asyncio.run``, a loop per job or per test), its pool
    forgets the old loop's connections: they cannot be closed from here (their loop
    may be gone), their sockets are freed when they are collected, and new ones are
    opened on demand. The pool's lock (and condition) are replaced too: one held by a
    loop that ended would never be released.
    """
    pool = client.connection_pool
    loop = asyncio.get_running_loop()
    bound = _POOL_LOOPS.get(pool)
    if bound is loop:
        return
    _POOL_LOOPS[pool] = loop
    if bound is None:
        return
    pool.reset()  # type: ignore[no-untyped-call]
    if hasattr(pool, "_lock"):
        pool._lock = asyncio.Lock()
    if hasattr(pool, "_condition"):
        pool._condition = asyncio.Condition()


class RedisBackend(AsyncResource):
    """Base of the Redis backends: client ownership, key prefix and ``aclose()``.

    Every operation may run in any event loop: the first one in a new loop rebinds
    the client's pool to it (:func:`bind_to_running_loop`).
    """

    def __init__(self, *, url: str | None, client: Redis | None, key_prefix: str) -> None:
        self._prefix = check_key_prefix(key_prefix)
        if (url is None) == (client is None):
            raise InvalidInputError("pass exactly one of url= or client=")
        if client is not None:
            if not isinstance(client, Redis):
                raise InvalidInputTypeError(
                    f"client must be a redis.asyncio.Redis, got {type(client).__name__}"
                )
            kwargs: dict[str, Any] = client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                raise InvalidInputError(
                    "client must be created with decode_responses=False: "
                    "stored values and vectors are bytes"
                )
            self._redis = client
            self._owns_client = False
        else:
            if not isinstance(url, str) or not url:
                raise InvalidInputError("url must be a non-empty redis:// or rediss:// URL")
            try:
                # a blocking pool: a burst beyond the pool waits for a connection
                # instead of failing with MaxConnectionsError
                pool = BlockingConnectionPool.from_url(
                    url,
                    max_connections=DEFAULT_MAX_CONNECTIONS,
                    timeout=DEFAULT_SOCKET_TIMEOUT,
                    decode_responses=False,
                    socket_timeout=DEFAULT_SOCKET_TIMEOUT,
                    socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT,
                    # never resend a command whose reply was lost: a chat append or a
                    # limiter grant would be applied twice (failures are handled above us)
                    retry=Retry(NoBackoff(), 0),
                    **_POOL_OPTIONS,
                )
                self._redis = Redis.from_pool(pool)
            except ValueError as exc:
                raise InvalidInputError(f"invalid Redis url {url!r}: {exc}") from exc
            self._owns_client = True

    def _check_open(self) -> None:
        super()._check_open()
        bind_to_running_loop(self._redis)

    @property
    def key_prefix(self) -> str:
        """Every key this backend writes starts with ``key_prefix + ":"``."""
        return self._prefix

    @property
    def client(self) -> Redis:
        """The ``redis.asyncio.Redis`` client this backend talks through."""
        return self._redis

    async def _release(self) -> None:
        if self._owns_client:
            bind_to_running_loop(self._redis)  # another loop's connections cannot be closed
            await self._redis.aclose()

    async def _entry_count(
        self, index_key: str | None, pattern: str, *, expiries_key: str | None = None
    ) -> int:
        """How many live entries the backend holds.

        A bounded cache counts its index: O(log n) with ``LIVE_ENTRIES`` (its size
        less the entries whose expiry in ``expiries_key`` has passed on the server's
        clock), O(1) with a plain ``ZCARD`` when it keeps no expiries. An unbounded
        one counts the keys matching ``pattern`` with SCAN: O(keys in the database).
        """
        try:
            if index_key is not None and expiries_key is not None:
                live = self._redis.register_script(LIVE_ENTRIES)
                return int(await live(keys=[index_key, expiries_key]))
            if index_key is not None:
                count: int = await self._redis.zcard(index_key)
                return count
            count = 0
            async for _ in self._redis.scan_iter(match=pattern, count=1000):
                count += 1
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "stats") from exc
        return count

    async def _delete_matching(
        self, pattern: str, *, batch: int = 500, keep: re.Pattern[bytes] | None = None
    ) -> int:
        """Delete the keys matching the glob ``pattern`` with SCAN (never KEYS).

        With ``keep``, only the keys that also match that regular expression in full
        are deleted (a glob cannot say "one of these suffixes"). O(N) in the
        database's key count, in steps of ``batch`` keys, each step one SCAN and one
        UNLINK; returns how many keys were removed.
        """
        removed = 0
        pending: list[bytes] = []
        try:
            async for key in self._redis.scan_iter(match=pattern, count=batch):
                if keep is not None and not keep.fullmatch(key):
                    continue
                pending.append(key)
                if len(pending) >= batch:
                    removed += await self._redis.unlink(*pending)
                    pending.clear()
            if pending:
                removed += await self._redis.unlink(*pending)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc
        return removed
