"""Several OS processes share one user's budget through Redis: never more, never less.

Four worker processes (``rate_limit_worker.py``) start together and hammer one
user's budget with many coroutines each, asking for random token counts, until it
is gone. The window is far longer than the test, so nothing expires meanwhile: the
tokens granted across all processes must add up to exactly the budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aiocache_llm import RateLimitConfig, RedisRateLimiter
from tests.conftest import RedisTarget
from tests.support.workers import run_together, start_worker

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]

WORKER = Path(__file__).with_name("rate_limit_worker.py")

PROCESSES = 4
COROUTINES = 32
BUDGET = 40_000
WINDOW = 300.0
USER = "shared user ✓"


async def run_workers(target: RedisTarget) -> list[dict[str, int]]:
    workers = [
        await start_worker(
            WORKER, target.url, target.prefix, USER, BUDGET, WINDOW, COROUTINES, seed
        )
        for seed in range(PROCESSES)
    ]
    return await run_together(workers, ready_timeout=10, run_timeout=30)


async def test_processes_together_are_granted_exactly_the_budget(
    real_redis: RedisTarget,
) -> None:
    reports = await run_workers(real_redis)

    granted = sum(r["granted_tokens"] for r in reports)
    asked = sum(r["asked_tokens"] for r in reports)
    print(
        f"\n{PROCESSES} processes x {COROUTINES} coroutines: "
        f"{sum(r['requests'] for r in reports)} requests "
        f"({sum(r['grants'] for r in reports)} granted, {sum(r['refused'] for r in reports)} "
        f"refused), {asked} tokens asked, {granted} granted, budget {BUDGET}; "
        f"per process {[r['granted_tokens'] for r in reports]}"
    )
    assert asked > BUDGET  # demand exceeded the budget...
    assert granted == BUDGET  # ...so exactly the budget was granted: no more, no less
    assert all(r["granted_tokens"] > 0 for r in reports)  # every process took part
    assert all(r["stats_granted_tokens"] == r["granted_tokens"] for r in reports)
    assert all(r["backend_errors"] == 0 for r in reports)

    # the server holds exactly the grants the processes reported
    limiter = RedisRateLimiter(
        client=real_redis.client,
        key_prefix=real_redis.prefix,
        config=RateLimitConfig(BUDGET, WINDOW),
    )
    async with limiter:
        log, meta = limiter.keys(USER)
        members = await real_redis.client.zrange(log, 0, -1)
        assert len(members) == sum(r["grants"] for r in reports)
        assert sum(int(member.rsplit(b":", 1)[1]) for member in members) == BUDGET
        assert int(await real_redis.client.hget(meta, "sum")) == BUDGET
        assert await limiter.get_remaining(USER) == 0
        assert not await limiter.check_and_consume(USER, 1)
