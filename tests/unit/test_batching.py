"""Automatic batching of concurrent Redis commands: GET -> MGET, scripts -> one pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from aiocache_llm import BackendError, BackendUnavailableError
from aiocache_llm.backends.redis.batching import GetBatcher, ScriptBatcher
from tests.conftest import REDIS_BACKENDS, RedisTarget, open_redis_target
from tests.support.redis_server import free_port

ECHO = """
-- KEYS[1] a key to increment; ARGV[1] a value to echo
-- returns {the key's new count, ARGV[1]}
return {redis.call('INCR', KEYS[1]), ARGV[1]}
"""

FAILS_ON_BAD = """
-- ARGV[1] 'bad' to fail; returns ARGV[1]
if ARGV[1] == 'bad' then
    return redis.error_reply('refused')
end
return ARGV[1]
"""


@pytest.fixture(params=REDIS_BACKENDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param) as target:
        yield target


async def test_concurrent_gets_share_one_mget_and_keep_their_order(target: RedisTarget) -> None:
    keys = [f"{target.prefix}:{i}" for i in range(50)]
    for i, key in enumerate(keys[:40]):
        await target.client.set(key, f"v{i}")
    batcher = GetBatcher(target.client)
    values = await asyncio.gather(*(batcher.get(key) for key in keys))
    assert values == [f"v{i}".encode() for i in range(40)] + [None] * 10
    # the first GET went alone; the 49 that queued behind it left as one MGET
    assert batcher._batches == 1
    assert "sent=50" in repr(batcher)


async def test_a_lone_get_is_sent_at_once(target: RedisTarget) -> None:
    batcher = GetBatcher(target.client)
    await target.client.set(f"{target.prefix}:k", b"v")
    for _ in range(3):
        assert await batcher.get(f"{target.prefix}:k") == b"v"
    assert batcher._batches == 0


async def test_concurrent_script_runs_are_pipelined_and_each_stays_atomic(
    target: RedisTarget,
) -> None:
    batcher = ScriptBatcher(target.client, ECHO, operation="echo")
    key = f"{target.prefix}:counter"
    results = await asyncio.gather(*(batcher.run([key], [str(i)]) for i in range(100)))
    assert sorted(count for count, _ in results) == list(range(1, 101))
    assert [echo for _, echo in results] == [str(i).encode() for i in range(100)]
    assert batcher._batches >= 1


async def test_scripts_lost_by_the_server_are_reloaded(target: RedisTarget) -> None:
    batcher = ScriptBatcher(target.client, ECHO, operation="echo")
    key = f"{target.prefix}:counter"
    assert (await batcher.run([key], ["a"]))[0] == 1
    await target.client.script_flush()
    # both paths must recover: the lone run and the pipelined batch behind it
    results = await asyncio.gather(*(batcher.run([key], ["b"]) for _ in range(20)))
    assert sorted(count for count, _ in results) == list(range(2, 22))


async def test_one_failing_run_fails_only_its_caller(target: RedisTarget) -> None:
    batcher = ScriptBatcher(target.client, FAILS_ON_BAD, operation="check")
    outcomes = await asyncio.gather(
        *(batcher.run([], ["bad" if i == 7 else f"ok{i}"]) for i in range(20)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[7], BackendError)
    assert "refused" in str(outcomes[7])
    assert [o for i, o in enumerate(outcomes) if i != 7] == [
        f"ok{i}".encode() for i in range(20) if i != 7
    ]


async def test_a_cancelled_caller_does_not_disturb_the_batch(target: RedisTarget) -> None:
    batcher = GetBatcher(target.client)
    await target.client.set(f"{target.prefix}:k", b"v")
    first = asyncio.ensure_future(batcher.get(f"{target.prefix}:k"))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(batcher.get(f"{target.prefix}:k")) for _ in range(5)]
    await asyncio.sleep(0)
    queued[2].cancel()
    results = await asyncio.gather(first, *queued, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 3] == [b"v"] * 5
    assert await batcher.get(f"{target.prefix}:k") == b"v"  # nothing left wedged


async def test_a_dead_server_fails_every_queued_caller_with_a_backend_error() -> None:
    client = Redis(port=free_port(), socket_connect_timeout=1, retry=None)
    batcher = GetBatcher(client)
    outcomes = await asyncio.gather(*(batcher.get("k") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(o, BackendUnavailableError) for o in outcomes), outcomes
    await client.aclose()
