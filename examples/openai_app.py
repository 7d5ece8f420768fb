"""The OpenAI SDK, cached: ``wrap_openai`` in front of an ``AsyncOpenAI`` client.

Needs an OpenAI-compatible server and the ``openai`` extra
(``pip install -e '.[openai]'``). It reads the SDK's usual environment:

    OPENAI_API_KEY=sk-... python examples/openai_app.py            # api.openai.com
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=x \\
        python examples/openai_app.py                              # any compatible server

``OPENAI_MODEL`` picks the model (default ``gpt-4o-mini``) and ``REDIS_URL``, when
set, keeps the cache in Redis (shared by every process) instead of in memory. It asks
one question twice, streams it twice, then asks it with ``no_cache``, and prints
where each answer came from: the second of each pair costs no API call.
"""

from __future__ import annotations

import asyncio
import os

from openai import AsyncOpenAI

from aiocache_llm import RedisExactCache
from aiocache_llm.integrations.openai import wrap_openai

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
QUESTION = [{"role": "user", "content": "In one sentence: why cache LLM answers?"}]


async def main() -> None:
    redis_url = os.environ.get("REDIS_URL")
    # no value_types needed: wrap_openai registers the SDK's types with the cache;
    # without one, it builds a MemoryExactCache
    cache = RedisExactCache(url=redis_url, key_prefix="example:openai:v1") if redis_url else None
    # the SDK reads OPENAI_API_KEY and OPENAI_BASE_URL itself
    async with (
        AsyncOpenAI() as sdk,
        wrap_openai(sdk, exact_cache=cache, ttl_seconds=3600) as client,
    ):
        calls = 0

        def report(label: str, text: str) -> None:
            nonlocal calls
            made = client.gateway.stats().provider_calls - calls
            calls += made
            source = "API call" if made else "cache"
            print(f"{label:<24} {source:<9} {text!r}")

        for label in ("create", "create again"):
            completion = await client.chat.completions.create(model=MODEL, messages=QUESTION)
            report(label, completion.choices[0].message.content or "")

        for label in ("stream", "stream again"):
            stream = await client.chat.completions.create(
                model=MODEL, messages=QUESTION, stream=True
            )
            pieces = [
                chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices
            ]
            report(label, "".join(pieces))

        fresh = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, cache={"no_cache": True}
        )
        report("create, no_cache", fresh.choices[0].message.content or "")
        stats = client.gateway.stats()
        print(f"requests={stats.requests} provider_calls={stats.provider_calls}")
    if cache is not None:
        await cache.aclose()


if __name__ == "__main__":
    asyncio.run(main())
