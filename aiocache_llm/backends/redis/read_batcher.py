"""``ReadBatcher``: concurrent GETs of one client become one MGET, with no wait for a lone read.

While no read is in flight, a ``get`` is sent at once as a plain GET: a lone caller
pays nothing. Reads that arrive while one is in flight queue up; when it returns,
everything queued leaves as one ``MGET`` (at most ``max_batch`` keys), and so on.
Under concurrency this turns N round trips and N command parses into one, which
is where redis-py spends most of its time per command.

Cancellation: a cancelled caller stops waiting; its key may still be read as part
of a batch, and its result is dropped. A failed batch fails each of its callers
with the mapped :class:`BackendError`.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, backend_error

__all__ = ["ReadBatcher"]


class ReadBatcher:
    """Batches concurrent GETs issued through one ``redis.asyncio.Redis`` client."""

    __slots__ = (
        "_batch_task",
        "_batches",
        "_in_flight",
        "_max_batch",
        "_queued",
        "_reads",
        "_redis",
    )

    def __init__(self, redis: Redis, *, max_batch: int = 256) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._queued: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._in_flight = False
        self._reads = 0
        self._batches = 0
        # the loop holds tasks weakly: the batch in flight must be held here
        self._batch_task: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (
            f"ReadBatcher(reads={self._reads}, batches={self._batches}, queued={len(self._queued)})"
        )

    async def get(self, key: str) -> bytes | None:
        """Return the value at ``key`` (``None`` if absent); raises :class:`BackendError`."""
        self._reads += 1
        if self._in_flight:
            future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
            self._queued.append((key, future))
            return await future
        self._in_flight = True
        try:
            value: bytes | None = await self._redis.get(key)  # type: ignore[assignment]
            return value
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc
        finally:
            self._in_flight = False
            self._send_queued()

    def _send_queued(self) -> None:
        if not self._queued:
            return
        batch = self._queued[: self._max_batch]
        del self._queued[: self._max_batch]
        self._in_flight = True
        self._batches += 1
        self._batch_task = asyncio.ensure_future(self._read_batch(batch))

    async def _read_batch(self, batch: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
        try:
            values = await self._redis.mget([key for key, _ in batch])
        except Exception as exc:
            error = backend_error(exc, "get") if isinstance(exc, DRIVER_ERRORS) else exc
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), value in zip(batch, values, strict=True):
                if not future.done():
                    future.set_result(value)  # type: ignore[arg-type]
        finally:
            self._in_flight = False
            self._send_queued()
