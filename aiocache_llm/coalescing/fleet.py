"""``FleetCoalescer``: one provider call per key across every process sharing a Redis.

Protocol, for one key (a query digest), after the local :class:`SingleFlight` has
already reduced each process to one caller:

1. ``TRY_LEASE`` (one round trip): ``SET lease token NX PX`` — if it succeeds this
   process *leads*; otherwise it registers as a waiter (a marker key) and learns
   the lease's remaining time.
2. The leader reads the cache once more (a previous leader may have stored and
   released between our miss and our lease), then runs ``compute()`` (rate limit,
   provider call, store in the cache)
   while a renewer extends the lease every third of its life with a
   compare-and-``PEXPIRE``; then ``RELEASE`` deletes the lease only if the token is
   still its own and, if any waiter registered, ``PUBLISH``es the outcome: the
   answer itself (``value``) when it encodes to at most ``inline_max_bytes``, else
   ``stored``; ``failed`` when ``compute()`` raised.
3. A waiter looks the cache up once (the answer may already be there), then waits
   for the notification or for the lease's remaining life, whichever comes first
   (one armed timer, no polling). ``value`` -> that is the answer (decoded here, a
   fresh copy); ``stored`` -> read the cache, and if the answer is not there (it
   could not be stored: too large, ``None``, a failed put; or it expired or was
   evicted already) call ``compute()`` at once, without a lease: every waiter of
   the fleet then computes side by side instead of one after another; ``failed``
   or lease expiry (the leader died: no renewals) -> try to lead. After
   ``max_wait`` seconds in all it calls ``compute()`` itself, so nobody waits
   forever.

An answer is never stored by the notification: a small answer that the cache could
not keep (beyond the cache's ``max_value_bytes``, or a TTL that ran out) still
reaches every waiter, and the next request computes it again.

Notifications arrive on one channel subscription per coalescer (per process),
started on the first wait. Redis failures never fail a call: coordination is
abandoned and ``compute()`` runs directly (the guard counts and logs it).

On a Redis Cluster the lease and its waiter marker share a hash slot (the digest
is their hash tag), so each script touches one slot; the notification is a classic
``PUBLISH``, which the cluster delivers to subscribers on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.commands.core import AsyncScript

from aiocache_llm.backends.redis.connection import (
    DRIVER_ERRORS,
    backend_error,
    bind_to_running_loop,
    ensure_ready,
)
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.core.errors import CorruptEntryError, InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.guard import BackendGuard
from aiocache_llm.core.validation import check_positive_int, check_positive_number

__all__ = [
    "DEFAULT_INLINE_BYTES",
    "RELEASE_LEASE",
    "RENEW_LEASE",
    "FleetCoalescer",
    "keep_renewing",
    "lease_key_of",
]

logger = logging.getLogger("aiocache_llm.coalescing")

T = TypeVar("T")

TRY_LEASE = """
-- Take the lease of a key, or register as one of its waiters.
-- KEYS[1] lease key, KEYS[2] waiter marker key
-- ARGV[1] holder token, ARGV[2] lease lifetime in ms
-- returns -1 when the lease was taken by this call, else the lease's remaining ms
-- (the waiter marker then lives as long as the lease plus one lifetime)
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return -1
end
local remaining = redis.call('PTTL', KEYS[1])
if remaining < 0 then
    remaining = 0
end
redis.call('SET', KEYS[2], '1', 'PX', remaining + tonumber(ARGV[2]))
return remaining
"""

RENEW_LEASE = """
-- Extend a lease this holder still owns.
-- KEYS[1] lease key; ARGV[1] holder token, ARGV[2] lease lifetime in ms
-- returns 1 when extended, 0 when the lease was lost (expired or taken over)
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LEASE = """
-- Release a lease (only if still owned) and wake the waiters of other processes.
-- KEYS[1] lease key, KEYS[2] waiter marker key
-- ARGV[1] holder token, ARGV[2] notification channel,
-- ARGV[3] notification: '<digest> stored' | '<digest> failed' | '<digest> value <answer>'
-- (the answer encoded by the value codec, sent only when small)
-- returns 1 when the lease was still owned and is now released, else 0
local owned = redis.call('GET', KEYS[1]) == ARGV[1]
if owned then
    redis.call('DEL', KEYS[1])
end
if redis.call('DEL', KEYS[2]) == 1 then
    redis.call('PUBLISH', ARGV[2], ARGV[3])
end
if owned then
    return 1
end
return 0
"""

DEFAULT_INLINE_BYTES = 64 * 1024
"""Largest encoded answer a leader sends in its notification (to every process)."""

_STORED = b"stored"
_FAILED = b"failed"
_VALUE = b"value "  # followed by the encoded answer
_UNREACHABLE = object()
_UNDECODABLE = object()


def lease_key_of(prefix: str, digest: str) -> str:
    """The lease key of ``digest``: ``{prefix}:lease:{<digest>}`` (the digest is the hash
    tag, unless ``prefix`` holds one: then the prefix's tag places every lease)."""
    return f"{prefix}:lease:{{{digest}}}"


async def keep_renewing(
    guard: BackendGuard, renew: AsyncScript, lease_key: str, token: str, lease_ms: int
) -> None:
    """Extend a lease every third of its life until cancelled or lost (then log and stop)."""
    period = lease_ms / 3000
    while True:
        await asyncio.sleep(period)
        renewed: Any = await guard.call(
            lambda: renew(keys=[lease_key], args=[token, lease_ms]), None
        )
        if renewed == 0:
            logger.warning("fleet lease lost while computing; another process may compute too")
            return


class _Notifier:
    """One channel subscription per process, fanning lease notifications out to futures.

    A single fixed channel (not a pattern): Redis ACL channel rules such as
    ``&tenant-a:*`` match channel names, while a PSUBSCRIBE pattern would have to be
    granted literally.
    """

    def __init__(self, client: Redis | RedisCluster, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._waiters: dict[bytes, set[asyncio.Future[bytes]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pubsub: PubSub | ClusterPubSub | None = None

    async def start(self) -> None:
        """Return once the subscription is confirmed by the server; restarts a dead reader
        (or one of an event loop that has ended: its waiters are forgotten with it)."""
        reader = self._reader
        if reader is not None and reader.get_loop() is not asyncio.get_running_loop():
            self._reader = self._ready = self._pubsub = None
            self._waiters.clear()
        if self._reader is None or self._reader.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._reader = asyncio.ensure_future(self._read())
        assert self._ready is not None
        await asyncio.shield(self._ready)

    def watch(self, digest: bytes) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(digest, set()).add(future)
        return future

    def unwatch(self, digest: bytes, future: asyncio.Future[bytes]) -> None:
        futures = self._waiters.get(digest)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiters[digest]

    async def _read(self) -> None:
        ready = self._ready
        assert ready is not None
        # a cluster's pubsub listens on one node: a classic PUBLISH reaches every node
        pubsub = self._client.pubsub()
        self._pubsub = pubsub
        try:
            await pubsub.subscribe(self._channel)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                if message["type"] == "subscribe" and not ready.done():
                    ready.set_result(None)
                elif message["type"] == "message":
                    digest, _, outcome = bytes(message["data"]).partition(b" ")
                    for future in self._waiters.pop(digest, ()):
                        if not future.done():
                            future.set_result(outcome)
        except asyncio.CancelledError:
            raise
        except DRIVER_ERRORS as exc:
            if not ready.done():
                ready.set_exception(backend_error(exc, "subscribe"))
            logger.debug("lease notification subscription lost: %s", type(exc).__name__)
        finally:
            self._pubsub = None
            with contextlib.suppress(*DRIVER_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]

    async def aclose(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._reader = None


class FleetCoalescer:
    """Coalesces a key's computation across processes through a lease in Redis.

    ``lease_seconds`` is how long a silent (dead) leader blocks the others before one
    takes over; a live leader renews it every third of that. ``max_wait_seconds``
    bounds how long a waiter waits in all before computing by itself. Keys are
    ``{key_prefix}:lease:{<digest>}`` (plus ``:w`` for the waiter marker; the braces
    are a Redis Cluster hash tag: both keys share a slot) and the notification channel
    ``{key_prefix}:lease-done`` (messages ``<digest> <outcome>``).

    With a ``codec`` (the shared cache's, which knows the declared value types), a
    leader sends its answer in the notification when it encodes to at most
    ``inline_max_bytes`` (:data:`DEFAULT_INLINE_BYTES`), whether or not the cache
    kept it; waiters decode it with that codec (data only, never unpickled). Without
    one, waiters always read the cache.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        key_prefix: str,
        *,
        guard: BackendGuard | None = None,
        lease_seconds: float = 10.0,
        max_wait_seconds: float = 60.0,
        codec: ValueCodec | None = None,
        inline_max_bytes: int = DEFAULT_INLINE_BYTES,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._guard = guard or BackendGuard(f"redis lease {key_prefix!r}")
        lease = check_positive_number("lease_seconds", lease_seconds)
        self._lease_ms = max(1, round(lease * 1000))
        self._max_wait = check_positive_number("max_wait_seconds", max_wait_seconds)
        self._codec = codec
        # its own bound, not the cache's: an answer the cache refuses as too large
        # for storage may still be small enough to hand to the waiters
        self._inline = ValueCodec(
            max_value_bytes=check_positive_int("inline_max_bytes", inline_max_bytes)
        )
        self._try_lease = client.register_script(TRY_LEASE)
        self._renew_lease = client.register_script(RENEW_LEASE)
        self._release_lease = client.register_script(RELEASE_LEASE)
        self._channel = f"{key_prefix}:lease-done"
        self._notifier = _Notifier(client, self._channel)
        self.led = 0
        """Computations this process ran as the fleet's leader."""
        self.waited = 0
        """Computations answered by another process's leader."""
        self.took_over = 0
        """Leads taken after a leader failed or died."""
        self.gave_up = 0
        """Waits that hit ``max_wait_seconds`` and computed without a lease."""
        self.unshared = 0
        """Waits that ended with the leader's answer neither sent nor found in the cache,
        so this process computed it at once, without a lease."""

    def __repr__(self) -> str:
        return (
            f"FleetCoalescer(key_prefix={self._prefix!r}, lease_ms={self._lease_ms}, "
            f"led={self.led}, waited={self.waited}, took_over={self.took_over})"
        )

    async def run(
        self,
        digest: str,
        lookup: Callable[[], Awaitable[T | None]],
        compute: Callable[[], Awaitable[T]],
    ) -> T:
        """Return the key's value: computed here as the leader, or found after another did.

        ``lookup`` reads the shared cache (``None`` = not there); ``compute`` produces
        and stores the value. Exceptions of ``compute`` propagate to this caller only;
        other processes' waiters then try to lead themselves. A leader's answer that
        waiters can neither receive nor read makes each of them call ``compute`` at
        once (concurrently across the fleet), never wait for a lease in turn.
        """
        lease_key = lease_key_of(self._prefix, digest)
        marker_key = f"{lease_key}:w"
        watched = digest.encode()
        token = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._max_wait
        bind_to_running_loop(self._client)
        if await self._guard.call(self._start, _UNREACHABLE) is _UNREACHABLE:
            return await compute()
        tried = False
        while True:
            notified = self._notifier.watch(watched)
            try:
                remaining: Any = await self._guard.call(
                    lambda: self._try_lease(
                        keys=[lease_key, marker_key], args=[token, self._lease_ms]
                    ),
                    _UNREACHABLE,
                )
                if remaining is _UNREACHABLE:
                    return await compute()
                if remaining == -1:
                    if tried:
                        self.took_over += 1
                    return await self._lead(lease_key, marker_key, digest, token, lookup, compute)
                tried = True
                found = await lookup()
                if found is not None:
                    self.waited += 1
                    return found
                budget = give_up_at - loop.time()
                if budget <= 0:
                    self.gave_up += 1
                    logger.warning(
                        "gave up waiting for the fleet leader after %.1f s", self._max_wait
                    )
                    return await compute()
                # wake on the leader's notification or when its lease would run out
                wait = min(budget, int(remaining) / 1000 + 0.05)
                await asyncio.wait((notified,), timeout=wait)
                outcome = notified.result() if notified.done() else _FAILED
                if outcome.startswith(_VALUE):
                    value = self._decode(outcome[len(_VALUE) :])
                    if value is not _UNDECODABLE:
                        self.waited += 1
                        return value  # type: ignore[return-value]
                    outcome = _STORED  # a type not declared here: the cache may have it
                if outcome != _STORED:
                    continue  # failed, or the leader died: one of the waiters leads next
                found = await lookup()
                if found is not None:
                    self.waited += 1
                    return found
                # the leader is done but its answer cannot be had here: a new lease
                # would only make the fleet's waiters compute one after another
                self.unshared += 1
                return await compute()
            finally:
                self._notifier.unwatch(watched, notified)
                notified.cancel()

    async def _lead(
        self,
        lease_key: str,
        marker_key: str,
        digest: str,
        token: str,
        lookup: Callable[[], Awaitable[T | None]],
        compute: Callable[[], Awaitable[T]],
    ) -> T:
        renewer = asyncio.ensure_future(self._keep_renewing(lease_key, token))
        outcome = _FAILED
        try:
            # the previous leader may have stored and released just before we won
            found = await lookup()
            if found is not None:
                outcome = _STORED
                self.waited += 1
                return found
            self.led += 1
            result = await compute()
            outcome = self._share(result)
            return result
        finally:
            renewer.cancel()
            await self._guard.call(
                lambda: self._release_lease(
                    keys=[lease_key, marker_key],
                    args=[token, self._channel, digest.encode() + b" " + outcome],
                ),
                None,
            )

    def _share(self, result: object) -> bytes:
        """The notification outcome for a computed ``result``: itself if small, else stored."""
        if self._codec is None:
            return _STORED
        max_bytes = self._inline.max_value_bytes
        if type(result) is str and max_bytes is not None and len(result) > max_bytes:
            return _STORED  # a text longer than the bound in characters is, in bytes too
        try:
            return _VALUE + self._inline.encode(result)
        except (InvalidInputError, InvalidInputTypeError):
            # too large to send, None, or not a cacheable value: waiters read the cache
            return _STORED

    def _decode(self, data: bytes) -> object:
        codec = self._codec
        if codec is None:
            return _UNDECODABLE
        try:
            return codec.decode(data)
        except CorruptEntryError:
            # a model type this process does not declare, or bytes we did not write
            return _UNDECODABLE

    async def _start(self) -> None:
        await ensure_ready(self._client)  # a cluster client's topology, fetched once
        await self._notifier.start()

    async def _keep_renewing(self, lease_key: str, token: str) -> None:
        await keep_renewing(self._guard, self._renew_lease, lease_key, token, self._lease_ms)

    async def aclose(self) -> None:
        """Stop the notification subscription."""
        await self._notifier.aclose()
