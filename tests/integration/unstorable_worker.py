"""One OS process of the fleet tests whose answer cannot be read back from the cache.

``python unstorable_worker.py URL PREFIX MODE`` connects, prints ``ready``, waits for a
line on stdin (the start signal shared by all workers), resolves one query and prints
one JSON report line. The provider takes ``LATENCY`` seconds and counts, fleet-wide in
Redis, its calls (``{prefix}:calls``) and how many ran at once when each started
(``{prefix}:running-at-start``). MODE picks what makes the answer unreadable:

* ``too-large``: a small answer, but the cache's ``max_value_bytes`` refuses it;
* ``tiny-ttl``: a small answer stored for 1 ms;
* ``none``: the provider answers ``None`` (never stored);
* ``huge``: an answer too large for the cache and for a notification.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from redis.asyncio import Redis

from aiocache_llm import InferenceGateway, RedisExactCache

QUERY = {"model": "m", "messages": [{"role": "user", "content": "an answer nobody can store"}]}
LATENCY = 0.6
SMALL = {"answer": "Paris", "note": "x" * 200}
HUGE = "y" * 200_000


async def main(url: str, prefix: str, mode: str) -> None:
    client = Redis.from_url(url)
    answer: Any = {"too-large": SMALL, "tiny-ttl": SMALL, "none": None, "huge": HUGE}[mode]

    async def provider(query: Any) -> Any:
        await client.incr(f"{prefix}:calls")
        running = await client.incr(f"{prefix}:running")
        await client.rpush(f"{prefix}:running-at-start", running)
        try:
            await asyncio.sleep(LATENCY)
        finally:
            await client.decr(f"{prefix}:running")
        return answer

    options: dict[str, Any] = (
        {"ttl_seconds": 0.001} if mode == "tiny-ttl" else {"max_value_bytes": 64}
    )
    cache = RedisExactCache(client=client, key_prefix=prefix, **options)
    gateway = InferenceGateway(provider, exact_cache=cache, lease_seconds=5.0)
    await client.ping()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    started = time.perf_counter()
    result = await gateway.resolve(QUERY)
    elapsed = time.perf_counter() - started
    stats = gateway.stats()
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "answer": result,
                "elapsed": elapsed,
                "stats": stats.model_dump(),
            }
        )
    )
    await gateway.aclose()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
