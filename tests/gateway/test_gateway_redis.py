"""InferenceGateway over Redis: coalescing through the lease, dead and restarted servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from aiocache_llm import InferenceGateway, RedisExactCache
from tests.conftest import REDIS_BACKENDS, RedisTarget, open_redis_target
from tests.gateway.fakes import CountingProvider
from tests.support.redis_server import RedisServer, free_port, redis_server_binary

QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}


@pytest.fixture(params=REDIS_BACKENDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param) as target:
        yield target


async def test_resolve_fills_and_reads_the_shared_cache(target: RedisTarget) -> None:
    provider = CountingProvider()
    cache = RedisExactCache(client=target.client, key_prefix=target.prefix)
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
    other_process = RedisExactCache(client=target.client, key_prefix=target.prefix)
    async with InferenceGateway(CountingProvider(), exact_cache=other_process) as gateway:
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
        assert gateway.stats().exact_hits == 1
    assert provider.calls == 1


async def test_concurrent_gateways_on_one_redis_make_one_provider_call(
    target: RedisTarget,
) -> None:
    """Two gateways stand for two processes: the lease makes them share one call."""
    provider = CountingProvider(latency=0.2)
    gateways = [
        InferenceGateway(
            provider, exact_cache=RedisExactCache(client=target.client, key_prefix=target.prefix)
        )
        for _ in range(2)
    ]
    answers = await asyncio.gather(*(g.resolve(QUERY) for g in gateways for _ in range(25)))
    assert set(answers) == {"answer:capital of France?"}
    assert provider.calls == 1
    stats = [g.stats() for g in gateways]
    assert sum(s.fleet_hits for s in stats) == 1
    assert sum(s.coalesced for s in stats) == 48
    for gateway in gateways:
        await gateway.aclose()
    keys = [k async for k in target.client.scan_iter(match=f"{target.prefix}:lease*")]
    assert keys == [], "the lease and its waiter marker are released"


async def test_no_store_requests_bypass_the_fleet_lease(target: RedisTarget) -> None:
    provider = CountingProvider()
    cache = RedisExactCache(client=target.client, key_prefix=target.prefix)
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        await gateway.resolve(QUERY, no_store=True)
        assert await cache.get(QUERY) is None
        assert gateway._fleet is not None
        assert gateway._fleet.led == 0


async def test_dead_redis_port_still_answers_within_a_bounded_time() -> None:
    port = free_port()  # nothing listens here
    provider = CountingProvider()
    cache = RedisExactCache(url=f"redis://127.0.0.1:{port}/0")
    async with InferenceGateway(provider, exact_cache=cache, backend_timeout=0.25) as gateway:
        durations = []
        for i in range(20):
            started = time.perf_counter()
            answer = await gateway.resolve({**QUERY, "seed": i})
            durations.append(time.perf_counter() - started)
            assert answer == "answer:capital of France?"
        stats = gateway.stats()
    assert provider.calls == 20
    # connection refused is immediate; each resolve is bounded by the backend timeout
    assert max(durations) < 0.5 * 3
    assert stats.backend_errors >= 3
    assert stats.backend_skipped > 0, "the breaker stops retrying a dead Redis on every request"


@pytest.mark.redis
async def test_caching_resumes_when_a_restarted_redis_comes_back() -> None:
    redis_server_binary()
    server = RedisServer().start()
    provider = CountingProvider()
    cache = RedisExactCache(url=server.url)
    gateway = InferenceGateway(
        provider, exact_cache=cache, backend_timeout=0.25, breaker_reset_after=0.2
    )
    try:
        await gateway.resolve(QUERY)
        await gateway.resolve(QUERY)
        assert provider.calls == 1

        server.kill()
        for i in range(10):
            assert await gateway.resolve({**QUERY, "seed": i}) == "answer:capital of France?"
        down_errors = gateway.stats().backend_errors
        assert down_errors >= 1

        server.start()  # same port, empty: it kept nothing on disk
        await asyncio.sleep(0.25)  # past reset_after: the next call probes
        recovered_at = provider.calls
        for _ in range(3):
            assert await gateway.resolve(QUERY) == "answer:capital of France?"
        # the first resolve recomputes (the server came back empty) and stores it
        # again; the others are hits
        assert provider.calls == recovered_at + 1
        assert gateway.stats().exact_hits >= 3
    finally:
        await gateway.aclose()
        await cache.aclose()
        server.stop()
