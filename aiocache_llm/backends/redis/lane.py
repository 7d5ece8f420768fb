"""``CommandLane``: one pooled connection, held, for commands sent one at a time.

``Redis.execute_command`` borrows a connection from the pool for every command and
gives it back: two pool-lock acquisitions, observability hooks and a retry wrapper
around each send. On loopback that measured about 50 us of a 170 us ``GET`` (redis-py
8.1). A batcher never has more than one command in flight, so it keeps one
connection checked out of the client's pool and talks on it directly.

- The connection is the pool's own (same address, credentials, TLS, timeouts,
  protocol), taken on first use and held until :meth:`aclose`; closing the client
  disconnects it like any other in-use connection, and the next command reconnects.
- A pool too small to spare a connection (``max_connections`` below
  :data:`MIN_POOL_SIZE`) is never held from: commands then go through the client.
  So are all commands of a ``RedisCluster`` (it routes each one to the node serving
  its key's slot, which one held connection could not).
- Before each command the connection is checked as the pool checks it at checkout
  (a socket the server closed is reconnected first), so a server restart costs no
  failed command. Commands are never resent: a command whose reply was lost may have been applied.
- Cancellation or an error in mid-command drops the connection (redis-py disconnects
  it), so a late reply can never be read as the answer to the next command.
- Used from another event loop, the lane lets go of the connection it held for the
  old one (see :func:`~aiocache_llm.backends.redis.connection.bind_to_running_loop`).

Not safe for concurrent use: the owner sends one command at a time, and a second
concurrent command raises ``RuntimeError`` instead of interleaving replies.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection

__all__ = ["MIN_POOL_SIZE", "CommandLane"]

MIN_POOL_SIZE = 8
"""Pools with fewer connections than this are left whole to the application."""


class CommandLane:
    """Sends commands of one owner, one at a time, on a connection held from the pool."""

    __slots__ = ("_busy", "_connection", "_loop", "_redis", "_release_when_done", "_shared")

    def __init__(self, redis: Redis | RedisCluster) -> None:
        self._redis = redis
        self._connection: AbstractConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the held connection's loop
        self._shared = (
            isinstance(redis, RedisCluster) or redis.connection_pool.max_connections < MIN_POOL_SIZE
        )
        self._busy = False
        self._release_when_done = False

    def __repr__(self) -> str:
        held = "shared pool" if self._shared else f"held={self._connection is not None}"
        return f"CommandLane({held}, busy={self._busy})"

    async def execute(self, *args: Any) -> Any:
        """Send one command and return the server's reply as parsed, without redis-py's
        per-command response callbacks (``SET`` gives ``b"OK"``, not ``True``); raises
        what redis-py raises.

        A Redis error reply raises its ``ResponseError`` subclass (e.g. ``NoScriptError``).
        """
        if self._shared:
            return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call,unused-ignore]
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # a connection held for a loop that has ended is of no use here (and its
            # command, if one was in flight, will never finish): let it go, unclosed
            self._loop = loop
            self._connection = None
            self._busy = self._release_when_done = False
        if self._busy:
            raise RuntimeError("a CommandLane carries one command at a time")
        self._busy = True
        try:
            assert isinstance(self._redis, Redis)  # a cluster's lane is shared
            pool = self._redis.connection_pool
            connection = self._connection
            if connection is None:
                connection = self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            else:
                # what the pool checks at every checkout: a socket the server closed
                # (a restart) is replaced before the command, not failed by it
                await pool.ensure_connection(connection)
            await connection.send_command(*args)
            return await connection.read_response()
        finally:
            self._busy = False
            if self._release_when_done:
                await self.aclose()

    async def aclose(self) -> None:
        """Give the held connection back to the pool; the lane may be used again after.

        A command in flight fails (its connection is dropped): the connection goes back
        to the pool only once that command has let go of it.
        """
        connection = self._connection
        if connection is None:
            return
        if self._loop is not asyncio.get_running_loop():
            self._connection = None  # held for a loop that has ended: nothing to give back
            return
        if self._busy:
            # its reply may never be read by anyone else: drop the socket now, and let
            # the command release the connection when it ends
            self._release_when_done = True
            await connection.disconnect(nowait=True)
            return
        self._connection = None
        self._release_when_done = False
        assert isinstance(self._redis, Redis)  # a cluster's lane holds no connection
        await self._redis.connection_pool.release(connection)
