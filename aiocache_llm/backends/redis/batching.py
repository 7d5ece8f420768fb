"""Automatic batching: concurrent commands on one client share round trips.

While nothing is in flight, a command is sent at once on its own, on the batcher's
:class:`CommandLane` (one connection held from the client's pool): a lone caller
pays less than a plain ``execute_command``. Commands that arrive while one is in
flight queue up; when it returns, everything queued leaves together (at most
``max_batch``), and so on.
Under concurrency this turns N round trips and N reply parses into one, which is
where redis-py spends most of its time per command.

- :class:`GetBatcher` turns queued ``GET``s into one ``MGET``.
- :class:`ScriptBatcher` sends queued runs of one Lua script as one pipeline of
  ``EVALSHA`` (no ``MULTI``): each run stays atomic on the server on its own.

Cancellation: a cancelled caller stops waiting; its command may still run as part
of a batch, and its result is dropped. A failed command (or batch) fails its callers
with the mapped :class:`BackendError`, the driver's error as its ``__cause__``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, backend_error
from aiocache_llm.backends.redis.lane import CommandLane

__all__ = ["GetBatcher", "ScriptBatcher"]

Request = TypeVar("Request")


class _Batcher(Generic[Request]):
    """Sends one request at once, or every queued one together when one is in flight."""

    operation = "command"

    def __init__(self, redis: Redis, *, max_batch: int = 256) -> None:
        self._redis = redis
        self._lane = CommandLane(redis)
        self._max_batch = max_batch
        self._queued: list[tuple[Request, asyncio.Future[Any]]] = []
        self._in_flight = False
        self._sent = 0
        self._batches = 0
        # the loop holds tasks weakly: the batch in flight must be held here
        self._batch_task: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sent={self._sent}, batches={self._batches}, "
            f"queued={len(self._queued)})"
        )

    async def _submit(self, request: Request) -> Any:
        self._sent += 1
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # what a loop that has ended left in flight or queued will never be answered
            self._loop = loop
            self._in_flight = False
            self._queued.clear()
            self._batch_task = None
        if self._in_flight:
            future: asyncio.Future[Any] = loop.create_future()
            self._queued.append((request, future))
            return await future
        self._in_flight = True
        try:
            return await self._send_one(request)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, self._operation_of(request)) from exc
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
        self._batch_task = asyncio.ensure_future(self._run_batch(batch))

    async def _run_batch(self, batch: list[tuple[Request, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._send_many([request for request, _ in batch])
        except Exception as exc:
            for request, future in batch:
                error = exc
                if isinstance(exc, DRIVER_ERRORS):
                    error = backend_error(exc, self._operation_of(request))
                    error.__cause__ = exc
                if not future.done():
                    future.set_exception(error)
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (request, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, DRIVER_ERRORS):
                    error = backend_error(result, self._operation_of(request))
                    error.__cause__ = result  # as ``raise ... from`` would on the lone path
                    future.set_exception(error)
                else:
                    future.set_result(result)
        finally:
            self._in_flight = False
            self._send_queued()

    async def aclose(self) -> None:
        """Give the lane's connection back to the client's pool (used again, it re-takes one)."""
        await self._lane.aclose()

    def _operation_of(self, request: Request) -> str:
        """The operation an error of ``request`` is reported under."""
        return self.operation

    async def _send_one(self, request: Request) -> Any:
        raise NotImplementedError

    async def _send_many(self, requests: list[Request]) -> Sequence[Any]:
        """Results in request order; a per-request driver error may stand in a result."""
        raise NotImplementedError


class GetBatcher(_Batcher[str]):
    """Concurrent ``GET``s of one client become one ``MGET``."""

    operation = "get"

    async def get(self, key: str) -> bytes | None:
        """Return the value at ``key`` (``None`` if absent); raises :class:`BackendError`."""
        value: bytes | None = await self._submit(key)
        return value

    async def _send_one(self, request: str) -> Any:
        return await self._lane.execute("GET", request)

    async def _send_many(self, requests: list[str]) -> Sequence[Any]:
        # batches never overlap a lone command: the lane is free
        result: Sequence[Any] = await self._lane.execute("MGET", *requests)
        return result


ScriptRun = tuple[Sequence[Any], Sequence[Any], str]
"""One run of a script: its keys, its arguments, the operation it serves."""


class ScriptBatcher(_Batcher[ScriptRun]):
    """Concurrent runs of one Lua script leave as one pipeline of ``EVALSHA``.

    The script is loaded on first use and again whenever the server has lost it
    (``NOSCRIPT`` after a restart or ``SCRIPT FLUSH``); the runs it failed are retried
    once, each on its own.
    """

    def __init__(self, redis: Redis, source: str, *, operation: str, max_batch: int = 256) -> None:
        super().__init__(redis, max_batch=max_batch)
        self.operation = operation
        self._script = redis.register_script(source)

    async def run(
        self, keys: Sequence[Any], args: Sequence[Any], *, operation: str | None = None
    ) -> Any:
        """Run the script once with ``keys`` and ``args``; raises :class:`BackendError`.

        ``operation`` names the caller's operation in error messages.
        """
        return await self._submit((keys, args, operation or self.operation))

    def _operation_of(self, request: ScriptRun) -> str:
        return request[2]

    async def _send_one(self, request: ScriptRun) -> Any:
        keys, args, _ = request
        # EVALSHA directly: Script.__call__ costs a few us more per run (measured)
        try:
            return await self._lane.execute("EVALSHA", self._script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            return await self._script(keys=keys, args=args)  # loads it, then runs it

    async def _send_many(self, requests: list[ScriptRun]) -> Sequence[Any]:
        sha = self._script.sha
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in requests:
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        for index, result in enumerate(results):
            if isinstance(result, redis_errors.NoScriptError):
                keys, args, _ = requests[index]
                try:
                    results[index] = await self._script(keys=keys, args=args)
                except DRIVER_ERRORS as exc:
                    results[index] = exc
        return results
