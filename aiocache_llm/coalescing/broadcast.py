"""``StreamBroadcast``: one stream's chunks, fanned out live to any number of consumers.

The producer (a provider stream, a cache replay or a relay of another process's
stream) calls :meth:`StreamBroadcast.publish` for each chunk and then
:meth:`~StreamBroadcast.finish` or :meth:`~StreamBroadcast.fail`. Every consumer holds a
:class:`Subscription`: a read position in one shared log. A consumer that subscribes
late starts at the first chunk, reads everything produced so far without waiting,
then the live chunks. Publishing never waits for anybody: it appends to the log and
wakes the consumers that are waiting (one future each, resolved once per batch of
chunks they have not read yet), so the producer's cost per chunk does not grow with
slow consumers.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from aiocache_llm.core.codec import IMMUTABLE_VALUE_TYPES, ValueCodec
from aiocache_llm.core.errors import (
    InvalidInputError,
    StreamInterruptedError,
)

__all__ = ["ProducerLost", "StreamBroadcast", "Subscription"]


class ProducerLost(Exception):
    """The producer stopped without an outcome (another process died mid-stream).

    Internal: a consumer that has read nothing yet starts over instead of seeing it;
    one that has read chunks gets a :class:`StreamInterruptedError`.
    """


class _Copy:
    """A mutable chunk kept encoded: every consumer builds a copy of its own with ``make``."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


_END = object()


class StreamBroadcast:
    """One stream's chunk log, shared by its producer and all its consumers.

    Mutation safety: an immutable chunk (``str``, numbers) is handed out as it is;
    a mutable one (a dict, a pydantic model such as an SDK chunk) is encoded once on
    arrival and every consumer gets a copy decoded from that frame, so no consumer
    can change what another one, or the cache, receives. A chunk that cannot be
    encoded (not a cacheable type) is handed to everyone as the same object and
    makes the stream unstorable.

    Memory: the log keeps every chunk while the stream fits in ``max_bytes``
    (encoded size), so that late joiners replay it whole and the recording can be
    stored. Past that bound the stream is neither stored (``recording`` becomes
    None) nor open to new joiners (``joinable`` is False); chunks every consumer has
    read are dropped, and a consumer that falls more than ``max_bytes`` behind the
    producer gets :class:`StreamInterruptedError` on its next read. So a stream in
    flight holds at most about ``max_bytes`` of encoded chunks (plus the originals
    kept for storing, while it is storable).

    ``on_abandoned`` is called once when the last consumer leaves (closes its
    subscription, or drops it unreferenced: then on the loop's next turn) before the
    outcome is known. Created in, and used from, one event loop.
    """

    def __init__(
        self,
        codec: ValueCodec,
        *,
        max_bytes: int,
        on_abandoned: Callable[[], None] | None = None,
    ) -> None:
        self._codec = codec
        self._max_bytes = max_bytes
        self.on_abandoned = on_abandoned
        self._items: list[Any] = []  # what consumers get: the chunk itself, or a _Copy
        self._sizes: list[int] = []
        self._offset = 0  # stream position of self._items[0]
        self._retained = 0  # bytes held in self._items
        self._recording: list[Any] | None = []
        self._outcome: Any = None  # _END, or the exception every consumer gets
        self._waiters: list[asyncio.Future[None]] = []
        self._subscribers: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._loop = asyncio.get_running_loop()
        self.joinable = True
        """False once a new consumer may no longer join (past the size bound)."""

    def __repr__(self) -> str:
        state = "open" if self._outcome is None else "ended" if self._outcome is _END else "failed"
        return (
            f"StreamBroadcast({state}, chunks={self.published}, "
            f"consumers={len(self._subscribers)}, retained_bytes={self._retained})"
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this stream lives in."""
        return self._loop

    @property
    def published(self) -> int:
        """Chunks published so far."""
        return self._offset + len(self._items)

    @property
    def recording(self) -> list[Any] | None:
        """Every chunk in order while the stream is storable, else None."""
        return self._recording

    @property
    def done(self) -> bool:
        """Whether the outcome (end or error) is known."""
        return self._outcome is not None

    @property
    def consumers(self) -> int:
        """Consumers still subscribed."""
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        """Return a new consumer positioned at the first chunk.

        Raises :class:`StreamInterruptedError` when the log no longer starts at the
        first chunk (the stream outgrew ``max_bytes``): check ``joinable`` first.
        """
        if self._offset:
            raise StreamInterruptedError(
                "this stream outgrew its in-flight size bound and dropped its first chunks"
            )
        subscription = Subscription(self)
        self._subscribers.add(subscription)
        return subscription

    # -- producer side: never awaits ----------------------------------------------

    def publish(self, chunk: Any) -> None:
        """Append ``chunk`` and wake the waiting consumers; O(size of chunk)."""
        if self._outcome is not None:
            raise RuntimeError("publish() after the stream's outcome")
        try:
            frame = self._codec.encode_chunk(chunk)
        except InvalidInputError:
            # not cacheable (or larger than the cache takes): pass it on, store nothing
            self._recording = None
            item, size = chunk, sys.getsizeof(chunk)
        else:
            if type(chunk) in IMMUTABLE_VALUE_TYPES:
                item = chunk
            else:
                item = _Copy(self._codec.copier(chunk, frame))
            size = len(frame)
        if self._recording is not None:
            self._recording.append(chunk)
        self._items.append(item)
        self._sizes.append(size)
        self._retained += size
        if self._retained > self._max_bytes:
            self._recording = None
            self.joinable = False
            self._trim()
        self._wake()

    def publish_all(self, chunks: Iterable[Any]) -> None:
        """Publish every chunk of a finished answer (a cache replay), then finish."""
        for chunk in chunks:
            self.publish(chunk)
        self.finish()

    def finish(self) -> None:
        """The stream ended normally: consumers stop after the last chunk."""
        self._settle(_END)

    def fail(self, error: BaseException) -> None:
        """The stream failed: consumers get ``error`` after the chunks published so far.

        A failed stream takes no new joiners: a request arriving now starts afresh.
        """
        self._recording = None
        self.joinable = False
        self._settle(error)

    def _settle(self, outcome: Any) -> None:
        if self._outcome is None:
            self._outcome = outcome
            self.on_abandoned = None
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _trim(self) -> None:
        # drop what every consumer has read, then, while still too big, what the
        # slowest have not: they will be told they fell behind
        live = [s._position for s in self._subscribers]
        drop = min(live, default=self.published) - self._offset
        while (drop > 0 or self._retained > self._max_bytes) and len(self._items) > 1:
            self._retained -= self._sizes[0]
            del self._items[0], self._sizes[0]
            self._offset += 1
            drop -= 1

    # -- consumer side ------------------------------------------------------------

    def _leave(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        self._check_abandoned()

    def _check_abandoned(self) -> None:
        if not self._subscribers and self._outcome is None and self.on_abandoned is not None:
            callback, self.on_abandoned = self.on_abandoned, None
            callback()


class Subscription:
    """One consumer's read position in a :class:`StreamBroadcast`; an async iterator.

    ``__anext__`` returns at once while chunks are waiting and otherwise awaits a
    future of its own (so cancelling one consumer never touches another). It raises
    the stream's error after the chunks published before it. ``close()`` (or
    dropping the object) leaves the broadcast.
    """

    __slots__ = ("__weakref__", "_broadcast", "_closed", "_position")

    def __init__(self, broadcast: StreamBroadcast) -> None:
        self._broadcast = broadcast
        self._position = 0
        self._closed = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        # the hot path of every consumer for every chunk: fields read directly
        broadcast = self._broadcast
        while not self._closed:
            index = self._position - broadcast._offset
            if index < len(broadcast._items):
                if index < 0:
                    self.close()
                    raise StreamInterruptedError(
                        f"this consumer fell more than {broadcast._max_bytes} bytes behind "
                        "the stream and its next chunks were dropped"
                    )
                item = broadcast._items[index]
                self._position += 1
                if type(item) is _Copy:
                    return item.make()
                return item
            outcome = broadcast._outcome
            if outcome is not None:
                self.close()
                if outcome is _END:
                    raise StopAsyncIteration
                raise outcome
            waiter: asyncio.Future[None] = broadcast._loop.create_future()
            broadcast._waiters.append(waiter)
            await waiter
        raise StopAsyncIteration

    @property
    def position(self) -> int:
        """Chunks this consumer has read."""
        return self._position

    def close(self) -> None:
        """Stop consuming; idempotent. The last consumer out may end the producer."""
        if not self._closed:
            self._closed = True
            self._broadcast._leave(self)

    def __del__(self) -> None:
        # dropped without close(): the garbage collector may run this in any thread,
        # so the check runs in the loop, once the weak set has forgotten this object
        if not self._closed:
            loop = self._broadcast._loop
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._broadcast._check_abandoned)
