"""Scenario 2: an exact hit on the real Redis (1 KB answers), alone and with 100 callers."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

from aiocache import RedisCache
from cashews import Cache
from redis.asyncio import Redis

from aiocache_llm import InferenceGateway, RedisExactCache
from benchmarks.harness import (
    Measurement,
    Section,
    Target,
    by_name,
    interleaved,
    per_op_seconds,
    throughput,
)
from benchmarks.scenarios.common import QUERY, Context, user_key, value_of_size

VALUE = value_of_size(1024)
CONCURRENCY = 100


def redis_benchmark(ctx: Context, pipeline: int) -> float | None:
    """The server's own GET throughput per redis-benchmark (1 KB values, 50 clients)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    requests = 20_000 if ctx.quick else 200_000
    out = subprocess.run(
        [
            binary,
            "-h",
            ctx.redis_host,
            "-p",
            str(ctx.redis_port),
            "-t",
            "set,get",
            "-n",
            str(requests),
            "-d",
            "1024",
            "-c",
            "50",
            "-P",
            str(pipeline),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    match = re.search(r"GET: ([\d.]+) requests per second", out)
    return float(match.group(1)) if match else None


async def run(ctx: Context) -> Section:
    raw = Redis(host=ctx.redis_host, port=ctx.redis_port)
    ours = RedisExactCache(
        client=Redis(host=ctx.redis_host, port=ctx.redis_port), key_prefix="bench:exact"
    )
    await ours.put(QUERY, VALUE)
    raw_key = ours.key(QUERY)

    async def provider(query: object) -> str:
        raise AssertionError("a hit never calls the provider")

    gateway_cache = RedisExactCache(
        client=Redis(host=ctx.redis_host, port=ctx.redis_port), key_prefix="bench:exact"
    )
    gateway = InferenceGateway(provider, exact_cache=gateway_cache)
    aiocache = RedisCache(endpoint=ctx.redis_host, port=ctx.redis_port, namespace="bench:aiocache")
    await aiocache.set(user_key(QUERY), VALUE)
    cashews = Cache()
    cashews.setup(f"redis://{ctx.redis_host}:{ctx.redis_port}/0")
    await cashews.set(user_key(QUERY), VALUE)

    assert (await raw.get(raw_key) or b"").endswith(VALUE.encode()), "raw GET must hit"
    for hit in (
        await ours.get(QUERY),
        await gateway.resolve(QUERY),
        await aiocache.get(user_key(QUERY)),
        await cashews.get(user_key(QUERY)),
    ):
        assert hit == VALUE, "every candidate must really hit"

    async def raw_pipeline() -> float:
        ops = ctx.ops(20_000)
        batches = ops // CONCURRENCY
        started = asyncio.get_running_loop().time()
        for _ in range(batches):
            async with raw.pipeline(transaction=False) as pipe:
                for _ in range(CONCURRENCY):
                    pipe.get(raw_key)
                await pipe.execute()
        return batches * CONCURRENCY / (asyncio.get_running_loop().time() - started)

    seq_ops = ctx.ops(5_000)
    sequential = await interleaved(
        [
            ("raw redis.asyncio GET", lambda: per_op_seconds(lambda: raw.get(raw_key), seq_ops)),
            (
                "aiocache_llm RedisExactCache.get",
                lambda: per_op_seconds(lambda: ours.get(QUERY), seq_ops),
            ),
            (
                "aiocache_llm gateway.resolve (hit)",
                lambda: per_op_seconds(lambda: gateway.resolve(QUERY), seq_ops),
            ),
            (
                "cashews redis:// get",
                lambda: per_op_seconds(lambda: cashews.get(user_key(QUERY)), seq_ops),
            ),
            (
                "aiocache RedisCache.get",
                lambda: per_op_seconds(lambda: aiocache.get(user_key(QUERY)), seq_ops),
            ),
        ],
        ctx.repeats,
        unit="µs",
        scale=1e6,
    )
    conc_ops = ctx.ops(30_000)
    concurrent = await interleaved(
        [
            (
                "raw redis.asyncio GET",
                lambda: throughput(lambda: raw.get(raw_key), conc_ops, CONCURRENCY),
            ),
            (
                "aiocache_llm RedisExactCache.get",
                lambda: throughput(lambda: ours.get(QUERY), conc_ops, CONCURRENCY),
            ),
            (
                "aiocache_llm gateway.resolve (hit)",
                lambda: throughput(lambda: gateway.resolve(QUERY), conc_ops, CONCURRENCY),
            ),
            (
                "cashews redis:// get",
                lambda: throughput(lambda: cashews.get(user_key(QUERY)), conc_ops, CONCURRENCY),
            ),
            (
                "aiocache RedisCache.get",
                lambda: throughput(lambda: aiocache.get(user_key(QUERY)), conc_ops, CONCURRENCY),
            ),
            ("raw pipeline of 100 GETs (reference)", raw_pipeline),
        ],
        ctx.repeats,
        unit="ops/s",
        higher_is_better=True,
    )
    for row in concurrent:
        row.samples = [round(s) for s in row.samples]

    server = redis_benchmark(ctx, 1)
    server_pipelined = redis_benchmark(ctx, 100)
    if server is not None and server_pipelined is not None:
        concurrent.append(
            Measurement("redis-benchmark GET, 50 clients (server limit)", [server], "ops/s")
        )
        concurrent.append(
            Measurement(
                "redis-benchmark GET, pipeline 100 (server limit)", [server_pipelined], "ops/s"
            )
        )

    await gateway.aclose()
    await gateway_cache.aclose()
    await ours.clear()
    await ours.aclose()
    await aiocache.delete(user_key(QUERY))
    await aiocache.close()
    await cashews.delete(user_key(QUERY))
    await cashews.close()
    await raw.aclose()

    section = Section(
        "2. Exact hit, Redis (1 KB answers)",
        "The real Redis on loopback, every client with redis-py defaults (hiredis). "
        "Sequential: one caller, µs per hit. Concurrent: 100 coroutines in one process, "
        "hits per second; ours batches concurrent reads into one MGET per round trip.",
    )
    section.add_table(
        "sequential, µs per hit (lower is better)", sequential, "raw redis.asyncio GET"
    )
    section.add_table(
        f"{CONCURRENCY} concurrent coroutines, hits/s (higher is better)",
        concurrent,
        "raw redis.asyncio GET",
    )
    raw_seq = by_name(sequential, "raw redis.asyncio GET").median
    raw_conc = by_name(concurrent, "raw redis.asyncio GET").median
    section.targets += [
        Target(
            "RedisExactCache.get / raw GET, sequential",
            by_name(sequential, "aiocache_llm RedisExactCache.get").median / raw_seq,
            1.1,
        ),
        Target(
            "gateway.resolve over Redis / raw GET, sequential",
            by_name(sequential, "aiocache_llm gateway.resolve (hit)").median / raw_seq,
            1.25,
        ),
        Target(
            "RedisExactCache.get throughput / raw GET, 100 concurrent",
            by_name(concurrent, "aiocache_llm RedisExactCache.get").median / raw_conc,
            3.0,
            at_most=False,
        ),
    ]
    return section
