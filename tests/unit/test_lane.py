"""CommandLane: one held connection, never a reply read by the wrong command."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aiocache_llm import RedisExactCache
from aiocache_llm.backends.redis.lane import MIN_POOL_SIZE, CommandLane
from tests.conftest import REDIS_BACKENDS, RedisTarget, open_redis_target
from tests.support.redis_server import running_redis


@pytest.fixture(params=REDIS_BACKENDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param) as target:
        yield target


def _in_use(client: Redis) -> int:
    return len(client.connection_pool._in_use_connections)


async def _blocked_pop(lane: CommandLane, target: RedisTarget) -> tuple[str, asyncio.Future[Any]]:
    """A BLPOP on an empty list, left waiting on the lane's connection."""
    key = f"{target.prefix}:list"
    blocked = asyncio.ensure_future(lane.execute("BLPOP", key, 5))
    await asyncio.sleep(0.1)
    return key, blocked


async def _assert_no_stale_reply(lane: CommandLane, target: RedisTarget, key: str) -> None:
    # had the abandoned BLPOP's connection been kept, the server would hand it this
    # element, and the ECHO below would read that reply instead of its own
    await target.client.lpush(key, "late")
    assert await lane.execute("ECHO", "mine") == b"mine"
    assert await target.client.lrange(key, 0, -1) == [b"late"]


async def test_commands_share_one_connection_held_until_aclose(target: RedisTarget) -> None:
    lane = CommandLane(target.client)
    for i in range(5):
        assert await lane.execute("SET", f"{target.prefix}:k", i) == b"OK"
        assert await lane.execute("GET", f"{target.prefix}:k") == str(i).encode()
    assert _in_use(target.client) == 1
    held = lane._connection
    await lane.execute("PING")
    assert lane._connection is held
    await lane.aclose()
    assert _in_use(target.client) == 0
    # usable again after aclose: it takes a connection anew
    assert await lane.execute("GET", f"{target.prefix}:k") == b"4"
    await lane.aclose()


async def test_an_error_reply_raises_and_leaves_the_connection_in_step(
    target: RedisTarget,
) -> None:
    lane = CommandLane(target.client)
    await lane.execute("SET", f"{target.prefix}:text", "not a number")
    with pytest.raises(redis_errors.ResponseError):
        await lane.execute("INCR", f"{target.prefix}:text")
    assert await lane.execute("ECHO", "next") == b"next"
    await lane.aclose()


async def test_a_second_concurrent_command_is_refused_not_interleaved(
    target: RedisTarget,
) -> None:
    lane = CommandLane(target.client)
    first = asyncio.ensure_future(lane.execute("ECHO", "first"))
    await asyncio.sleep(0)  # the first is now on the wire (or connecting)
    with pytest.raises(RuntimeError, match="one command at a time"):
        await lane.execute("ECHO", "second")
    assert await first == b"first"
    assert await lane.execute("ECHO", "third") == b"third"
    await lane.aclose()


async def test_a_small_pool_is_left_to_the_application(target: RedisTarget) -> None:
    pool = target.client.connection_pool
    saved = pool.max_connections
    pool.max_connections = MIN_POOL_SIZE - 1
    try:
        lane = CommandLane(target.client)
        assert await lane.execute("ECHO", "x") == b"x"
        assert _in_use(target.client) == 0
        assert lane._connection is None
        assert "shared pool" in repr(lane)
    finally:
        pool.max_connections = saved


@pytest.mark.redis
async def test_a_cancelled_command_never_leaves_its_reply_for_the_next(
    real_redis: RedisTarget,
) -> None:
    lane = CommandLane(real_redis.client)
    key, blocked = await _blocked_pop(lane, real_redis)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await _assert_no_stale_reply(lane, real_redis, key)
    await lane.aclose()


@pytest.mark.redis
async def test_a_server_restart_costs_no_failed_command() -> None:
    with running_redis() as server:
        # a client as the library builds it: redis-py checks idle sockets at checkout
        # only with maintenance notifications off
        owner = RedisExactCache(url=server.url)
        lane = CommandLane(owner.client)
        try:
            assert await lane.execute("SET", "k", "before") == b"OK"
            server.restart()
            await asyncio.sleep(0.05)  # one loop turn sees the old socket's EOF, as in life
            # the held socket was closed by the old server: it is replaced, not failed on
            assert await lane.execute("GET", "k") is None  # the restarted server is empty
            assert await lane.execute("ECHO", "after") == b"after"
        finally:
            await lane.aclose()
            await owner.aclose()


@pytest.mark.redis
async def test_closing_the_client_disconnects_the_held_connection(
    real_redis: RedisTarget,
) -> None:
    client = Redis.from_url(real_redis.url or "")
    lane = CommandLane(client)
    await lane.execute("PING")
    held = lane._connection
    assert held is not None
    assert held.is_connected
    await client.aclose()
    assert not held.is_connected
    assert await lane.execute("ECHO", "again") == b"again"  # it reconnects
    await lane.aclose()
    await client.aclose()


@pytest.mark.redis
async def test_aclose_during_a_command_fails_it_and_then_returns_the_connection(
    real_redis: RedisTarget,
) -> None:
    lane = CommandLane(real_redis.client)
    key, blocked = await _blocked_pop(lane, real_redis)
    await lane.aclose()
    assert _in_use(real_redis.client) == 1  # still the blocked command's until it ends
    with pytest.raises(redis_errors.ConnectionError):
        await blocked
    assert _in_use(real_redis.client) == 0
    await _assert_no_stale_reply(lane, real_redis, key)
    await lane.aclose()
