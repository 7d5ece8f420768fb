"""``FleetStreams``: one provider stream per key across every process sharing a Redis.

Protocol, for one streamed key (a digest), after the local :class:`StreamBroadcast`
has already reduced each process to one flight:

1. ``CLAIM_STREAM`` (one round trip): ``SET lease token NX PX``. The winner *leads*:
   it calls the provider, publishes into its local broadcast, and appends every
   chunk to the Redis stream ``{key_prefix}:live:{<digest>}:{token}`` (``PUBLISH_CHUNKS``:
   XADD with an approximate ``MAXLEN`` bound and a ``PEXPIRE``, batched: chunks that
   arrive while a write is in flight go out together in the next one), then an end
   marker (``e``) or an error marker (``x``: the error's type name and message). It
   renews its lease every third of its life while it streams and deletes it
   (compare-and-delete) once the recording is stored.
2. Everyone else learns the holder's token from the same call and *follows*: it
   reads that stream with ``XREAD BLOCK`` from its first entry (so a late joiner
   gets the chunks so far, then the live ones) and republishes them into its own
   local broadcast. Every entry carries its sequence number: a gap (entries trimmed
   before they were read) means the reader joined too late.
3. When a read times out and the lease no longer holds the leader's token, the
   leader died mid-stream: the local broadcast fails with :class:`ProducerLost`, so
   local consumers that already received chunks get :class:`StreamInterruptedError`
   and those that received nothing start over (and one of the processes takes the
   lease). Nothing is ever spliced from two provider streams.

Redis failures never fail a stream: a claim that cannot be made streams straight
from the provider; a publish that fails stops the publishing (followers then see
the leader as dead once its lease expires).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aiocache_llm.backends.redis.connection import (
    DRIVER_ERRORS,
    bind_to_running_loop,
    ensure_ready,
)
from aiocache_llm.backends.redis.lane import CommandLane
from aiocache_llm.coalescing.broadcast import ProducerLost, StreamBroadcast
from aiocache_llm.coalescing.fleet import RENEW_LEASE, keep_renewing, lease_key_of
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.core.deadline import deadline
from aiocache_llm.core.errors import (
    AiocacheLLMError,
    InvalidInputError,
    RemoteProviderError,
)
from aiocache_llm.core.guard import BackendGuard
from aiocache_llm.core.recorded import RecordedStream
from aiocache_llm.core.validation import check_positive_int, check_positive_number

__all__ = ["CLAIM_STREAM", "PUBLISH_CHUNKS", "RELEASE_STREAM", "FleetStreams", "StreamMirror"]

logger = logging.getLogger("aiocache_llm.coalescing")

CLAIM_STREAM = """
-- Take the lease of a streamed key, or learn who holds it.
-- KEYS[1] lease key
-- ARGV[1] holder token, ARGV[2] lease lifetime in ms
-- returns {1} when this call took the lease, else {0, holder token}
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {1}
end
return {0, redis.call('GET', KEYS[1]) or ''}
"""

PUBLISH_CHUNKS = """
-- Append entries to a live stream, bounded, and keep it alive.
-- KEYS[1] stream key
-- ARGV[1] expiry in ms, ARGV[2] approximate MAXLEN, ARGV[3] sequence number of the
-- first entry, then (kind, payload) pairs: kind 'c' chunk, 'e' end, 'x' error
-- returns the sequence number after the last entry appended
local seq = tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
               'n', seq, 'k', ARGV[i], 'v', ARGV[i + 1])
    seq = seq + 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return seq
"""

RELEASE_STREAM = """
-- Release a streamed key's lease if this holder still owns it.
-- KEYS[1] lease key; ARGV[1] holder token
-- returns 1 when released, 0 when it was no longer ours
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_CHUNK = b"c"
_END = b"e"
_ERROR = b"x"
_UNREACHABLE = object()
_READ_BATCH = 512
_READ_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *DRIVER_ERRORS)


class StreamMirror(Protocol):
    """Where a leader copies its stream for the other processes."""

    def add(self, chunk: Any) -> None: ...

    def end(self) -> None: ...


class _Publisher:
    """Appends a leader's chunks to its Redis stream, in order, batching while a write is out."""

    def __init__(self, owner: FleetStreams, stream_key: str) -> None:
        self._owner = owner
        self._key = stream_key
        # one connection held for the stream's writes: no pool checkout per chunk
        self._lane = CommandLane(owner._client)
        self._pending: list[bytes] = []  # kind, payload, kind, payload, ...
        self._next_seq = 0
        self._writer: asyncio.Future[None] | None = None
        self._broken = False
        self._settled = False

    def add(self, chunk: Any) -> None:
        try:
            frame = self._owner._codec.encode_chunk(chunk)
        except InvalidInputError as exc:
            self.fail(exc)
            return
        self._queue(_CHUNK, frame)

    def end(self) -> None:
        if not self._settled:
            self._settled = True
            self._queue(_END, b"")

    def fail(self, error: BaseException) -> None:
        if not self._settled:
            self._settled = True
            self._queue(_ERROR, f"{type(error).__name__}\n{_message(error)}".encode())

    def _queue(self, kind: bytes, payload: bytes) -> None:
        if self._broken:
            return
        self._pending += (kind, payload)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        owner = self._owner
        while self._pending and not self._broken:
            batch, self._pending = self._pending, []
            args: list[bytes | int] = [
                owner._stream_ttl_ms,
                owner._max_chunks,
                self._next_seq,
                *batch,
            ]
            self._next_seq += len(batch) // 2
            written = await owner._guard.call(functools.partial(self._append, args), _UNREACHABLE)
            if written is _UNREACHABLE:
                self._broken = True  # followers will see the leader as gone

    async def _append(self, args: list[bytes | int]) -> Any:
        owner = self._owner
        try:
            return await self._lane.execute("EVALSHA", owner._publish.sha, 1, self._key, *args)
        except redis_errors.NoScriptError:
            return await owner._publish(keys=[self._key], args=args)  # loads it, then runs

    async def drain(self) -> None:
        """Wait until everything queued is written (or the writes failed), then let go
        of the connection."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        await self._lane.aclose()


class FleetStreams:
    """Shares streamed answers between processes through a lease and a Redis stream.

    ``lease_seconds`` is how long a dead leader goes unnoticed (a live one renews
    it); a follower that sees no first chunk within ``max_wait_seconds`` streams from
    the provider itself; ``max_chunks`` bounds a live Redis stream (approximate ``MAXLEN``); the
    stream key expires ``3 * lease_seconds`` after its last write. Keys:
    ``{key_prefix}:lease:{<digest>}`` and ``{key_prefix}:live:{<digest>}:{token}`` (the
    braces are a Redis Cluster hash tag: a key's lease and streams share a slot).
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        key_prefix: str,
        *,
        codec: ValueCodec,
        guard: BackendGuard,
        lease_seconds: float = 10.0,
        max_wait_seconds: float = 60.0,
        max_chunks: int = 65536,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._codec = codec
        self._guard = guard
        lease = check_positive_number("lease_seconds", lease_seconds)
        self._lease_ms = max(1, round(lease * 1000))
        self._stream_ttl_ms = 3 * self._lease_ms
        self._block_ms = max(1, min(self._lease_ms, 1000))
        self._max_wait = check_positive_number("max_wait_seconds", max_wait_seconds)
        self._max_chunks = check_positive_int("max_chunks", max_chunks)
        self._claim = client.register_script(CLAIM_STREAM)
        self._publish = client.register_script(PUBLISH_CHUNKS)
        self._release = client.register_script(RELEASE_STREAM)
        self._renew = client.register_script(RENEW_LEASE)
        self.led = 0
        """Streams this process produced for the fleet."""
        self.followed = 0
        """Streams this process relayed from another process (or found stored meanwhile)."""
        self.lost = 0
        """Relayed streams whose producer died mid-stream."""
        self.gave_up = 0
        """Follows that saw no first chunk within ``max_wait_seconds`` and streamed alone."""

    async def _claim_lease(self, lease_key: str, token: str) -> Any:
        await ensure_ready(self._client)  # a cluster client's topology, fetched once
        return await self._claim(keys=[lease_key], args=[token, self._lease_ms])

    def __repr__(self) -> str:
        return (
            f"FleetStreams(key_prefix={self._prefix!r}, lease_ms={self._lease_ms}, "
            f"led={self.led}, followed={self.followed}, lost={self.lost})"
        )

    async def run(
        self,
        digest: str,
        flight: StreamBroadcast,
        *,
        lookup: Callable[[], Awaitable[RecordedStream | None]],
        produce: Callable[[StreamMirror | None], Awaitable[None]],
    ) -> None:
        """Fill ``flight``: as the leader (``produce(mirror)``), or by following the leader.

        ``lookup`` reads the stored recording; ``produce`` streams from the provider
        into ``flight`` and ``mirror``, ends ``flight`` and stores. Raises what
        ``produce`` raised, :class:`RemoteProviderError` when the leader's provider
        failed, and :class:`ProducerLost` when the leader died mid-stream.
        """
        lease_key = lease_key_of(self._prefix, digest)
        token = secrets.token_hex(16)
        bind_to_running_loop(self._client)
        claim: Any = await self._guard.call(
            lambda: self._claim_lease(lease_key, token), _UNREACHABLE
        )
        if claim is _UNREACHABLE:
            await produce(None)
            return
        if int(claim[0]) == 1:
            await self._lead(digest, lease_key, token, flight, lookup, produce)
            return
        holder = bytes(claim[1]).decode() if claim[1] else ""
        found = await lookup()
        if found is not None:
            self.followed += 1
            flight.publish_all(found.chunks)
            return
        if not holder:  # released between our SET and GET: the recording is being stored
            raise ProducerLost("the fleet leader finished before we could follow it")
        self.followed += 1
        stream_key = f"{self._prefix}:live:{{{digest}}}:{holder}"
        if not await self._follow(stream_key, lease_key, holder, flight):
            self.followed -= 1
            self.gave_up += 1
            logger.warning(
                "no first chunk from the fleet leader after %.1f s: streaming alone",
                self._max_wait,
            )
            await produce(None)

    async def _lead(
        self,
        digest: str,
        lease_key: str,
        token: str,
        flight: StreamBroadcast,
        lookup: Callable[[], Awaitable[RecordedStream | None]],
        produce: Callable[[StreamMirror | None], Awaitable[None]],
    ) -> None:
        # other processes may be reading what we stream: never stop when ours leave
        flight.on_abandoned = None
        renewer = asyncio.ensure_future(
            keep_renewing(self._guard, self._renew, lease_key, token, self._lease_ms)
        )
        publisher = _Publisher(self, f"{self._prefix}:live:{{{digest}}}:{token}")
        try:
            found = await lookup()  # a previous leader may have stored just before we won
            if found is not None:
                flight.publish_all(found.chunks)
                return
            self.led += 1
            try:
                await produce(publisher)
            except BaseException as exc:
                publisher.fail(exc)
                raise
            finally:
                await publisher.drain()
        finally:
            renewer.cancel()
            await self._guard.call(lambda: self._release(keys=[lease_key], args=[token]), None)

    async def _follow(
        self, stream_key: str, lease_key: str, holder: str, flight: StreamBroadcast
    ) -> bool:
        """Relay the leader's stream into ``flight``; False if it never started in time."""
        # one connection held for the blocking reads: no pool checkout per read
        lane = CommandLane(self._client)
        try:
            return await self._relay(lane, stream_key, lease_key, holder, flight)
        finally:
            await lane.aclose()

    async def _relay(
        self,
        lane: CommandLane,
        stream_key: str,
        lease_key: str,
        holder: str,
        flight: StreamBroadcast,
    ) -> bool:
        last_id: bytes | str = "0-0"
        expected = 0
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._max_wait
        while True:
            block_ms = self._block_ms
            if not expected:
                waited_enough = give_up_at - loop.time()
                if waited_enough <= 0:
                    return False
                block_ms = max(1, min(block_ms, int(waited_enough * 1000)))
            if expected:
                # let the consumers take the chunks just relayed before this task sends
                # its next blocking read: it would otherwise go first (~0.1 ms a chunk)
                await asyncio.sleep(0)
            entries = await self._read(lane, stream_key, last_id, block_ms)
            if entries is None:
                self.lost += 1
                raise ProducerLost("Redis stopped answering while following the fleet leader")
            if not entries:
                holding: Any = await self._guard.call(lambda: self._client.get(lease_key), None)
                if holding is not None and bytes(holding).decode() == holder:
                    continue
                # the lease is gone: unless the end was written just now, the leader died
                entries = await self._read(lane, stream_key, last_id, None)
                if not entries:
                    self.lost += 1
                    raise ProducerLost("the fleet leader stopped mid-stream")
            for entry_id, fields in entries:
                if int(fields[b"n"]) != expected:
                    self.lost += 1
                    raise ProducerLost("joined after the start of the stream was trimmed")
                expected += 1
                last_id = entry_id
                kind, payload = fields[b"k"], fields[b"v"]
                if kind == _CHUNK:
                    flight.publish(self._codec.decode(payload))
                elif kind == _END:
                    flight.finish()
                    return True
                else:
                    error_type, _, message = bytes(payload).decode().partition("\n")
                    flight.fail(
                        RemoteProviderError(
                            f"the provider failed in the process streaming this answer: "
                            f"{error_type}: {message}",
                            error_type=error_type,
                        )
                    )
                    return True

    async def _read(
        self, lane: CommandLane, stream_key: str, last_id: bytes | str, block_ms: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]] | None:
        """Entries after ``last_id``, waiting up to ``block_ms`` (None: not at all) for one;
        [] when none came in time, None if Redis failed."""
        block = () if block_ms is None else ("BLOCK", block_ms)
        try:
            # a blocked read is bounded by the server; ours only backs it up
            with deadline(self._block_ms / 1000 + 5.0):
                reply = await lane.execute(
                    "XREAD", "COUNT", _READ_BATCH, *block, "STREAMS", stream_key, last_id
                )
        except _READ_ERRORS as exc:
            logger.debug("reading a fleet stream failed: %s", type(exc).__name__)
            return None
        return _stream_entries(reply)


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream ``XREAD`` reply, in any of the shapes redis-py gives:
    raw or parsed, RESP2 (a list of ``[key, entries]``) or RESP3 (a map)."""
    if not reply:
        return []
    streams = list(reply.values()) if isinstance(reply, dict) else [item[1] for item in reply]
    entries = streams[0]
    if entries and isinstance(entries[0], list) and isinstance(entries[0][0], (list, tuple)):
        entries = entries[0]  # redis-py's RESP3 parser wraps them once more
    parsed = []
    for entry_id, fields in entries:
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        parsed.append((entry_id, fields))
    return parsed


def _message(error: BaseException) -> str:
    # the library's own messages name the problem; a provider's may be long
    text = str(error)
    if isinstance(error, AiocacheLLMError):
        return text
    return text[:2000]
