"""The Anthropic SDK, cached: ``wrap_anthropic`` in front of an ``AsyncAnthropic`` client.

Needs the ``anthropic`` extra (``pip install -e '.[anthropic]'``). It reads the SDK's
usual environment:

    ANTHROPIC_API_KEY=sk-ant-... python examples/anthropic_app.py      # api.anthropic.com
    ANTHROPIC_BASE_URL=http://127.0.0.1:8000 ANTHROPIC_API_KEY=x \\
        python examples/anthropic_app.py                              # a compatible server

``ANTHROPIC_MODEL`` picks the model (default ``claude-haiku-4-5``) and ``REDIS_URL``,
when set, keeps the cache in Redis (shared by every process) instead of in memory. It
asks one question twice, streams it twice, then asks it with ``no_cache``, and prints
where each answer came from: the second of each pair costs no API call. Hits get fresh
message ids (``fresh_hit_ids=True``), so no two answers share one.
"""

from __future__ import annotations

import asyncio
import os

from anthropic import AsyncAnthropic

from aiocache_llm import RedisExactCache
from aiocache_llm.integrations.anthropic import wrap_anthropic

MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-haiku-4-5")
QUESTION = [{"role": "user", "content": "In one sentence: why cache LLM answers?"}]


async def main() -> None:
    redis_url = os.environ.get("REDIS_URL")
    # no value_types needed: wrap_anthropic registers the SDK's types with the cache;
    # without one, it builds a MemoryExactCache
    cache = RedisExactCache(url=redis_url, key_prefix="example:anthropic:v1") if redis_url else None
    # the SDK reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL itself
    async with (
        AsyncAnthropic() as sdk,
        wrap_anthropic(sdk, exact_cache=cache, ttl_seconds=3600, fresh_hit_ids=True) as client,
    ):
        calls = 0
        ids: set[str] = set()

        def report(label: str, text: str, message_id: str) -> None:
            nonlocal calls
            made = client.gateway.stats().provider_calls - calls
            calls += made
            ids.add(message_id)
            source = "API call" if made else "cache"
            print(f"{label:<24} {source:<9} {text!r}")

        for label in ("create", "create again"):
            message = await client.messages.create(model=MODEL, max_tokens=256, messages=QUESTION)
            text = "".join(block.text for block in message.content if block.type == "text")
            report(label, text, message.id)

        for label in ("stream", "stream again"):
            stream = await client.messages.create(
                model=MODEL, max_tokens=256, messages=QUESTION, stream=True
            )
            pieces, message_id = [], ""
            async for event in stream:
                if event.type == "message_start":
                    message_id = event.message.id
                elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                    pieces.append(event.delta.text)
            report(label, "".join(pieces), message_id)

        fresh = await client.messages.create(
            model=MODEL, max_tokens=256, messages=QUESTION, cache={"no_cache": True}
        )
        text = "".join(block.text for block in fresh.content if block.type == "text")
        report("create, no_cache", text, fresh.id)
        stats = client.gateway.stats()
        print(f"requests={stats.requests} provider_calls={stats.provider_calls}")
        print(f"distinct message ids={len(ids)}")
    if cache is not None:
        await cache.aclose()


if __name__ == "__main__":
    asyncio.run(main())
