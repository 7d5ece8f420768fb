"""A second OS process reads what the first stored in Redis through the integrations:
``wrap_openai`` answers (plain and streamed), ``wrap_anthropic`` answers, and the
vectors of a ``CachedEmbedder`` over ``OpenAIEmbedder``: no request reaches the local
servers from the second process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from aiocache_llm import CachedEmbedder, RedisExactCache
from aiocache_llm.integrations.anthropic import wrap_anthropic
from aiocache_llm.integrations.openai import OpenAIEmbedder, wrap_openai
from tests.conftest import REDIS_URL, RedisTarget
from tests.support.anthropic_server import FakeAnthropicServer
from tests.support.openai_server import FakeOpenAIServer

pytestmark = [pytest.mark.timeout(90), pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
OPENAI_QUERY: dict[str, Any] = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "what is the capital of France"}],
}
ANTHROPIC_QUERY: dict[str, Any] = {**OPENAI_QUERY, "model": "claude-test", "max_tokens": 64}
TEXT = "what is the capital of France"

SECOND_PROCESS = textwrap.dedent(
    """
    import asyncio, json, sys
    import anthropic, openai
    from aiocache_llm import CachedEmbedder, RedisExactCache
    from aiocache_llm.integrations.anthropic import wrap_anthropic
    from aiocache_llm.integrations.openai import OpenAIEmbedder, wrap_openai

    openai_url, anthropic_url, redis_url, prefix = sys.argv[1:5]
    openai_query, anthropic_query, text = (json.loads(arg) for arg in sys.argv[5:8])

    async def main():
        oa = openai.AsyncOpenAI(base_url=openai_url, api_key="test", max_retries=0)
        an = anthropic.AsyncAnthropic(base_url=anthropic_url, api_key="test", max_retries=0)
        caches = [
            RedisExactCache(url=redis_url, key_prefix=prefix + ":openai"),
            RedisExactCache(url=redis_url, key_prefix=prefix + ":anthropic"),
        ]
        async with (
            wrap_openai(oa, exact_cache=caches[0]) as openai_client,
            wrap_anthropic(an, exact_cache=caches[1]) as anthropic_client,
            CachedEmbedder(
                OpenAIEmbedder(oa, model="text-embedding-test"),
                url=redis_url,
                key_prefix=prefix + ":embeddings",
            ) as embed,
        ):
            completion = await openai_client.chat.completions.create(**openai_query)
            stream = await openai_client.chat.completions.create(**openai_query, stream=True)
            chunks = [chunk.model_dump(mode="json") async for chunk in stream]
            message = await anthropic_client.messages.create(**anthropic_query)
            vector = await embed(text)
            out = {
                "completion": completion.model_dump(mode="json"),
                "chunks": chunks,
                "message": message.model_dump(mode="json"),
                "vector": vector.tolist(),
                "redis_hits": embed.stats().redis_hits,
                "provider_calls": [
                    openai_client.gateway.stats().provider_calls,
                    anthropic_client.gateway.stats().provider_calls,
                ],
            }
        for cache in caches:
            await cache.aclose()
        await oa.close()
        await an.close()
        print(json.dumps(out))

    asyncio.run(main())
    """
)


async def test_a_second_process_answers_from_the_first_ones_entries(
    real_redis: RedisTarget,
) -> None:
    prefix = real_redis.prefix
    async with FakeOpenAIServer() as openai_server, FakeAnthropicServer() as anthropic_server:
        oa, an = openai_server.client(), anthropic_server.client()
        async with (
            wrap_openai(
                oa, exact_cache=RedisExactCache(url=REDIS_URL, key_prefix=prefix + ":openai")
            ) as openai_client,
            wrap_anthropic(
                an, exact_cache=RedisExactCache(url=REDIS_URL, key_prefix=prefix + ":anthropic")
            ) as anthropic_client,
            CachedEmbedder(
                OpenAIEmbedder(oa, model="text-embedding-test"),
                client=real_redis.client,
                key_prefix=prefix + ":embeddings",
            ) as embed,
        ):
            completion = await openai_client.chat.completions.create(**OPENAI_QUERY)
            stream = await openai_client.chat.completions.create(**OPENAI_QUERY, stream=True)
            chunks = [chunk async for chunk in stream]
            message = await anthropic_client.messages.create(**ANTHROPIC_QUERY)
            vector = await embed(TEXT)
            for client in (openai_client, anthropic_client):
                await client.gateway.exact_cache.aclose()
        counts = (openai_server.requests, anthropic_server.requests)
        assert counts == (3, 1)  # chat, stream, embeddings; one message

        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SECOND_PROCESS,
            openai_server.base_url,
            anthropic_server.base_url,
            REDIS_URL,
            prefix,
            json.dumps(OPENAI_QUERY),
            json.dumps(ANTHROPIC_QUERY),
            json.dumps(TEXT),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=80)
        assert process.returncode == 0, err.decode()
        # the second process made no request to either server
        assert (openai_server.requests, anthropic_server.requests) == counts
    result = json.loads(out)
    assert result["provider_calls"] == [0, 0]
    assert result["redis_hits"] == 1
    assert result["completion"] == completion.model_dump(mode="json")
    assert result["chunks"] == [chunk.model_dump(mode="json") for chunk in chunks]
    assert result["message"] == message.model_dump(mode="json")
    assert result["vector"] == vector.tolist()
