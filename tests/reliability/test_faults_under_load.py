"""Faults under load: the private redis-server is killed, frozen or full while a gateway serves.

Each test runs :class:`Load` (50 workers; repeated, paraphrased, distinct and refused
queries; provider 10-50 ms; 2-6 thousand requests in 9 s) through a gateway
whose exact cache, semantic cache and rate limiter all live on one private
``redis-server``, and injects the fault a second into the measured phase. Each then
checks that

- every request got its answer or the provider's own error, none slower than
  :data:`BOUND` (:attr:`Settings.worst_resolve`, derived from the timeouts, plus
  :data:`LAG` for scheduling on a loaded 2-core machine);
- the gateway's (and the limiter's) stats counted the backend errors;
- caching resumed by itself: hits at the end of the load, and repeated queries after
  it are all hits with no new provider call;
- nothing accumulated: asyncio tasks, file descriptors other than pooled sockets,
  client connections (the server holds none the pools lost track of), objects the
  garbage collector tracks and RSS stay within the bounds below.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from aiocache_llm import GatewayStats, RateLimiterStats
from aiocache_llm.backends.redis.connection import DEFAULT_MAX_CONNECTIONS
from benchmarks.probes import Resources
from tests.reliability.load import Load, Settings, Stack, words_of
from tests.support.redis_server import RedisServer, redis_server_binary

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]

SETTINGS = Settings()
LAG = 1.0
"""Seconds of scheduling delay allowed on top of the derived bound (2 busy cores)."""
BOUND = SETTINGS.worst_resolve + LAG  # 4.3 s + 1 s
WARM_SECONDS = 1.5
LOAD_SECONDS = 7.5
FAULT_AT = 1.0
TAIL_SECONDS = 1.5
RSS_GROWTH_MIB = 32
"""These runs grow RSS by 2-8 MiB (vector mirrors, bounded caches, the allocator); a leak
of 10 KiB per request would fail."""
OBJECTS_GROWTH = 2000
"""Objects the garbage collector tracks moved by -400 to +100 in these runs; a leak of one
container per request (several thousand requests) would fail."""


@dataclass
class Run:
    load: Load
    before: Resources
    after: Resources
    gateway: GatewayStats
    limiter: RateLimiterStats


@pytest.fixture
def servers() -> Iterator[list[RedisServer]]:
    """Started servers, stopped (and thawed if frozen) whatever the test did."""
    redis_server_binary()
    started: list[RedisServer] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[RedisServer], *extra_args: str) -> RedisServer:
    server = RedisServer(extra_args=extra_args).start()
    servers.append(server)
    return server


async def settled(stack: Stack) -> Resources:
    # let closed sockets and finished tasks be reaped before counting
    await asyncio.sleep(0.5)
    return await stack.resources()


async def under_load(server: RedisServer, fault: Callable[[Stack], Awaitable[None]]) -> Run:
    """Warm up, run the load with ``fault`` injected ``FAULT_AT`` s in, check recovery."""
    stack = Stack(server.url, SETTINGS)
    load = Load(stack)
    try:
        await load.run(WARM_SECONDS)
        before = await settled(stack)
        started = time.perf_counter()
        running = asyncio.ensure_future(load.run(LOAD_SECONDS))
        await asyncio.sleep(FAULT_AT)
        load.mark("fault")
        await fault(stack)
        load.mark("recovered")
        tail_at = started + LOAD_SECONDS - TAIL_SECONDS
        await asyncio.sleep(max(0.0, tail_at - time.perf_counter()))
        load.mark("tail")
        await running
        load.mark("end")
        await check_caching_resumed(load)
        after = await settled(stack)
        return Run(load, before, after, stack.gateway.stats(), await stack.limiter.stats())
    finally:
        await stack.aclose()


async def check_caching_resumed(load: Load) -> None:
    gateway, provider = load.stack.gateway, load.stack.provider
    requests, hits, _ = load.between("tail", "end")
    assert hits >= 0.25 * requests, f"the end of the load was served by cache hits: {hits}"
    for query in load.hot_queries():  # refills what the fault lost
        await gateway.resolve(query)
    calls, hits_before = provider.calls, gateway.stats().exact_hits
    for query in load.hot_queries():
        answer = await gateway.resolve(query)
        # a query lost with the server may have been refilled by a paraphrase's answer
        text = query["messages"][0]["content"]
        assert words_of(answer.removeprefix("answer:")) == words_of(text)
    assert provider.calls == calls, "repeated queries made no provider call"
    assert gateway.stats().exact_hits - hits_before == len(load.hot)


def check_answers(load: Load) -> None:
    outcomes = load.outcomes
    print(f"\n{outcomes.summary()}; bound {BOUND:.2f} s")
    assert outcomes.unexpected == []
    assert outcomes.requests >= 1500
    assert set(outcomes.kinds) <= {"answered", "provider_error"}
    assert outcomes.kinds["provider_error"] > 0  # the provider's refusals reached the callers
    assert outcomes.worst <= BOUND


def check_resources(run: Run) -> None:
    before, after = run.before, run.after
    print(f"before: {before.row()}\nafter:  {after.row()}")
    assert after.tasks <= before.tasks + 2
    assert after.pool_connections <= 3 * DEFAULT_MAX_CONNECTIONS
    assert after.server_clients is not None
    # the server holds no connection the pools lost track of; the reverse happens after
    # a kill: idle pooled sockets of the dead server, replaced when next checked out
    assert after.server_clients <= after.pool_connections + 2
    if before.fds is not None and after.fds is not None:
        assert after.fds - after.pool_connections <= before.fds - before.pool_connections + 5
    assert after.rss_mib - before.rss_mib <= RSS_GROWTH_MIB
    assert after.objects - before.objects <= OBJECTS_GROWTH


async def test_sigkill_and_restart_on_the_same_port(servers: list[RedisServer]) -> None:
    server = start(servers)

    async def kill_and_restart(stack: Stack) -> None:
        server.kill()
        await asyncio.sleep(1.5)
        await asyncio.to_thread(server.start)

    run = await under_load(server, kill_and_restart)
    check_answers(run.load)
    stats = run.gateway
    print(stats, run.limiter)
    assert stats.backend_errors >= 3
    assert stats.backend_skipped > 0, "the breakers stopped asking the dead server"
    requests, hits, calls = run.load.between("fault", "recovered")
    assert hits <= 0.1 * requests  # no cache while Redis was down...
    assert calls >= 0.5 * requests  # ...the provider answered
    assert run.limiter.backend_errors > 0
    check_resources(run)


async def test_sigstop_longer_than_the_backend_timeout(servers: list[RedisServer]) -> None:
    server = start(servers)
    frozen_for = 2.0  # 8 backend timeouts, 2 leases, past the fleet's max wait
    assert frozen_for > 4 * SETTINGS.backend_timeout

    async def freeze_and_thaw(stack: Stack) -> None:
        server.freeze()
        try:
            await asyncio.sleep(frozen_for)
        finally:
            server.thaw()

    run = await under_load(server, freeze_and_thaw)
    check_answers(run.load)
    stats = run.gateway
    print(stats, run.limiter)
    assert stats.backend_errors >= 3, "timeouts are counted"
    assert stats.backend_skipped > 0
    assert run.limiter.backend_errors > 0
    check_resources(run)


async def test_maxmemory_allkeys_lru_filled_past_its_limit(servers: list[RedisServer]) -> None:
    maxmemory = 16 * 2**20
    server = start(servers, "--maxmemory", str(maxmemory), "--maxmemory-policy", "allkeys-lru")
    filler = Redis.from_url(server.url)
    entries: list[int] = []

    async def fill_past_the_limit(stack: Stack) -> None:
        entries.append(await count_keys(filler, "rel:exact:" + "?" * 64))
        block = b"x" * 50_000
        for i in range(3 * maxmemory // len(block)):  # three times the limit
            await filler.set(f"filler:{i}", block)
        entries.append(await count_keys(filler, "rel:exact:" + "?" * 64))

    try:
        run = await under_load(server, fill_past_the_limit)
        info = await filler.info()
        errors = await filler.info("errorstats")
    finally:
        await filler.aclose()
    check_answers(run.load)
    stats, limiter = run.gateway, run.limiter
    oom_rejections = int(errors.get("errorstat_OOM", {}).get("count", 0))
    print(stats, f"\nevicted {info['evicted_keys']}, OOM rejections {oom_rejections}")
    print(f"exact entries before and after the fill: {entries}")
    assert entries[0] > 100
    assert entries[1] < entries[0] // 2, "the fill evicted our entries too"
    assert info["used_memory"] <= 1.1 * maxmemory
    # a rejected write (a script past maxmemory) is a backend error someone counted
    assert stats.backend_errors + limiter.backend_errors >= oom_rejections
    check_resources(run)


async def count_keys(client: Redis, pattern: str) -> int:
    return sum([1 async for _ in client.scan_iter(match=pattern, count=1000)])
