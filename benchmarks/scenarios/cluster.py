"""Scenario 8: exact hits and limiter checks on a real Redis Cluster, 100 callers.

Starts its own cluster of 3 primaries + 3 replicas (``redis-server`` processes on free
loopback ports, via the test fixture ``tests.support.redis_cluster.LocalCluster``: the
benchmarks reuse it rather than keep a second copy; it needs ``pytest`` importable,
which the dev install has) and stops every node by the pid it started. Against it, in
one interleaved run with 100 coroutines over keys spread across all slots:

- ``RedisExactCache`` hits (``LLMResponse`` values) vs raw ``RedisCluster.get`` of the
  very same keys (the baseline of the target), and the same cache on the single Redis
  of the run (own key prefix, removed afterwards);
- ``RedisRateLimiter.check_and_consume`` on the cluster vs on the single Redis, and
  ``limits``' moving window on its async Redis Cluster storage (both its drivers).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from aiocache_llm import LLMResponse, RateLimitConfig, RedisExactCache, RedisRateLimiter, Usage
from benchmarks.harness import Measurement, Section, Target
from benchmarks.scenarios.common import QUERY, Context, value_of_size

CONCURRENCY = 100
KEYS = 2_000  # distinct cached requests: about 1,900 distinct slots over all 3 primaries
COST = 10
BUDGET = 10**9  # every check is granted: each side does the full check and write
PREFIX = "bench:cluster"
HOT = 3  # the reference row: every caller on one of 3 keys, so slots collide in a batch
HOT_ROW = f"aiocache_llm RedisExactCache.get, cluster, {HOT} hot keys (reference)"

Op = Callable[[int], Awaitable[object]]


def query_of(index: int) -> dict[str, Any]:
    return {
        **QUERY,
        "messages": [
            QUERY["messages"][0],
            {"role": "user", "content": f"Question {index}: what is the capital of France?"},
        ],
    }


def response_of(index: int) -> LLMResponse:
    return LLMResponse(
        content=f"{index}: {value_of_size(900)}",
        model="gpt-4o-mini",
        finish_reason="stop",
        usage=Usage(prompt_tokens=31, completion_tokens=180, total_tokens=211),
    )


class Rates:
    """Per repeat of one candidate: throughput and p50/p99 latency of its calls."""

    def __init__(self) -> None:
        self.ops: list[float] = []
        self.p50: list[float] = []
        self.p99: list[float] = []


async def concurrent(op: Op, ops: int, offset: itertools.count[int], into: Rates) -> None:
    """``ops`` calls of ``op`` by :data:`CONCURRENCY` coroutines, each on its own keys."""
    each = max(1, ops // CONCURRENCY)
    start = next(offset)
    latencies: list[float] = []
    clock = time.perf_counter

    async def worker(number: int) -> None:
        index = start + number * 7919  # callers walk the keys from spread-out points
        for step in range(each):
            began = clock()
            await op(index + step)
            latencies.append(clock() - began)

    started = clock()
    await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    elapsed = clock() - started
    latencies.sort()
    into.ops.append(round(len(latencies) / elapsed))
    into.p50.append(statistics.median(latencies) * 1e3)
    into.p99.append(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3)


async def measure(candidates: list[tuple[str, Op]], ops: int, repeats: int) -> dict[str, Rates]:
    """Round-robin over the candidates, ``repeats`` times after one warm-up each."""
    import gc

    rates = {name: Rates() for name, _ in candidates}
    offset = itertools.count(0, 131)
    for _, op in candidates:
        await concurrent(op, ops // 4, offset, Rates())
    for _ in range(repeats):
        for name, op in candidates:
            gc.collect()
            await concurrent(op, ops, offset, rates[name])
    return rates


def tables(section: Section, caption: str, rates: dict[str, Rates], baseline: str) -> None:
    unit = "checks/s" if "limiter" in caption else "hits/s"
    rows = [Measurement(n, r.ops, unit, higher_is_better=True) for n, r in rates.items()]
    section.add_table(f"{caption}: {unit} (higher is better)", rows, baseline)
    for name, pick in (("p50", "p50"), ("p99", "p99")):
        latency = [Measurement(n, getattr(r, pick), "ms") for n, r in rates.items()]
        section.add_table(
            f"{caption}: {name} latency per call (lower is better)", latency, baseline
        )


def skipped(reason: str) -> Section:
    return Section("8. Redis Cluster (3 primaries + 3 replicas)", f"Not run: {reason}.")


async def run(ctx: Context) -> Section:
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return skipped(f"{binary} not found")
    # the test fixture (see the module docstring); imported here, not at module level,
    # so that listing the scenarios never needs pytest
    try:
        from tests.support.redis_cluster import LocalCluster
    except ImportError as exc:  # run outside the repository checkout, or without pytest
        return skipped(f"the cluster fixture is not importable ({exc})")

    started = time.perf_counter()
    cluster = await asyncio.to_thread(lambda: LocalCluster(3, 1).start())
    try:
        return await measure_all(ctx, cluster, time.perf_counter() - started)
    finally:
        await asyncio.to_thread(cluster.stop)  # every node, by the pid it was started with


def cluster_client(cluster: Any) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes]
    )


async def measure_all(ctx: Context, cluster: Any, startup: float) -> Section:
    raw = cluster_client(cluster)
    await raw.initialize()
    single_prefix = f"{PREFIX}:{time.time_ns()}"
    on_cluster = RedisExactCache(
        client=cluster_client(cluster), key_prefix=PREFIX, value_types=[LLMResponse]
    )
    on_single = RedisExactCache(
        client=Redis(host=ctx.redis_host, port=ctx.redis_port),
        key_prefix=single_prefix,
        value_types=[LLMResponse],
    )
    queries = [query_of(i) for i in range(KEYS)]
    values = [response_of(i) for i in range(KEYS)]
    keys = [on_cluster.key(q) for q in queries]
    slots = {raw.keyslot(k) for k in keys}
    primaries = {raw.get_node_from_key(k).name for k in keys}
    for query, value in zip(queries, values, strict=True):
        await on_cluster.put(query, value)
        await on_single.put(query, value)
    for i in (0, KEYS // 2, KEYS - 1):
        assert await on_cluster.get(queries[i]) == values[i], "the cluster cache must hit"
        assert await on_single.get(queries[i]) == values[i], "the single cache must hit"
        assert await raw.get(keys[i]), "raw GET must find the entry"

    async def raw_get(i: int) -> object:
        found = await raw.get(keys[i % KEYS])
        assert found is not None
        return found

    async def ours_cluster_get(i: int) -> object:
        return await on_cluster.get(queries[i % KEYS])

    async def ours_cluster_hot(i: int) -> object:
        return await on_cluster.get(queries[i % HOT])

    async def ours_single_get(i: int) -> object:
        return await on_single.get(queries[i % KEYS])

    repeats = 3 if ctx.quick else 7
    exact = await measure(
        [
            ("raw RedisCluster.get (redis-py)", raw_get),
            ("aiocache_llm RedisExactCache.get, cluster", ours_cluster_get),
            ("aiocache_llm RedisExactCache.get, single Redis", ours_single_get),
            (HOT_ROW, ours_cluster_hot),
        ],
        1_000 if ctx.quick else 6_000,
        repeats,
    )
    cluster_stats = await on_cluster.stats()
    single_stats = await on_single.stats()

    # --- the limiter: users spread over all slots, a fresh user every 50 checks
    config = RateLimitConfig(max_tokens_per_minute=BUDGET, window_seconds=60)
    lim_cluster = RedisRateLimiter(
        client=cluster_client(cluster), config=config, key_prefix=PREFIX + ":rl"
    )
    lim_single = RedisRateLimiter(
        client=Redis(host=ctx.redis_host, port=ctx.redis_port),
        config=config,
        key_prefix=single_prefix + ":rl",
    )
    users = itertools.count()

    def user() -> str:
        return f"user-{next(users) // 50}"

    limiter_candidates: list[tuple[str, Op]] = [
        (
            "aiocache_llm RedisRateLimiter, cluster",
            lambda _: lim_cluster.check_and_consume(user(), COST),
        ),
        (
            "aiocache_llm RedisRateLimiter, single Redis",
            lambda _: lim_single.check_and_consume(user(), COST),
        ),
    ]
    notes: list[str] = []
    try:
        from limits import RateLimitItemPerMinute
        from limits.aio.storage import RedisClusterStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        item = RateLimitItemPerMinute(BUDGET)
        hosts = ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes[:3])
        for implementation in ("coredis", "redispy"):
            storage = RedisClusterStorage(
                f"async+redis+cluster://{hosts}",
                implementation=implementation,  # type: ignore[arg-type]
                key_prefix=f"bench-limits-{implementation}",
            )
            limiter = MovingWindowRateLimiter(storage)
            assert await limiter.hit(item, "warm-up", cost=COST)

            def check(i: int, limiter: MovingWindowRateLimiter = limiter) -> object:
                return limiter.hit(item, user(), cost=COST)

            label = "default driver" if implementation == "coredis" else "redis-py driver"
            limiter_candidates.append((f"limits moving window, cluster ({label})", check))
    except Exception as exc:  # not installed, or no cluster support with this driver
        notes.append(f"`limits` on the cluster skipped: {type(exc).__name__}: {exc}")
        print(f"    limits cluster storage skipped: {exc!r}", flush=True)
    assert await lim_cluster.check_and_consume("warm-up", COST)
    assert await lim_single.check_and_consume("warm-up", COST)
    limiter = await measure(limiter_candidates, 600 if ctx.quick else 3_000, repeats)

    # --- clean up: the single Redis keeps nothing of ours; the cluster goes away whole
    await on_single.clear()
    cleaner = Redis(host=ctx.redis_host, port=ctx.redis_port)
    leftovers = [key async for key in cleaner.scan_iter(match=single_prefix + ":*", count=500)]
    if leftovers:
        await cleaner.unlink(*leftovers)
    await cleaner.aclose()
    for resource in (on_cluster, on_single, lim_cluster, lim_single):
        await resource.aclose()
    await raw.aclose()

    section = Section(
        "8. Redis Cluster (3 primaries + 3 replicas)",
        f"A private cluster of 6 `redis-server` processes on loopback (started in "
        f"{startup:.1f} s, stopped afterwards), the single Redis of the run beside it. "
        f"{CONCURRENCY} coroutines in one process call at once over {KEYS} cached requests "
        f"({len(slots)} slots on {len(primaries)} primaries; values are `LLMResponse`, "
        f"about 1 KB stored), every client with redis-py defaults (hiredis). Ours batches "
        "concurrent gets per node into one MGET per slot in one pipeline; raw redis-py "
        "`RedisCluster.get` sends one GET per call. Limiter: one check charging "
        f"{COST} tokens, a new user every 50 checks, users spread over all slots.",
    )
    tables(section, f"exact hits, {CONCURRENCY} callers", exact, "raw RedisCluster.get (redis-py)")
    tables(
        section,
        f"rate limiter, {CONCURRENCY} callers",
        limiter,
        "aiocache_llm RedisRateLimiter, single Redis",
    )
    raw_rate = statistics.median(exact["raw RedisCluster.get (redis-py)"].ops)
    ours_rate = statistics.median(exact["aiocache_llm RedisExactCache.get, cluster"].ops)
    section.targets.append(
        Target(
            f"RedisExactCache.get on a cluster / raw RedisCluster.get, {CONCURRENCY} callers",
            ours_rate / raw_rate,
            2.0,
            at_most=False,
        )
    )
    single_rate = statistics.median(exact["aiocache_llm RedisExactCache.get, single Redis"].ops)
    lim = {name: statistics.median(r.ops) for name, r in limiter.items()}
    lim_ours = lim["aiocache_llm RedisRateLimiter, cluster"]
    notes.append(
        f"exact hits: the cluster cache runs at {ours_rate / single_rate:.2f}x the single-Redis "
        f"cache; hits counted {cluster_stats.hits} (cluster, both rows) and "
        f"{single_stats.hits} (single), misses {cluster_stats.misses} and {single_stats.misses}."
    )
    notes.append(
        "limiter: the cluster limiter runs at "
        f"{lim_ours / lim['aiocache_llm RedisRateLimiter, single Redis']:.2f}x the single-Redis "
        "one"
        + "".join(
            f", {lim_ours / rate:.2f}x {name}"
            for name, rate in lim.items()
            if name.startswith("limits")
        )
        + "."
    )
    notes.append(
        f"The {HOT}-hot-keys row is a reference, not the target's figure: with keys spread "
        "over all slots a node's batch of about 30 gets holds about 30 slots, so it leaves "
        "as about 30 one-key MGETs in one redis-py `ClusterPipeline` (per-command slot "
        "routing and packing in the driver); when callers share slots, a batch is a few "
        "MGETs."
    )
    notes.append(
        "All rows of a table were measured in turns in this one run (median of "
        f"{repeats} repeats, one warm-up each); p50/p99 are per call, queueing included."
    )
    section.notes += notes
    return section
