"""One process of a fleet: N concurrent identical resolves through a Redis-backed gateway.

Run as ``python -m tests.integration.fleet_worker URL PREFIX CONCURRENCY``. The provider
counts its calls in Redis (``{prefix}:provider-calls``) so the test sees the fleet's
total; the first call fleet-wide records its pid and, with ``HANG_FIRST=1``, hangs so
the test can SIGKILL the lease holder. Prints one JSON line with the answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from redis.asyncio import Redis

from aiocache_llm import InferenceGateway, RedisExactCache

QUERY = {"model": "m", "messages": [{"role": "user", "content": "one answer for the fleet"}]}


async def main(url: str, prefix: str, concurrency: int) -> None:
    client = Redis.from_url(url)
    hang_first = os.environ.get("HANG_FIRST") == "1"
    latency = float(os.environ.get("PROVIDER_LATENCY", "0.3"))

    async def provider(query: Any) -> str:
        number = await client.incr(f"{prefix}:provider-calls")
        if number == 1:
            await client.set(f"{prefix}:first-caller", os.getpid())
            if hang_first:
                await asyncio.sleep(3600)  # killed by the test while holding the lease
        await asyncio.sleep(latency)
        return f"answer from pid {os.getpid()}"

    cache = RedisExactCache(client=client, key_prefix=prefix)
    gateway = InferenceGateway(provider, exact_cache=cache, lease_seconds=1.0)
    # every process starts resolving at the same moment
    await client.blpop([f"{prefix}:start"], timeout=30)
    answers = await asyncio.gather(*(gateway.resolve(QUERY) for _ in range(concurrency)))
    stats = gateway.stats()
    print(json.dumps({"pid": os.getpid(), "answers": answers, "stats": stats.model_dump()}))
    await gateway.aclose()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
