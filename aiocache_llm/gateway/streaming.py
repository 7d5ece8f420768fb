"""Streamed answers through the gateway: cached, replayed and shared live.

A streaming request is filed apart from the same request asked without streaming:
its key is that of the request plus the field :data:`STREAM_KEY_FIELD`, its
coalescing slot is separate, and a cache answer of the other kind (a recording for
a plain request, or the reverse) is a miss. A stream that ends normally is stored
as one :class:`RecordedStream` entry.

Concurrent identical streams share one provider stream through a
:class:`StreamBroadcast`; the first consumer's request starts a producer task of its
own (so no consumer's cancellation cancels it) which reads the provider, publishes
each chunk, reconciles the rate limit with the usage the stream reports, and stores
the recording. With fleet streaming (an exact cache that is an
:class:`~aiocache_llm.protocols.AsyncFleetExactCache`), the producer of
one process also publishes to a Redis stream and the other processes relay it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from aiocache_llm.coalescing.broadcast import ProducerLost, StreamBroadcast, Subscription
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.core.deadline import Watchdog, deadline
from aiocache_llm.core.errors import (
    InvalidInputTypeError,
    ProviderTimeoutError,
    RateLimitExceeded,
    StreamInterruptedError,
)
from aiocache_llm.core.query import Query, as_request
from aiocache_llm.core.recorded import RecordedStream
from aiocache_llm.gateway.node_guards import lease_route
from aiocache_llm.gateway.request import MissRequest
from aiocache_llm.gateway.tokens import StreamUsage

if TYPE_CHECKING:
    from aiocache_llm.coalescing.fleet_stream import FleetStreams, StreamMirror
    from aiocache_llm.gateway.gateway import InferenceGateway

__all__ = [
    "STREAM_KEY_FIELD",
    "ChunkStream",
    "StreamFlights",
    "stream_key_query",
    "streaming_request",
    "wants_stream",
]

logger = logging.getLogger("aiocache_llm.gateway")

STREAM_KEY_FIELD = "aiocache_llm_stream"
"""Added to a streamed request's key (exact and semantic): streams and plain answers
never share an entry."""

StreamCall = Callable[[], Any]
"""Starts one provider stream: returns an async iterable of chunks, or an awaitable of one."""

_UNAVAILABLE = object()
_RESTARTS = 3  # a consumer with nothing read yet starts over at most this often


def wants_stream(query: object) -> bool:
    """Whether ``query`` asks for a streamed answer (a truthy ``stream`` field)."""
    if isinstance(query, Mapping):
        return bool(query.get("stream"))
    if isinstance(query, BaseModel):
        return bool(getattr(query, "stream", False))
    return False


def stream_key_query(query: Query) -> dict[str, Any]:
    """The request a streamed answer of ``query`` is filed under (exact and semantic)."""
    return {**as_request(query), STREAM_KEY_FIELD: True}


def streaming_request(query: Query) -> Query:
    """What a provider callable is given for a stream: a mapping gets ``"stream": True``."""
    if isinstance(query, Mapping) and not query.get("stream"):
        return {**query, "stream": True}
    return query


class _Replay:
    """A cache hit's chunks, as an async iterator."""

    __slots__ = ("_chunks", "_index")

    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = chunks
        self._index = 0

    async def __anext__(self) -> Any:
        if self._index >= len(self._chunks):
            raise StopAsyncIteration
        self._index += 1
        return self._chunks[self._index - 1]

    def close(self) -> None:
        self._index = len(self._chunks)


Opener = Callable[[], Awaitable["_Replay | Subscription"]]


class ChunkStream:
    """One streamed answer, as an async iterator of its chunks (and an async context manager).

    Returned by :meth:`InferenceGateway.stream` (which starts nothing until the first
    ``__anext__``) and by ``await gateway.resolve(query)`` for a query with a truthy
    ``stream`` (which has already waited for the first chunk, so errors raised before
    any chunk - a rate-limit refusal, a provider error or timeout - raise there, as
    they would from an SDK's ``create(stream=True)``).

    The chunks come from the cache (a replay), from a provider stream this consumer
    shares with every concurrent identical request, or from another process's stream.
    Every consumer gets every chunk, in order; mutable chunks are copies of its own.
    A provider error mid-stream is raised after the chunks sent before it.
    :class:`StreamInterruptedError` means the stream cannot continue for this consumer
    after it received chunks (the producing process died, or this consumer fell behind
    a stream past the size bound); a consumer that received nothing starts over
    instead. ``aclose()`` (or leaving ``async with``) stops consuming; cancelling a
    read cancels this consumer only. Not reusable: iterate it once.
    """

    __slots__ = (
        "_closed",
        "_delivered",
        "_iterator",
        "_on_first_chunk",
        "_opener",
        "_pending",
        "_restarts",
        "_user",
    )

    def __init__(
        self, opener: Opener, user: str, on_first_chunk: Callable[[], None] | None = None
    ) -> None:
        self._opener = opener
        self._user = user
        self._on_first_chunk = on_first_chunk
        self._iterator: _Replay | Subscription | None = None
        self._pending: list[Any] = []
        self._delivered = 0
        self._restarts = 0
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._iterator else "not started"
        return f"ChunkStream({state}, delivered={self._delivered})"

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> Any:
        if self._pending:
            return self._pending.pop()
        while True:
            if self._closed:
                raise StopAsyncIteration
            iterator = self._iterator
            if iterator is None:
                iterator = self._iterator = await self._opener()
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                self._close_iterator()
                self._closed = True
                raise
            except ProducerLost as exc:
                self._close_iterator()
                if self._delivered or self._restarts >= _RESTARTS:
                    self._closed = True
                    raise StreamInterruptedError(
                        f"the process streaming this answer stopped after {self._delivered} "
                        "chunks were received here; the answer is incomplete"
                    ) from exc
                self._restarts += 1
                continue
            except RateLimitExceeded as exc:
                self._close_iterator()
                # the stream we joined was refused by its starter's budget, not ours
                if not self._delivered and exc.user_id != self._user and self._restarts < _RESTARTS:
                    self._restarts += 1
                    continue
                self._closed = True
                raise
            except asyncio.CancelledError:
                raise  # this read only: the stream stays usable
            except BaseException:
                self._close_iterator()
                self._closed = True
                raise
            if not self._delivered and self._on_first_chunk is not None:
                self._on_first_chunk()
            self._delivered += 1
            return chunk

    async def start(self) -> ChunkStream:
        """Open the stream and wait for its first chunk (or its end); return ``self``.

        Raises what the stream would raise before its first chunk.
        """
        with contextlib.suppress(StopAsyncIteration):
            self._pending.append(await self.__anext__())
        return self

    @property
    def delivered(self) -> int:
        """Chunks this consumer has received so far."""
        return self._delivered

    def _close_iterator(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            iterator.close()

    async def aclose(self) -> None:
        """Stop consuming (idempotent); the others sharing the stream go on."""
        self._closed = True
        self._pending.clear()
        self._close_iterator()

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _ProviderStream:
    """The provider's stream for one flight: opened, read chunk by chunk, always closed."""

    __slots__ = ("_call", "_iterator", "_source")

    def __init__(self, call: StreamCall) -> None:
        self._call = call
        self._source: Any = None
        self._iterator: AsyncIterator[Any] | None = None

    async def open(self) -> None:
        source = self._call()
        if inspect.isawaitable(source):
            source = await source
        if not hasattr(source, "__aiter__") or isinstance(source, (str, bytes, Mapping)):
            raise InvalidInputTypeError(
                "a streaming provider must return an async iterable of chunks "
                f"(or an awaitable of one), got {type(source).__name__}"
            )
        self._source = source
        self._iterator = source.__aiter__()

    async def next(self) -> Any:
        assert self._iterator is not None
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Close the provider's stream (an SDK stream's HTTP response, a generator)."""
        source = self._source
        for name in ("aclose", "close"):
            closer = getattr(source, name, None)
            if callable(closer):
                try:
                    result = closer()
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:  # closing must never fail the stream's outcome
                    logger.debug("closing a provider stream failed: %s", type(exc).__name__)
                return


class StreamFlights:
    """The gateway's streams in flight, one :class:`StreamBroadcast` per key.

    ``max_bytes`` bounds one stream in flight (see :class:`StreamBroadcast`);
    ``idle_timeout`` bounds the gap between two chunks (``provider_timeout`` bounds
    the time to the first). When every consumer of a stream leaves before its end,
    the provider stream is closed (which stops the generation, and its cost, on
    providers that stop on disconnect), its reservation is charged for what was
    streamed, and nothing is stored; with ``finish_abandoned`` it is read to its end
    and stored instead. A stream this process produces for the fleet always runs to
    its end, since other processes may be reading it.
    """

    def __init__(
        self,
        gateway: InferenceGateway,
        *,
        codec: ValueCodec,
        max_bytes: int,
        idle_timeout: float | None,
        finish_abandoned: bool,
        fleet: FleetStreams | None,
    ) -> None:
        self._gateway = gateway
        self._codec = codec
        self._max_bytes = max_bytes
        self._idle_timeout = idle_timeout
        self._finish_abandoned = finish_abandoned
        self._fleet = fleet
        self._flights: dict[tuple[str, bool, bool], StreamBroadcast] = {}
        self._producers: dict[asyncio.Task[None], StreamBroadcast] = {}
        self.requests = 0
        self.hits = 0
        self.shared = 0
        self.replayed = 0
        self.abandoned = 0

    def __len__(self) -> int:
        return len(self._flights)

    def open(
        self,
        query: Query,
        call: StreamCall,
        user: str,
        *,
        no_cache: bool,
        no_store: bool,
        ttl: float | None,
    ) -> ChunkStream:
        """Return the stream of ``query``'s answer; keys it now (bad input raises here)."""
        gateway = self._gateway
        key_query = stream_key_query(query)
        digest = gateway._signature(key_query)
        gateway._requests += 1
        self.requests += 1
        started = time.perf_counter()

        async def opener() -> _Replay | Subscription:
            request = MissRequest(
                query, digest, call, user, ttl, no_store=no_store, read=False, key_query=key_query
            )
            return await self._open(request, no_cache=no_cache)

        def first_chunk() -> None:
            gateway._latency.add(time.perf_counter() - started)

        return ChunkStream(opener, user, first_chunk)

    async def _open(self, request: MissRequest, *, no_cache: bool) -> _Replay | Subscription:
        gateway = self._gateway
        if not no_cache:
            value = await gateway._exact_get(request.key_query, request.digest, _UNAVAILABLE)
            if type(value) is RecordedStream:
                gateway._exact_hits += 1
                return self._replay(value)
            # another kind of answer under a streamed key is a miss, not an answer
            request.read = value is not _UNAVAILABLE
        flight_key = (request.digest, request.read, request.no_store)
        flight = self._flights.get(flight_key)
        if flight is not None and flight.joinable and flight.loop is asyncio.get_running_loop():
            gateway._coalesced += 1
            self.shared += 1
            return flight.subscribe()
        flight = StreamBroadcast(self._codec, max_bytes=self._max_bytes)
        subscription = flight.subscribe()
        self._flights[flight_key] = flight
        task = asyncio.ensure_future(self._produce(flight, request))

        self._producers[task] = flight

        def forget(_: object) -> None:
            if self._flights.get(flight_key) is flight:
                del self._flights[flight_key]

        task.add_done_callback(forget)
        task.add_done_callback(self._producers.pop)
        if not self._finish_abandoned:

            def abandon() -> None:
                forget(None)
                self.abandoned += 1
                task.cancel()

            flight.on_abandoned = abandon
        return subscription

    def _replay(self, recording: RecordedStream) -> _Replay:
        self._count_replay(recording)
        return _Replay(recording.chunks)

    def _count_replay(self, recording: RecordedStream) -> None:
        self.hits += 1
        self.replayed += len(recording)

    async def aclose(self, timeout: float) -> None:
        """Stop the streams in flight: those still streaming are cancelled (their consumers
        get :class:`StreamInterruptedError`); those already ended get up to ``timeout``
        seconds to store their recording and finish publishing to the fleet."""
        loop = asyncio.get_running_loop()
        producers = []
        for task, flight in list(self._producers.items()):
            if task.get_loop() is not loop:  # left behind by an event loop that has ended
                del self._producers[task]
                continue
            producers.append(task)
            if not flight.done:
                task.cancel()
        if producers:
            await asyncio.wait(producers, timeout=timeout)
        for task in producers:
            task.cancel()

    async def _produce(self, flight: StreamBroadcast, request: MissRequest) -> None:
        try:
            await self._fill(flight, request)
        except asyncio.CancelledError:
            flight.fail(StreamInterruptedError("the stream was closed before its end"))
            raise
        except Exception as exc:
            # every consumer gets the error after the chunks it already has
            flight.fail(exc)

    async def _fill(self, flight: StreamBroadcast, request: MissRequest) -> None:
        gateway = self._gateway
        if gateway._semantic_mode == "shadow" and request.read:
            await gateway._shadow_probe(request.key_query)
        elif gateway._semantic is not None and request.read:
            value, hit = await gateway._semantic_lookup(request.key_query)
            if type(value) is RecordedStream:
                gateway._semantic_hits += 1
                self._count_replay(value)
                flight.publish_all(value.chunks)
                if not request.no_store:
                    # the same rule as a plain hit: never outlives, dies with, the original
                    await gateway._promote_hit(hit, request.digest, request.ttl)
                return
        if self._fleet is not None and request.read and not request.no_store:
            with lease_route(request.digest):  # the lease's calls go to its node's breaker
                await self._fleet.run(
                    request.digest,
                    flight,
                    lookup=lambda: self._lookup(request),
                    produce=lambda mirror: self._call_provider(flight, request, mirror),
                )
            return
        if request.read:
            # a flight for this key may have stored its recording since our miss
            recording = await self._lookup(request)
            if recording is not None:
                gateway._exact_hits += 1
                self._count_replay(recording)
                flight.publish_all(recording.chunks)
                return
        await self._call_provider(flight, request)

    async def _lookup(self, request: MissRequest) -> RecordedStream | None:
        value = await self._gateway._exact_get(request.key_query, request.digest)
        return value if type(value) is RecordedStream else None

    async def _call_provider(
        self,
        flight: StreamBroadcast,
        request: MissRequest,
        mirror: StreamMirror | None = None,
    ) -> None:
        """Read the provider's stream into ``flight`` (and ``mirror``), then store it.

        Raises what the provider raised, :class:`ProviderTimeoutError` when the first
        chunk or a later one is late, :class:`RateLimitExceeded` when the budget
        refuses; the broadcast is settled by the caller.
        """
        gateway = self._gateway
        budget = gateway._budget
        hold = await budget.reserve(request.query, request.user) if budget is not None else None
        gateway._misses += 1
        gateway._provider_calls += 1
        usage = StreamUsage()
        stream = _ProviderStream(request.call)
        ended = False
        try:
            chunk = await self._first_chunk(stream)
            idle = self._idle_timeout
            watchdog = None if idle is None else Watchdog(idle)
            while chunk is not _END_OF_STREAM:
                usage.add(chunk)
                flight.publish(chunk)
                if mirror is not None:
                    mirror.add(chunk)
                chunk = await self._next_chunk(stream, watchdog)
            ended = True
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                gateway._provider_errors += 1
            if budget is not None:
                # what was streamed was generated (and billed): charge that much
                used = usage.tokens(request.query) if flight.published else 0
                await budget.settle(hold, used)
            raise
        finally:
            if not ended:
                await stream.aclose()
        flight.finish()
        if mirror is not None:
            mirror.end()
        if budget is not None:
            await budget.settle(hold, usage.tokens(request.query))
        recording = flight.recording
        if not request.no_store and recording:
            await self._store(request, RecordedStream(recording))

    async def _first_chunk(self, stream: _ProviderStream) -> Any:
        timeout = self._gateway._provider_timeout
        try:
            with deadline(timeout) if timeout is not None else contextlib.nullcontext():
                await stream.open()
                return await _next_or_end(stream)
        except TimeoutError as exc:
            raise ProviderTimeoutError(
                f"the provider sent no first chunk within {timeout} s"
            ) from exc

    async def _next_chunk(self, stream: _ProviderStream, watchdog: Watchdog | None) -> Any:
        if watchdog is None:
            return await _next_or_end(stream)
        try:
            with watchdog.watch():
                return await _next_or_end(stream)
        except TimeoutError as exc:
            raise ProviderTimeoutError(
                f"the provider sent no chunk for {self._idle_timeout} s (stream_idle_timeout)"
            ) from exc

    async def _store(self, request: MissRequest, recording: RecordedStream) -> None:
        gateway = self._gateway
        await gateway._exact_put(request.key_query, request.digest, recording, request.ttl)
        semantic = gateway._semantic
        if semantic is not None:
            await gateway._semantic_guard.call(
                lambda: semantic.put(request.key_query, recording, ttl_seconds=request.ttl),
                None,
            )


_END_OF_STREAM = object()


async def _next_or_end(stream: _ProviderStream) -> Any:
    try:
        return await stream.next()
    except StopAsyncIteration:
        return _END_OF_STREAM
