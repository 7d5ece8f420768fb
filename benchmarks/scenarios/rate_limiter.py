"""Scenario 3: a token-budget check on Redis against ``limits``' moving window, same cost."""

from __future__ import annotations

import itertools

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from aiocache_llm import RateLimitConfig, RedisRateLimiter
from benchmarks.harness import Section, Target, by_name, interleaved, per_op_seconds, throughput
from benchmarks.scenarios.common import Context

COST = 10
CONCURRENCY = 50
# large enough that every check is granted: both sides do the full check and write
BUDGET = 10**9


async def run(ctx: Context) -> Section:
    ours = RedisRateLimiter(
        client=Redis(host=ctx.redis_host, port=ctx.redis_port),
        config=RateLimitConfig(max_tokens_per_minute=BUDGET, window_seconds=60),
        key_prefix="bench:ratelimit",
    )
    item = RateLimitItemPerMinute(BUDGET)
    peers = {}
    for implementation in ("coredis", "redispy"):
        storage = RedisStorage(
            f"async+redis://{ctx.redis_host}:{ctx.redis_port}",
            implementation=implementation,  # type: ignore[arg-type]
            key_prefix=f"bench-limits-{implementation}",
        )
        peers[implementation] = MovingWindowRateLimiter(storage)
    users = itertools.count()

    # every repeat charges a new user, so windows never fill across repeats
    def ours_check() -> object:
        return ours.check_and_consume(f"user-{next(users) // 5000}", COST)

    def limits_check(implementation: str) -> object:
        limiter = peers[implementation]
        return limiter.hit(item, f"user-{next(users) // 5000}", cost=COST)

    assert await ours.check_and_consume("warm-up", COST)
    for implementation in peers:
        assert await peers[implementation].hit(item, "warm-up", cost=COST)

    ops = ctx.ops(3_000)
    sequential = await interleaved(
        [
            ("aiocache_llm RedisRateLimiter", lambda: per_op_seconds(ours_check, ops)),
            (
                "limits moving window (coredis)",
                lambda: per_op_seconds(lambda: limits_check("coredis"), ops),
            ),
            (
                "limits moving window (redis-py)",
                lambda: per_op_seconds(lambda: limits_check("redispy"), ops),
            ),
        ],
        ctx.repeats,
        unit="µs",
        scale=1e6,
    )
    concurrent = await interleaved(
        [
            ("aiocache_llm RedisRateLimiter", lambda: throughput(ours_check, ops * 2, CONCURRENCY)),
            (
                "limits moving window (coredis)",
                lambda: throughput(lambda: limits_check("coredis"), ops * 2, CONCURRENCY),
            ),
            (
                "limits moving window (redis-py)",
                lambda: throughput(lambda: limits_check("redispy"), ops * 2, CONCURRENCY),
            ),
        ],
        ctx.repeats,
        unit="checks/s",
        higher_is_better=True,
    )
    for row in concurrent:
        row.samples = [round(s) for s in row.samples]
    for row in sequential:
        row.samples = [1e6 / s for s in row.samples]
        row.unit = "checks/s"
        row.higher_is_better = True
    await ours.aclose()

    section = Section(
        "3. Rate limiter on Redis",
        f"One check charging {COST} tokens against a per-user budget, exact sliding window "
        "(ours: one Lua call, server time) vs `limits`' moving window with the same cost. "
        "Checks per second (higher is better).",
    )
    section.add_table("sequential, one caller", sequential, "limits moving window (coredis)")
    section.add_table(
        f"{CONCURRENCY} concurrent coroutines", concurrent, "limits moving window (coredis)"
    )
    for label, rows in (("sequential", sequential), (f"{CONCURRENCY} concurrent", concurrent)):
        ours_rate = by_name(rows, "aiocache_llm RedisRateLimiter").median
        default = by_name(rows, "limits moving window (coredis)").median
        redispy = by_name(rows, "limits moving window (redis-py)").median
        section.targets.append(
            Target(
                f"RedisRateLimiter / limits (default driver), {label}",
                ours_rate / default,
                1.5,
                at_most=False,
            )
        )
        section.notes.append(
            f"{label}: against limits on the redis-py driver the ratio is "
            f"{ours_rate / redispy:.2f}x."
        )
    section.notes.append(
        "limits' default async Redis driver is coredis (`async+redis://`); the redis-py "
        "driver is shown too. One sequential check is one EVALSHA round trip for both "
        "libraries, so a single caller cannot go much below a raw GET's latency."
    )
    return section
