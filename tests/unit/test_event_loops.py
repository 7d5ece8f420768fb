"""Objects made once (module level) and used from one event loop after another.

Workers that run each job in its own ``asyncio.run``, and test suites with a loop per
test, do exactly this. Each test below failed (hung, or raised a bare RuntimeError)
before the objects rebound their timers, flights and streams to the calling loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from aiocache_llm import (
    HashingEmbedder,
    InferenceGateway,
    MemoryRateLimiter,
    RateLimitConfig,
    RedisChatMemory,
    RedisExactCache,
    RedisRateLimiter,
    RedisSemanticCache,
    SingleFlight,
    cached_completion,
)
from aiocache_llm.core.guard import BackendGuard
from tests.conftest import REDIS_URL, require_real_redis

pytestmark = pytest.mark.timeout(30)


def run(coroutine: Any, seconds: float = 5.0) -> Any:
    """``asyncio.run`` with a bound, so that a regression fails instead of hanging."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, seconds)

    return asyncio.run(bounded())


def test_a_guard_deadline_fires_in_a_second_event_loop() -> None:
    guard = BackendGuard("test backend", timeout=0.05)

    async def quick() -> str:
        return "ok"

    async def frozen() -> str:
        await asyncio.sleep(3)
        return "late"

    assert run(guard.call(quick, "fallback")) == "ok"
    started = time.monotonic()
    assert run(guard.call(frozen, "fallback")) == "fallback"
    assert time.monotonic() - started < 1.0  # cut at its deadline, not after 3 s


def test_a_flight_left_pending_by_a_closed_loop_is_not_joined() -> None:
    flight: SingleFlight[str] = SingleFlight()
    gate_loop = asyncio.new_event_loop()

    async def start_and_leave() -> None:
        async def never() -> str:
            await asyncio.Event().wait()
            return "never"

        waiter = asyncio.ensure_future(flight.run("key", never))
        await asyncio.sleep(0)
        waiter.cancel()  # the call stays in flight when this loop stops

    gate_loop.run_until_complete(start_and_leave())
    gate_loop.close()

    async def answer() -> str:
        return "fresh"

    assert run(flight.run("key", answer)) == "fresh"


def test_a_decorated_function_works_in_loop_after_loop() -> None:
    calls = 0

    @cached_completion()
    async def double(x: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 2 * x

    async def burst(x: int) -> list[int]:
        return list(await asyncio.gather(*(double(x) for _ in range(10))))

    assert run(burst(1)) == [2] * 10
    assert run(burst(2)) == [4] * 10
    assert run(burst(1)) == [2] * 10
    assert calls == 2


def test_a_stream_left_in_flight_by_a_closed_loop_is_not_joined() -> None:
    class Provider:
        streams = 0

        async def complete(self, query: Any) -> str:
            return "plain"

        async def stream(self, query: Any) -> AsyncIterator[str]:
            Provider.streams += 1
            yield "a"
            await asyncio.sleep(3600)
            yield "b"

    gateway = InferenceGateway(Provider(), finish_abandoned_streams=True)
    first_loop = asyncio.new_event_loop()

    async def read_one() -> Any:
        stream = gateway.stream("hello")
        return await stream.__anext__(), stream  # keep the consumer: the flight stays

    first, _kept = first_loop.run_until_complete(read_one())
    first_loop.close()
    assert first == "a"

    async def read_two() -> list[str]:
        stream = gateway.stream("hello")
        return [await stream.__anext__()]

    assert run(read_two()) == ["a"]
    assert Provider.streams == 2
    run(gateway.aclose())


# -- Redis backends: connections belong to a loop --------------------------------------


@pytest.fixture
def redis_url() -> str:
    require_real_redis()
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    yield prefix

    async def clean() -> None:
        client = Redis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.unlink(*keys)
        await client.aclose()

    asyncio.run(clean())


@pytest.mark.redis
def test_redis_backends_made_once_work_in_loop_after_loop(redis_url: str, prefix: str) -> None:
    cache = RedisExactCache(url=redis_url, key_prefix=f"{prefix}:exact")
    limiter = RedisRateLimiter(
        url=redis_url, key_prefix=f"{prefix}:limit", config=RateLimitConfig(3)
    )
    memory = RedisChatMemory(url=redis_url, key_prefix=f"{prefix}:chat")
    semantic = RedisSemanticCache(
        HashingEmbedder(), url=redis_url, key_prefix=f"{prefix}:sem", similarity_threshold=0.5
    )

    async def job(index: int) -> tuple[Any, ...]:
        await cache.put(f"q{index}", f"a{index}")
        await memory.append("conv", "user", f"m{index}")
        await semantic.put(f"question {index}", f"s{index}")
        return (
            await cache.get(f"q{index}"),
            await cache.get("q0"),
            await limiter.check_and_consume("alice", 1),
            len(await memory.get_history("conv")),
            await semantic.get(f"question {index}"),
        )

    async def close_all() -> None:
        await asyncio.gather(cache.aclose(), limiter.aclose(), memory.aclose(), semantic.aclose())

    results = [run(job(index)) for index in range(4)]
    run(close_all())  # in yet another loop: closing never touches the old loops
    assert [r[0] for r in results] == ["a0", "a1", "a2", "a3"]
    assert all(r[1] == "a0" for r in results)
    # the limiter stayed metered across loops: never failed open
    assert [r[2] for r in results] == [True, True, True, False]
    assert [r[3] for r in results] == [1, 2, 3, 4]
    assert [r[4] for r in results] == ["s0", "s1", "s2", "s3"]


@pytest.mark.redis
def test_a_gateway_and_a_decorator_over_redis_keep_caching_in_loop_after_loop(
    redis_url: str, prefix: str
) -> None:
    calls = 0

    async def provider(query: Any) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        return "answer"

    gateway = InferenceGateway(
        provider, exact_cache=RedisExactCache(url=redis_url, key_prefix=f"{prefix}:gw")
    )

    @cached_completion(RedisExactCache(url=redis_url, key_prefix=f"{prefix}:fn"))
    async def square(x: int) -> int:
        await asyncio.sleep(0.02)
        return x * x

    async def job() -> tuple[list[Any], list[int], int]:
        answers = await asyncio.gather(*(gateway.resolve("hello") for _ in range(10)))
        squares = await asyncio.gather(*(square(3) for _ in range(10)))
        return list(answers), list(squares), gateway.stats().backend_errors

    outcomes = [run(job()) for _ in range(3)]
    run(gateway.aclose())
    assert all(answers == ["answer"] * 10 for answers, _, _ in outcomes)
    assert all(squares == [9] * 10 for _, squares, _ in outcomes)
    assert [errors for _, _, errors in outcomes] == [0, 0, 0]
    assert calls == 1
    assert square.gateway.stats().provider_calls == 1


@pytest.mark.redis
def test_a_user_client_is_rebound_too(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url)
    cache = RedisExactCache(client=client, key_prefix=prefix)

    async def job(index: int) -> Any:
        await cache.put("q", index)
        found = await cache.get("q")
        if index == 2:
            await client.aclose()  # the application closes its client in a loop it uses
        return found

    assert [run(job(index)) for index in range(3)] == [0, 1, 2]


def test_an_acquire_left_waiting_by_a_closed_loop_does_not_block_the_next() -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(10, window_seconds=60))
    first_loop = asyncio.new_event_loop()

    async def leave_a_waiter() -> None:
        await limiter.check_and_consume("bob", 10)
        waiting = asyncio.ensure_future(limiter.acquire("bob", 5))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the loop stops with this call still queued

    first_loop.run_until_complete(leave_a_waiter())
    first_loop.close()

    async def bob_again() -> int:
        assert not await limiter.check_and_consume("bob", 1)  # still spent: metered
        await limiter.reset("bob")
        await limiter.acquire("bob", 5, timeout=1)  # not queued behind the dead call
        return await limiter.get_remaining("bob")

    assert run(bob_again()) == 5
