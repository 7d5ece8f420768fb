"""One OS process of the multi-process rate limiter test (run as a script, not collected).

``python rate_limit_worker.py URL PREFIX USER BUDGET WINDOW COROUTINES SEED`` connects,
prints ``ready``, waits for a line on stdin (the start signal shared by all
workers), then hammers USER's budget with COROUTINES coroutines asking for random
token counts until the budget is gone, and prints one JSON report line.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from aiocache_llm import RateLimitConfig, RedisRateLimiter

MAX_TOKENS = 25


async def hammer(limiter: RedisRateLimiter, user: str, rng: random.Random) -> dict[str, int]:
    """Ask for random amounts until the limiter reports nothing left; count the outcome."""
    counts = {"requests": 0, "grants": 0, "granted_tokens": 0, "asked_tokens": 0, "refused": 0}
    largest = MAX_TOKENS
    while True:
        tokens = rng.randint(1, largest)
        counts["requests"] += 1
        counts["asked_tokens"] += tokens
        if await limiter.check_and_consume(user, tokens):
            counts["grants"] += 1
            counts["granted_tokens"] += tokens
            continue
        counts["refused"] += 1
        # refused: ask for at most what is left, so that the budget is used up exactly
        largest = min(largest, await limiter.get_remaining(user))
        if largest == 0:
            return counts


async def main(url: str, prefix: str, user: str, budget: int, window: float, coroutines: int,
               seed: int) -> None:  # fmt: skip
    config = RateLimitConfig(budget, window)
    # exactness under test: an outage must raise, never be answered by a fail-open policy
    limiter = RedisRateLimiter(
        url=url, key_prefix=prefix, config=config, failure_mode="raise", operation_timeout=None
    )
    async with limiter:
        await limiter.get_remaining(f"{user}-warm-up")  # connect and load the script
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        results = await asyncio.gather(
            *(hammer(limiter, user, random.Random(seed * 1000 + i)) for i in range(coroutines))
        )
        stats = await limiter.stats()
    report = {key: sum(r[key] for r in results) for key in results[0]}
    report["stats_granted_tokens"] = stats.granted_tokens
    report["backend_errors"] = stats.backend_errors
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    url, prefix, user, budget, window, coroutines, seed = sys.argv[1:8]
    asyncio.run(main(url, prefix, user, int(budget), float(window), int(coroutines), int(seed)))
