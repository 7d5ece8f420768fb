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

On a Redis Cluster (a ``RedisCluster`` client) a batcher keeps one batch per node:
each request goes to the batch of the primary serving its key's slot, so a slow or
failing node delays and fails only its own callers. A node's batch of ``GET``s
becomes one ``MGET`` per hash slot, sent together in one pipeline to that node; a
node's script runs are one pipeline to that node. No command ever spans two slots.
A request routed to a node that lost its slot (a failover, a resharding) is still
sent by slot: the client follows the redirection.

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
from redis.asyncio.cluster import RedisCluster

from aiocache_llm.backends.redis.cluster import (
    get_during_migration,
    is_slot_in_motion,
    slot_groups,
)
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, backend_error
from aiocache_llm.backends.redis.lane import CommandLane

__all__ = ["GetBatcher", "ScriptBatcher"]

Request = TypeVar("Request")


class _Batcher(Generic[Request]):
    """Sends one request at once, or every queued one together when one is in flight."""

    operation = "command"

    def __init__(self, redis: Redis | RedisCluster, *, max_batch: int = 256) -> None:
        self._redis = redis
        self._cluster = redis if isinstance(redis, RedisCluster) else None
        self._lane = CommandLane(redis)  # on a cluster: the client itself, routed per command
        self._max_batch = max_batch
        # on a cluster, the batcher a request goes to: one per node, by node name
        self._nodes: dict[str, _Batcher[Request]] = {}
        self._is_node = False
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

    def _node_batcher(self, key: Any) -> _Batcher[Request]:
        """The batcher of the node serving ``key`` (self on a single server)."""
        if self._cluster is None or self._is_node:
            return self
        try:
            node = self._cluster.get_node_from_key(key)
            name = node.name if node is not None else ""
        except Exception:  # no topology yet, or a slot not served: sent by slot anyway
            name = ""
        batcher = self._nodes.get(name)
        if batcher is None:
            batcher = self._nodes[name] = self._spawn()
            batcher._is_node = True
        return batcher

    def _spawn(self) -> _Batcher[Request]:
        """A batcher like this one, for the requests of one cluster node."""
        raise NotImplementedError

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
        for batcher in list(self._nodes.values()):
            await batcher.aclose()

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
        value: bytes | None = await self._node_batcher(key)._submit(key)
        return value

    def _spawn(self) -> GetBatcher:
        return GetBatcher(self._redis, max_batch=self._max_batch)

    async def _send_one(self, request: str) -> Any:
        try:
            return await self._lane.execute("GET", request)
        except DRIVER_ERRORS as exc:
            if self._cluster is None or not is_slot_in_motion(exc):
                raise
            return await get_during_migration(self._cluster, request)

    async def _send_many(self, requests: list[str]) -> Sequence[Any]:
        if self._cluster is None:
            # batches never overlap a lone command: the lane is free
            result: Sequence[Any] = await self._lane.execute("MGET", *requests)
            return result
        groups = list(slot_groups(requests).values())
        if len(groups) == 1:
            try:
                return list(await self._cluster.execute_command("MGET", *requests))
            except DRIVER_ERRORS as exc:
                if not is_slot_in_motion(exc):
                    raise
                return await self._get_each(self._cluster, requests)
        # one MGET per slot (a multi-key command never spans slots), one pipeline
        results: list[Any] = [None] * len(requests)
        async with self._cluster.pipeline(transaction=False) as pipe:
            for positions in groups:
                pipe.execute_command("MGET", *(requests[i] for i in positions))
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        split: list[int] = []  # positions whose slot is being migrated
        for positions, reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException) and is_slot_in_motion(reply):
                split.extend(positions)
                continue
            for index, position in enumerate(positions):
                results[position] = reply if isinstance(reply, BaseException) else reply[index]
        if split:
            each = await self._get_each(self._cluster, [requests[i] for i in split])
            for position, result in zip(split, each, strict=True):
                results[position] = result
        return results

    @staticmethod
    async def _get_each(cluster: RedisCluster, keys: list[str]) -> list[Any]:
        """One ``GET`` per key, in one pipeline: the fallback for an ``MGET`` whose slot
        is being migrated (TRYAGAIN while its keys are split between two nodes; a
        single key follows the ASK redirection instead). A ``GET`` that still finds its
        slot in motion is read again with :func:`get_during_migration`."""
        async with cluster.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.execute_command("GET", key)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        # a GET can exhaust its redirections too: redis-py sends ASKING on another
        # connection than the redirected command, which then bounces ASK/MOVED.
        # Read again together: each within its own deadline, not one after another.
        again = [
            index
            for index, reply in enumerate(replies)
            if isinstance(reply, BaseException) and is_slot_in_motion(reply)
        ]
        if again:
            results = await asyncio.gather(
                *(get_during_migration(cluster, keys[index]) for index in again),
                return_exceptions=True,
            )
            for index, result in zip(again, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, DRIVER_ERRORS):
                    raise result
                replies[index] = result
        return replies


ScriptRun = tuple[Sequence[Any], Sequence[Any], str]
"""One run of a script: its keys, its arguments, the operation it serves."""


class ScriptBatcher(_Batcher[ScriptRun]):
    """Concurrent runs of one Lua script leave as one pipeline of ``EVALSHA``.

    The script is loaded on first use and again whenever the server has lost it
    (``NOSCRIPT`` after a restart or ``SCRIPT FLUSH``); the runs it failed are retried
    once, each on its own.
    """

    def __init__(
        self, redis: Redis | RedisCluster, source: str, *, operation: str, max_batch: int = 256
    ) -> None:
        super().__init__(redis, max_batch=max_batch)
        self.operation = operation
        self._source = source
        self._script = redis.register_script(source)

    def _spawn(self) -> ScriptBatcher:
        return ScriptBatcher(
            self._redis, self._source, operation=self.operation, max_batch=self._max_batch
        )

    async def run(
        self, keys: Sequence[Any], args: Sequence[Any], *, operation: str | None = None
    ) -> Any:
        """Run the script once with ``keys`` and ``args``; raises :class:`BackendError`.

        ``operation`` names the caller's operation in error messages.
        """
        batcher = self._node_batcher(keys[0]) if keys else self
        return await batcher._submit((keys, args, operation or self.operation))

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
