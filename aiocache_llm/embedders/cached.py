"""``CachedEmbedder``: the same text is never embedded twice.

Wraps any embed function (sync or async ``str -> vector``: a local model, an API
client such as :class:`~aiocache_llm.integrations.openai.OpenAIEmbedder`) with an
in-memory LRU of vectors, optionally backed by Redis so that every process of a fleet
shares them, and coalesces concurrent requests for the same text into one call. It is
itself an async ``str -> vector`` callable, so it goes wherever an ``embed_fn`` goes::

    embed = CachedEmbedder(OpenAIEmbedder(client, model="text-embedding-3-small"),
                           url="redis://localhost:6379/0")
    cache = MemorySemanticCache(embed_fn=embed)

**Redis format.** One string key per vector, ``{key_prefix}:{model_id}:{sha256(text)}``
(hex digest of the UTF-8 text), holding the vector as raw little-endian float32 bytes:
never pickle, nothing is ever evaluated. A stored value that is not a whole number of
float32s, is empty, holds NaN or infinity, or has another dimension than this
embedder's is treated as a miss and counted (``corrupt_entries``); the fresh vector
then replaces it. The text itself is never stored.

**Failures.** Redis is a cache, never a dependency: every Redis call runs under a
:class:`~aiocache_llm.core.guard.BackendGuard` (a deadline and a circuit breaker), and
a failed or skipped read or write is counted (``backend_errors``, ``backend_skipped``)
and the text embedded as if Redis were not there. Errors of the embed function itself
propagate to every caller waiting for that text, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio.to_thread
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.core.errors import ClosedResourceError, InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.guard import BackendGuard
from aiocache_llm.core.validation import (
    check_bool,
    check_callable,
    check_id,
    check_optional_positive_number,
    check_positive_int,
    check_positive_number,
)

__all__ = ["CachedEmbedder", "CachedEmbedderStats"]

Vector = npt.NDArray[np.float32]

_log = logging.getLogger(__name__)
_NUMERIC_KINDS = frozenset("iuf")
_GLOB_CHARACTERS = frozenset("*?[]\\")
_MAX_MODEL_ID = 256


class CachedEmbedderStats(BaseModel):
    """A frozen snapshot of a :class:`CachedEmbedder`'s counters (this process's).

    Every call is exactly one of ``hits`` (in memory), ``redis_hits``, ``coalesced``
    (joined a call already in flight for the same text) or ``embedded`` (the embed
    function was called; failures included, also counted in ``embed_errors``).
    """

    model_config = ConfigDict(frozen=True)

    hits: int = 0
    redis_hits: int = 0
    coalesced: int = 0
    embedded: int = 0
    embed_errors: int = 0
    size: int = 0
    """Vectors held in memory now."""
    evictions: int = 0
    """Vectors dropped from memory to respect ``max_size``."""
    corrupt_entries: int = 0
    """Redis values found unusable (treated as misses, then overwritten)."""
    backend_errors: int = 0
    """Redis reads and writes that failed or overran their deadline."""
    backend_skipped: int = 0
    """Redis calls not made because its circuit breaker was open."""

    @property
    def requests(self) -> int:
        """Calls answered or attempted: hits, Redis hits, coalesced and embedded."""
        return self.hits + self.redis_hits + self.coalesced + self.embedded

    @property
    def hit_rate(self) -> float:
        """The share of calls that did not call the embed function, in [0, 1]."""
        total = self.requests
        return (total - self.embedded) / total if total else 0.0


class _VectorStore(RedisBackend):
    """The Redis side: one string per vector, read and written whole."""

    async def read(self, key: str) -> bytes | None:
        self._check_open()
        try:
            value = await self._redis.get(key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "read an embedding") from exc
        return value if isinstance(value, bytes) else None

    async def write(self, key: str, value: bytes, ttl_seconds: float | None) -> None:
        self._check_open()
        px = None if ttl_seconds is None else max(1, math.ceil(ttl_seconds * 1000))
        try:
            await self._redis.set(key, value, px=px)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "store an embedding") from exc


def _is_async_callable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _check_model_id(value: object) -> str:
    model_id = check_id("model_id", value)
    if len(model_id) > _MAX_MODEL_ID:
        raise InvalidInputError(f"model_id must be at most {_MAX_MODEL_ID} characters")
    if _GLOB_CHARACTERS.intersection(model_id) or not model_id.isprintable():
        raise InvalidInputError(
            f"model_id must be printable and free of glob characters, got {model_id!r}"
        )
    return model_id


def as_vector(raw: object, dimension: int | None, *, what: str = "embedding") -> Vector:
    """``raw`` (a sequence or 1-D array of real numbers) as a new float32 array.

    Raises :class:`InvalidInputTypeError` for anything not numeric and
    :class:`InvalidInputError` for an empty, non-1-D, wrong-dimension or non-finite
    vector (values beyond float32's range count as infinite).
    """
    if isinstance(raw, (str, bytes, bytearray)) or raw is None:
        raise InvalidInputTypeError(
            f"{what} must be a sequence of numbers, got {type(raw).__name__}"
        )
    try:
        array = np.asarray(raw)
    except ValueError as exc:  # ragged nested sequences
        raise InvalidInputError(f"{what} must be a flat sequence of numbers: {exc}") from exc
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInputTypeError(
            f"{what} must hold real numbers, got {type(raw).__name__} of dtype {array.dtype}"
        )
    if array.ndim != 1 or array.size == 0:
        raise InvalidInputError(f"{what} must be a non-empty 1-D vector, got shape {array.shape}")
    if dimension is not None and array.size != dimension:
        raise InvalidInputError(f"{what} has dimension {array.size}, expected {dimension}")
    with np.errstate(over="ignore"):
        vector = np.array(array, dtype=np.float32)  # always a copy of its own
    if not np.isfinite(vector).all():
        raise InvalidInputError(f"{what} contains NaN or infinite values")
    return vector


class CachedEmbedder:
    """An embed function that never embeds the same text twice.

    ``await embedder(text)`` returns the float32 vector of ``text`` (a new array each
    call, so callers may modify it): from memory, from Redis, from a call already in
    flight for the same text, or from ``embed_fn``. Vectors are returned as
    ``embed_fn`` gave them (not normalized).

    - ``embed_fn``: sync or async ``str -> vector``. An async one is awaited; a sync one
      runs in a worker thread (``embed_in_thread=True``, the default, so a model never
      blocks the event loop; different texts may then be embedded in several threads
      at once, so a model that is not thread-safe needs its own lock) or inline
      (``False``, for microsecond embedders).
    - ``max_size``: vectors kept in memory (LRU); at 1536 float32s a vector is 6 KB.
    - ``url=`` or ``client=``: a Redis that keeps the vectors for every process
      (``client`` is the caller's to close; one built from ``url`` is closed by
      :meth:`aclose`). ``key_prefix`` names them; ``ttl_seconds`` bounds their life
      there (``None``: no expiry). ``redis_timeout`` (seconds) bounds each Redis call;
      a new vector is written before it is returned, so another process finds it.
    - ``model_id``: which model's vectors these are; part of every Redis key, so a new
      model or dimension never reads another's vectors. Defaults to ``embed_fn.model_id``
      when it has one (:class:`~aiocache_llm.integrations.openai.OpenAIEmbedder` does);
      required with Redis otherwise.
    - ``dimension``: every vector's length; learned from the first one when ``None``.

    Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` for bad options,
    a non-``str`` text, and a vector from ``embed_fn`` that is empty, not 1-D, of
    another dimension or not finite (not stored); whatever ``embed_fn`` raises
    propagates (to every caller sharing that call). Redis failures never raise (see
    the module docstring). Cancelling a call stops that caller waiting; the embedding
    goes on for the others and is kept. After :meth:`aclose`, calls raise
    :class:`ClosedResourceError`. Use it from one event loop at a time.
    """

    def __init__(
        self,
        embed_fn: Callable[[str], Any],
        *,
        max_size: int = 4096,
        url: str | None = None,
        client: Redis | None = None,
        key_prefix: str = "aiocache_llm:embeddings",
        model_id: str | None = None,
        ttl_seconds: float | None = None,
        dimension: int | None = None,
        embed_in_thread: bool = True,
        redis_timeout: float = 0.5,
    ) -> None:
        self._embed_fn = check_callable("embed_fn", embed_fn)
        self._is_async = _is_async_callable(embed_fn)
        self._in_thread = check_bool("embed_in_thread", embed_in_thread)
        self._max_size = check_positive_int("max_size", max_size)
        self._dimension = None if dimension is None else check_positive_int("dimension", dimension)
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        if model_id is None:
            model_id = getattr(embed_fn, "model_id", None)
        if model_id is None and (url is not None or client is not None):
            raise InvalidInputError(
                "model_id is required with Redis (the embed function has no model_id): "
                "it keeps the vectors of different models apart"
            )
        self._model_id = _check_model_id(model_id) if model_id is not None else None
        self._store: _VectorStore | None = None
        if url is not None or client is not None:
            self._store = _VectorStore(url=url, client=client, key_prefix=key_prefix)
        self._guard = BackendGuard(
            f"CachedEmbedder redis {key_prefix!r}",
            timeout=check_positive_number("redis_timeout", redis_timeout),
        )
        self._vectors: OrderedDict[bytes, Vector] = OrderedDict()
        self._flights: dict[bytes, asyncio.Task[Vector]] = {}
        self._closed = False
        self._hits = 0
        self._redis_hits = 0
        self._coalesced = 0
        self._embedded = 0
        self._embed_errors = 0
        self._evictions = 0
        self._corrupt = 0
        self._warned_corrupt = False

    def __repr__(self) -> str:
        redis = repr(self._store.key_prefix) if self._store is not None else None
        name = getattr(self._embed_fn, "__qualname__", None) or type(self._embed_fn).__name__
        return (
            f"CachedEmbedder({name}, model_id={self._model_id!r}, dimension={self._dimension}, "
            f"size={len(self._vectors)}/{self._max_size}, redis={redis}, hits={self._hits}, "
            f"redis_hits={self._redis_hits}, embedded={self._embedded})"
        )

    @property
    def model_id(self) -> str | None:
        """The model id in this embedder's Redis keys (``None`` without one, memory only)."""
        return self._model_id

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called."""
        return self._closed

    @property
    def dimension(self) -> int | None:
        """The length of every vector, or ``None`` until the first one is known."""
        return self._dimension

    def stats(self) -> CachedEmbedderStats:
        """Return a frozen snapshot of the counters."""
        return CachedEmbedderStats(
            hits=self._hits,
            redis_hits=self._redis_hits,
            coalesced=self._coalesced,
            embedded=self._embedded,
            embed_errors=self._embed_errors,
            size=len(self._vectors),
            evictions=self._evictions,
            corrupt_entries=self._corrupt,
            backend_errors=self._guard.errors,
            backend_skipped=self._guard.skipped,
        )

    async def __call__(self, text: str) -> Vector:
        """Return the vector of ``text`` (see the class docstring for sources and errors)."""
        if type(text) is not str:
            raise InvalidInputTypeError(f"text must be a str, got {type(text).__name__}")
        if self._closed:
            raise ClosedResourceError("CachedEmbedder is closed")
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        vector = self._vectors.get(digest)
        if vector is not None:
            self._vectors.move_to_end(digest)
            self._hits += 1
            copy: Vector = vector.copy()
            return copy
        flight = self._flights.get(digest)
        if flight is None or flight.get_loop() is not asyncio.get_running_loop():
            flight = asyncio.ensure_future(self._fill(digest, text))
            self._flights[digest] = flight
            flight.add_done_callback(lambda done: self._land(digest, done))
        else:
            self._coalesced += 1
        # shielded: one caller's cancellation must not cancel the call the others share
        try:
            shared: Vector = await asyncio.shield(flight)
        except asyncio.CancelledError:
            # Task.cancelling() is 3.11+: before it, a close is taken for the reason
            cancelling = getattr(asyncio.current_task(), "cancelling", None)
            caller_cancelled = bool(cancelling()) if callable(cancelling) else False
            if flight.cancelled() and self.closed and not caller_cancelled:
                # the embedder was closed under us, the caller was not cancelled
                raise ClosedResourceError("CachedEmbedder was closed while embedding") from None
            raise
        result: Vector = shared.copy()
        return result

    async def aclose(self) -> None:
        """Cancel the embeddings in flight (their callers get :class:`ClosedResourceError`),
        forget the vectors and close the Redis client built from ``url`` (not one passed
        as ``client``). Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        flights = list(self._flights.values())
        for flight in flights:
            flight.cancel()
        if flights:
            await asyncio.gather(*flights, return_exceptions=True)
        self._vectors.clear()
        if self._store is not None:
            await self._store.aclose()

    async def __aenter__(self) -> CachedEmbedder:
        if self._closed:
            raise ClosedResourceError("CachedEmbedder is closed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the one call per text ----------------------------------------------------------

    def _land(self, digest: bytes, flight: asyncio.Task[Vector]) -> None:
        if self._flights.get(digest) is flight:
            del self._flights[digest]
        if not flight.cancelled():
            flight.exception()  # retrieved: every waiter may have been cancelled

    async def _fill(self, digest: bytes, text: str) -> Vector:
        key = self._redis_key(digest)
        if key is not None:
            vector = await self._read(key)
            if vector is not None:
                self._redis_hits += 1
                self._remember(digest, vector)
                return vector
        self._embedded += 1
        try:
            raw = await self._embed(text)
            vector = as_vector(raw, self._dimension, what="embed_fn's vector")
        except BaseException:
            self._embed_errors += 1
            raise
        self._remember(digest, vector)
        if key is not None and self._store is not None:
            data = vector.astype("<f4").tobytes()
            store, ttl = self._store, self._ttl
            await self._guard.call(lambda: store.write(key, data, ttl), None)
        return vector

    async def _embed(self, text: str) -> object:
        raw: object
        if self._is_async:
            raw = await self._embed_fn(text)
        elif self._in_thread:
            raw = await anyio.to_thread.run_sync(self._embed_fn, text, abandon_on_cancel=True)
        else:
            raw = self._embed_fn(text)
        if type(raw) is not np.ndarray and inspect.isawaitable(raw):
            raw = await raw  # a sync wrapper (a partial, a lambda) around a coroutine
        return raw

    def _redis_key(self, digest: bytes) -> str | None:
        if self._store is None:
            return None
        return f"{self._store.key_prefix}:{self._model_id}:{digest.hex()}"

    async def _read(self, key: str) -> Vector | None:
        store = self._store
        assert store is not None
        data: bytes | None = await self._guard.call(lambda: store.read(key), None)
        if data is None:
            return None
        vector = self._decode(data)
        if vector is None:
            self._corrupt += 1
            if not self._warned_corrupt:
                self._warned_corrupt = True
                _log.warning(
                    "CachedEmbedder: an unusable vector under %r was treated as a miss "
                    "(counted in corrupt_entries; logged once)",
                    store.key_prefix,
                )
        return vector

    def _decode(self, data: bytes) -> Vector | None:
        """A stored vector, or ``None`` when it is not one this embedder could have written."""
        if not data or len(data) % 4:
            return None
        vector = np.frombuffer(data, dtype="<f4").astype(np.float32)  # a writable copy
        if self._dimension is not None and vector.shape[0] != self._dimension:
            return None
        if not np.isfinite(vector).all():
            return None
        return vector

    def _remember(self, digest: bytes, vector: Vector) -> None:
        if self._dimension is None:
            self._dimension = int(vector.shape[0])
        vector.flags.writeable = False  # callers get copies; this one is never changed
        self._vectors[digest] = vector
        self._vectors.move_to_end(digest)
        while len(self._vectors) > self._max_size:
            self._vectors.popitem(last=False)
            self._evictions += 1
