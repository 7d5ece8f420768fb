"""One OS process of the multi-process streaming tests (run as a script, not collected).

``python stream_worker.py URL PREFIX CONCURRENCY MODE`` connects, prints ``ready``,
waits for a line on stdin (the start signal shared by all workers), then streams one
query from CONCURRENCY coroutines at once (and, with MODE ``die-mid``, a second wave
of CONCURRENCY coroutines 3 s later) and prints one JSON report line.

The provider counts its streams fleet-wide in Redis (``{prefix}:provider-streams``).
The fleet's first stream records its pid (``{prefix}:first-streamer``); with MODE
``hang-first`` it hangs before its first chunk, with ``die-mid`` after 5 chunks
(setting ``{prefix}:stalled``), so that the test can SIGKILL it there.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from aiocache_llm import InferenceGateway, RedisExactCache

QUERY = {"model": "m", "messages": [{"role": "user", "content": "stream it to the fleet"}]}
CHUNKS = 20
SECOND_WAVE_AFTER = 3.0


async def main(url: str, prefix: str, concurrency: int, mode: str) -> None:
    client = Redis.from_url(url)

    async def stream(query: Any) -> AsyncIterator[str]:
        number = await client.incr(f"{prefix}:provider-streams")
        if number == 1:
            await client.set(f"{prefix}:first-streamer", os.getpid())
        for index in range(CHUNKS):
            if number == 1 and mode == "hang-first" and index == 0:
                await asyncio.sleep(3600)  # killed here by the test
            if number == 1 and mode == "die-mid" and index == 5:
                await client.set(f"{prefix}:stalled", "1")
                await asyncio.sleep(3600)  # killed here by the test
            await asyncio.sleep(0.03)
            yield f"c{index} "

    class Provider:
        async def complete(self, query: Any) -> str:
            raise AssertionError("only streams are asked for")

        def stream(self, query: Any) -> AsyncIterator[str]:
            return stream(query)

    cache = RedisExactCache(client=client, key_prefix=prefix)
    gateway = InferenceGateway(Provider(), exact_cache=cache, lease_seconds=1.0)
    await client.ping()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def consume(wave: int) -> dict[str, Any]:
        if wave == 2:
            await asyncio.sleep(SECOND_WAVE_AFTER)
        chunks: list[str] = []
        error = None
        try:
            async for chunk in gateway.stream(QUERY):
                chunks.append(chunk)
        except Exception as exc:
            error = type(exc).__name__
            cause = repr(exc.__cause__)
        else:
            cause = None
        return {"wave": wave, "chunks": chunks, "error": error, "cause": cause}

    waves = [1, 2] if mode == "die-mid" else [1]
    consumers = [consume(wave) for wave in waves for _ in range(concurrency)]
    results = await asyncio.wait_for(asyncio.gather(*consumers), 30)
    stats = gateway.stats()
    print(json.dumps({"pid": os.getpid(), "consumers": results, "stats": stats.model_dump()}))
    await gateway.aclose()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
