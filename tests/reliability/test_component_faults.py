"""One component at a time against a private redis-server that is killed or frozen.

The read batcher with a batch in flight when the server freezes, the fleet
coalescer's notification subscription and lease renewal across a kill or a freeze,
and client pools across a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from aiocache_llm import InferenceGateway, RedisExactCache
from tests.gateway.fakes import CountingProvider
from tests.support.redis_server import RedisServer, redis_server_binary

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    redis_server_binary()
    started = RedisServer().start()
    yield started
    started.stop()  # thaws a frozen server first


def query(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


# the read batcher


@pytest.mark.parametrize(
    ("socket_timeout", "frozen_for"),
    [(5.0, 1.0), (0.3, 1.0)],
    ids=["thawed-before-the-socket-timeout", "frozen-past-the-socket-timeout"],
)
async def test_a_batch_frozen_in_flight_does_not_wedge_later_reads(
    server: RedisServer, socket_timeout: float, frozen_for: float
) -> None:
    client = Redis.from_url(server.url, socket_timeout=socket_timeout)
    cache = RedisExactCache(client=client, key_prefix="batch")
    try:
        await cache.put("q", "stored")
        server.freeze()
        try:
            # one GET goes out at once, the other 49 queue behind it as one MGET
            reads = [asyncio.wait_for(cache.get("q"), 0.2) for _ in range(50)]
            results = await asyncio.gather(*reads, return_exceptions=True)
            assert all(isinstance(r, asyncio.TimeoutError) for r in results)
            await asyncio.sleep(frozen_for)
        finally:
            server.thaw()
        started = time.perf_counter()
        values = await asyncio.wait_for(asyncio.gather(*(cache.get("q") for _ in range(50))), 5)
        assert values == ["stored"] * 50
        assert time.perf_counter() - started < 1.0, "reads resumed at once after the thaw"
        assert "queued=0" in repr(cache._reads)
    finally:
        await cache.aclose()
        await client.aclose()


# the fleet coalescer: two gateways on one server stand for two processes


@pytest.fixture
async def two_processes(server: RedisServer) -> AsyncIterator[tuple[list[InferenceGateway], Any]]:
    provider = CountingProvider(latency=0.3)
    caches = [RedisExactCache(url=server.url, key_prefix="fleet") for _ in range(2)]
    gateways = [
        InferenceGateway(
            provider,
            exact_cache=cache,
            backend_timeout=0.25,
            breaker_reset_after=0.3,
            lease_seconds=3.0,
            fleet_max_wait=10.0,
        )
        for cache in caches
    ]
    yield gateways, provider
    for gateway in gateways:
        await gateway.aclose()
    for cache in caches:
        await cache.aclose()


async def coalesce_across(gateways: list[InferenceGateway], text: str) -> float:
    """Resolve ``text`` in both "processes" at once; return how long the waiter took."""
    first = asyncio.ensure_future(gateways[0].resolve(query(text)))
    await asyncio.sleep(0.05)  # the first one holds the lease
    started = time.perf_counter()
    assert await gateways[1].resolve(query(text)) == f"answer:{text}"
    waited = time.perf_counter() - started
    assert await first == f"answer:{text}"
    return waited


async def wait_until_caching(gateway: InferenceGateway, deadline: float = 5.0) -> None:
    """Resolve one query twice until the second is a cache hit (the breakers closed again)."""
    give_up = time.perf_counter() + deadline
    attempt = 0
    while time.perf_counter() < give_up:
        attempt += 1
        text = f"probe {id(gateway)} {attempt}"
        await gateway.resolve(query(text))
        hits = gateway.stats().exact_hits
        await gateway.resolve(query(text))
        if gateway.stats().exact_hits > hits:
            return
        await asyncio.sleep(0.1)
    pytest.fail("caching did not resume")


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_lease_notifications_flow_again_after_the_server_comes_back(
    server: RedisServer, two_processes: tuple[list[InferenceGateway], Any], fault: str
) -> None:
    gateways, provider = two_processes
    # before: the waiter is woken by the leader's notification, long before the lease ends
    assert await coalesce_across(gateways, "before") < 1.5
    assert provider.calls == 1
    tasks_before = len(asyncio.all_tasks())

    if fault == "kill":
        server.kill()
        for i in range(5):  # the subscription fails while the server is away
            await gateways[1].resolve(query(f"while down {i}"))
        server.start()
    else:
        server.freeze()
        try:
            for i in range(5):
                await gateways[1].resolve(query(f"while frozen {i}"))
        finally:
            server.thaw()
    for gateway in gateways:
        await wait_until_caching(gateway)

    calls = provider.calls
    waited = await coalesce_across(gateways, "after")
    assert provider.calls == calls + 1, "one provider call for both processes"
    assert waited < 1.5, "woken by the notification, not by the 3 s lease running out"
    assert len(asyncio.all_tasks()) <= tasks_before + 1


async def test_a_leader_frozen_past_its_lease_releases_nothing_it_lost(
    server: RedisServer,
) -> None:
    """The renewer cannot renew while the server is frozen; the lease lapses, nothing leaks."""
    provider = CountingProvider(latency=1.5)
    cache = RedisExactCache(url=server.url, key_prefix="renew")
    gateway = InferenceGateway(
        provider, exact_cache=cache, backend_timeout=0.2, breaker_reset_after=0.2, lease_seconds=0.6
    )
    observer = Redis.from_url(server.url)
    try:
        tasks_before = len(asyncio.all_tasks())
        leader = asyncio.ensure_future(gateway.resolve(query("slow")))
        await asyncio.sleep(0.3)
        assert await observer.exists(f"renew:lease:{{{cache.signature(query('slow'))}}}") == 1
        server.freeze()
        try:
            await asyncio.sleep(0.9)  # past the lease: renewals time out
        finally:
            server.thaw()
        assert await asyncio.wait_for(leader, 5) == "answer:slow"
        assert provider.calls == 1
        assert [k async for k in observer.scan_iter(match="renew:lease:*")] == []
        await asyncio.sleep(0.1)
        assert len(asyncio.all_tasks()) <= tasks_before + 1  # the renewer is gone
    finally:
        await gateway.aclose()
        await cache.aclose()
        await observer.aclose()


# client pools across a restart


async def test_idle_pooled_connections_survive_a_server_restart(server: RedisServer) -> None:
    cache = RedisExactCache(url=server.url, key_prefix="pool")
    try:
        client = cache.client
        await asyncio.gather(*(client.blpop("pool:nothing", 0.1) for _ in range(40)))
        server.kill()
        await asyncio.sleep(0.3)  # the loop sees every pooled socket closed
        await asyncio.to_thread(server.start)
        results = await asyncio.gather(*(client.ping() for _ in range(40)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, Exception)]
        assert failures == []
    finally:
        await cache.aclose()
