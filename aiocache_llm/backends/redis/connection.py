"""What every Redis backend shares: the client it talks through and the error boundary.

A backend is given either ``url=`` (it builds and owns a client, closed by
``aclose()``) or ``client=`` (a ``redis.asyncio.Redis``, Sentinel-managed ones
included, or a ``redis.asyncio.cluster.RedisCluster``, that the application owns and
closes). The URL forms (see :func:`client_from_url`):

- ``redis://`` / ``rediss://`` / ``unix://``: one server (redis-py's own form);
- ``redis+cluster://host:port[,host:port...][?options]`` (``rediss+cluster://`` for
  TLS), or a single-server URL with ``?cluster=true``: a Redis Cluster, the hosts
  being startup nodes (the ``limits`` and RedisVL conventions);
- ``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]``
  (``rediss+sentinel://`` for TLS to the servers): the primary that the sentinels
  name for ``service_name``, found again after a failover.

Every redis-py error is mapped here to the library's own hierarchy with
``raise backend_error(exc, ...) from exc``, so callers never see driver exceptions.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from typing import Any, TypeAlias, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from aiocache_llm.backends.redis.cluster import is_slot_in_motion, scan_keys, unlink_keys
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
    "RedisClient",
    "backend_error",
    "bind_to_running_loop",
    "client_from_url",
    "ensure_ready",
    "is_cluster",
    "request_topology_refresh",
]

RedisClient: TypeAlias = Redis | RedisCluster
"""What a Redis backend talks through: one server (or a Sentinel-managed primary), or a Cluster."""

DEFAULT_SOCKET_TIMEOUT = 5.0
"""Seconds a client built from ``url=`` waits to connect, for each reply, and for a free
connection of its pool."""

DEFAULT_MAX_CONNECTIONS = 64
"""Connections a client built from ``url=`` opens at most; more callers wait their turn."""

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.RedisError,
    OSError,
    # not a RedisError: raised by the cluster client (no node reachable, a slot that
    # no node serves, topology errors)
    redis_errors.RedisClusterException,
)
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
    redis_errors.TryAgainError,  # a multi-key command during a slot migration
    redis_errors.ClusterDownError,
    # redirections left after the client's own (a resharding or failover in progress)
    redis_errors.AskError,  # MovedError included
    redis_errors.SlotNotCoveredError,
    OSError,
)

_CLUSTER_UNREACHABLE = ("cannot be connected", "reachable", "No cluster nodes")


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
    if is_slot_in_motion(exc):  # a resharding's redirections ran out: transient
        return BackendUnavailableError(message)
    if isinstance(exc, redis_errors.RedisClusterException) and any(
        words in str(exc) for words in _CLUSTER_UNREACHABLE
    ):
        return BackendUnavailableError(message)
    return BackendError(message)


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a ``redis.asyncio.cluster.RedisCluster``."""
    return isinstance(client, RedisCluster)


_INITIALIZE_ERRORS: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, AttributeError)
"""What ``RedisCluster.initialize()`` may raise: AttributeError is the driver's own state
mid-reset (a connection not made yet), never ours."""

_READY_LOCKS: weakref.WeakKeyDictionary[
    RedisCluster, tuple[asyncio.AbstractEventLoop, asyncio.Lock]
]
_READY_LOCKS = weakref.WeakKeyDictionary()


def _has_topology(client: RedisCluster) -> bool:
    """Whether ``client`` has a slot map to route by (its first ``initialize()`` is done).

    Not ``_initialize``: redis-py sets that flag again to ask for a refresh after an
    error (ours too: :func:`request_topology_refresh`), and the refresh it asks for is
    run by the driver itself, paced, while the current map keeps serving. Waiting here
    for that refresh would make every command, healthy nodes' included, queue behind it.
    """
    ready = getattr(client, "_topology_ready", None)
    if ready is not None:  # redis-py >= 8: set once a refresh has finished, cleared by aclose()
        return bool(ready)
    return not getattr(client, "_initialize", False)


async def ensure_ready(client: RedisClient) -> None:
    """Initialize a cluster client once before it serves concurrent commands; O(1) after.

    A fresh ``RedisCluster`` (redis-py 8) whose first commands run concurrently may fail
    some of them inside the driver (``AttributeError`` on a connection not yet made);
    one ``initialize()``, under a lock per client and event loop, fetches the topology
    first. A client that asks for a new topology later (after a failover) refreshes
    it on its own, without this lock: a command is never held here behind a refresh
    (a healthy node's callers would wait on a failed node's). A plain client needs
    nothing. Raises :class:`BackendError`.
    """
    if not isinstance(client, RedisCluster):
        return
    if _has_topology(client):
        return
    loop = asyncio.get_running_loop()
    held = _READY_LOCKS.get(client)
    if held is None or held[0] is not loop:
        held = _READY_LOCKS[client] = (loop, asyncio.Lock())
    async with held[1]:
        if _has_topology(client):
            return
        try:
            await client.initialize()
        except _INITIALIZE_ERRORS as exc:
            raise backend_error(exc, "connect") from exc


def request_topology_refresh(client: RedisCluster, failed_node: str | None = None) -> None:
    """Make a cluster client fetch the slot map again before its next command. O(1).

    For a node that stopped answering (frozen, partitioned): a call abandoned at our
    deadline raises nothing inside the driver, which then never asks for a refresh
    itself and keeps sending that node's slots to it after a replica took over.
    redis-py paces refreshes (``topology_refresh_min_interval``); ``failed_node``
    (``host:port``) is skipped as the source of the new map where redis-py supports it.
    """
    request = getattr(client, "_request_refresh", None)
    if callable(request):
        request(last_failed_node_name=failed_node)
    else:  # older redis-py: the flag its own error paths set
        client._initialize = True


def _url_options(query: str) -> dict[str, str]:
    return dict(parse_qsl(query, keep_blank_values=True))


def _hosts(netloc: str, default_port: int) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``[user:password@]host:port,host:port`` -> hosts, username, password."""
    username = password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError as exc:
            raise ValueError(f"bad port in {item!r}") from exc
        hosts.append((host, port))
    if not hosts:
        raise ValueError("no host given")
    return hosts, username, password


_BOOL_TRUE = frozenset({"1", "true", "yes", "on"})


def _cluster_from_url(url: str) -> RedisCluster:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    tls = scheme.startswith("rediss")
    options = _url_options(parts.query)
    options.pop("cluster", None)
    hosts, username, password = _hosts(parts.netloc, 6379)
    extra: dict[str, Any] = {}
    if tls:
        extra["ssl"] = True
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
            if name in options:
                extra[name] = options.pop(name)
    if options:
        raise ValueError(f"unsupported cluster URL options {sorted(options)}")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in hosts],
        username=username,
        password=password,
        decode_responses=False,
        socket_timeout=DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT,
        max_connections=DEFAULT_MAX_CONNECTIONS,
        # never resend a command whose reply was lost (see the single-server pool);
        # MOVED/ASK redirections are still followed: the command did not run
        retry=Retry(NoBackoff(), 0),
        **extra,
        **_POOL_OPTIONS,
    )


def _sentinel_from_url(url: str) -> Redis:
    parts = urlsplit(url)
    tls = parts.scheme.lower().startswith("rediss")
    hosts, username, password = _hosts(parts.netloc, 26379)
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError("the path must be /service_name or /service_name/db")
    service = unquote(path[0])
    db = int(path[1]) if len(path) == 2 else 0
    options = _url_options(parts.query)
    sentinel_password = options.pop("sentinel_password", None)
    common: dict[str, Any] = {
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
        "socket_connect_timeout": DEFAULT_SOCKET_TIMEOUT,
    }
    server: dict[str, Any] = {
        **common,
        "username": username,
        "password": password,
        "db": db,
        "decode_responses": False,
        "retry": Retry(NoBackoff(), 0),
        **_POOL_OPTIONS,
    }
    if tls:
        server["ssl"] = True
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
        if name in options:
            server[name] = options.pop(name)
    if options:
        raise ValueError(f"unsupported sentinel URL options {sorted(options)}")
    sentinel_kwargs = {**common, "password": sentinel_password} if sentinel_password else common
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **server)
    primary: Redis = sentinel.master_for(service)
    return primary


def client_from_url(url: str) -> RedisClient:
    """Build the client a ``url=`` names (forms in the module docstring); raises
    :class:`InvalidInputError` for a malformed or unsupported URL. No I/O."""
    if not isinstance(url, str) or not url:
        raise InvalidInputError("url must be a non-empty redis:// or rediss:// URL")
    scheme = url.split("://", 1)[0].lower()
    try:
        if scheme in ("redis+cluster", "rediss+cluster"):
            return _cluster_from_url(url)
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            return _sentinel_from_url(url)
        parts = urlsplit(url)
        options = _url_options(parts.query)
        if options.get("cluster", "").lower() in _BOOL_TRUE:
            return _cluster_from_url(url)
        if "cluster" in options:  # cluster=false: the single-server form, minus the flag
            del options["cluster"]
            url = parts._replace(query=urlencode(options)).geturl()
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
        return Redis.from_pool(pool)
    except (ValueError, redis_errors.RedisClusterException) as exc:
        raise InvalidInputError(f"invalid Redis url {url!r}: {exc}") from exc


_POOL_LOOPS: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()


def bind_to_running_loop(client: RedisClient) -> None:
    """Let ``client`` serve the running event loop; call it inside a coroutine. O(1).

    A connection belongs to the event loop that opened it. When the client is used
    from another loop (a second ``asyncio.run``, a loop per job or per test), its pool
    forgets the old loop's connections: they cannot be closed from here (their loop
    may be gone), their sockets are freed when they are collected, and new ones are
    opened on demand. The pool's lock (and condition) are replaced too: one held by a
    loop that ended would never be released.
    """
    if isinstance(client, RedisCluster):
        return  # its nodes' connections are its own business (one loop per client)
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
    the client's pool to it (:func:`bind_to_running_loop`). A subclass that sets
    ``supports_cluster = True`` also accepts a ``RedisCluster`` (and a cluster URL);
    each of its operations awaits :meth:`_ready` first.
    """

    supports_cluster = False
    """Whether this backend keeps every multi-key step in one hash slot (Cluster-safe)."""

    def __init__(self, *, url: str | None, client: RedisClient | None, key_prefix: str) -> None:
        self._prefix = check_key_prefix(key_prefix)
        if (url is None) == (client is None):
            raise InvalidInputError("pass exactly one of url= or client=")
        if client is not None:
            if not isinstance(client, (Redis, RedisCluster)):
                raise InvalidInputTypeError(
                    "client must be a redis.asyncio.Redis or a "
                    f"redis.asyncio.cluster.RedisCluster, got {type(client).__name__}"
                )
            kwargs: dict[str, Any] = (
                client.get_connection_kwargs()
                if isinstance(client, RedisCluster)
                else client.connection_pool.connection_kwargs
            )
            if kwargs.get("decode_responses"):
                raise InvalidInputError(
                    "client must be created with decode_responses=False: "
                    "stored values and vectors are bytes"
                )
            chosen: RedisClient = client
            self._owns_client = False
        else:
            chosen = client_from_url(cast(str, url))
            self._owns_client = True
        if isinstance(chosen, RedisCluster) and not self.supports_cluster:
            raise InvalidInputError(
                f"{type(self).__name__} does not run on a Redis Cluster yet: its scripts "
                "touch keys in several hash slots (use one primary, or Sentinel)"
            )
        self._cluster: RedisCluster | None = chosen if isinstance(chosen, RedisCluster) else None
        # typed as the single-server client for the code written against it; the
        # cluster client answers the same commands (see ``_cluster`` for what differs)
        self._redis: Redis = cast(Redis, chosen)

    def _check_open(self) -> None:
        super()._check_open()
        bind_to_running_loop(self._redis)

    async def _ready(self) -> None:
        """Let a cluster client fetch its topology once before use (:func:`ensure_ready`)."""
        if self._cluster is not None:
            await ensure_ready(self._cluster)

    @property
    def key_prefix(self) -> str:
        """Every key this backend writes starts with ``key_prefix + ":"``."""
        return self._prefix

    @property
    def client(self) -> Redis:
        """The client this backend talks through (a ``RedisCluster`` when given one)."""
        return self._redis

    @property
    def cluster(self) -> RedisCluster | None:
        """The ``RedisCluster`` this backend talks through, or None on a single server."""
        return self._cluster

    def node_of(self, key: str | bytes) -> str | None:
        """The ``host:port`` of the cluster primary serving ``key`` now; None on a single
        server or before the client knows the slot map. O(1), no I/O.

        For per-node fault handling above a backend (one circuit breaker per primary):
        a slot's primary changes after a failover, so ask again per call.
        """
        if self._cluster is None:
            return None
        try:
            node = self._cluster.get_node_from_key(key)  # type: ignore[arg-type]
        except Exception:  # no slot map yet, or no node serves the slot now
            return None
        return None if node is None else str(node.name)

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
            await self._ready()
            if index_key is not None and expiries_key is not None:
                live = self._redis.register_script(LIVE_ENTRIES)
                return int(await live(keys=[index_key, expiries_key]))
            if index_key is not None:
                count: int = await self._redis.zcard(index_key)
                return count
            await self._ready()
            count = 0
            async for keys in scan_keys(self._cluster or self._redis, pattern, count=1000):
                count += len(keys)
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
        UNLINK (one per hash slot on a cluster, where every primary is scanned);
        returns how many keys were removed.
        """
        removed = 0
        pending: list[bytes] = []
        client = self._cluster or self._redis
        try:
            await self._ready()
            async for keys in scan_keys(client, pattern, count=batch):
                for key in keys:
                    if keep is None or keep.fullmatch(key):
                        pending.append(key)
                if len(pending) >= batch:
                    removed += await unlink_keys(client, pending)
                    pending.clear()
            if pending:
                removed += await unlink_keys(client, pending)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc
        return removed
