"""Real ``openai.AsyncOpenAI`` streams over real HTTP (a local OpenAI-compatible server).

The gateway's provider is the SDK call itself, as an application writes it; streams are
shared, stored and replayed as the SDK's own ``ChatCompletionChunk`` objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from aiocache_llm import (
    InferenceGateway,
    MemoryExactCache,
    MemoryRateLimiter,
    RateLimitConfig,
    RedisExactCache,
)
from tests.conftest import RedisTarget
from tests.support.openai_server import FakeOpenAIServer

QUERY: dict[str, Any] = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "stream me a short answer please"}],
}
ANSWER = "Echo: stream me a short answer please"
TYPES = [ChatCompletion, ChatCompletionChunk]


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


def sdk_provider(client: openai.AsyncOpenAI) -> Any:
    async def provider(query: dict[str, Any]) -> Any:
        return await client.chat.completions.create(**query)

    return provider


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def read(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


async def test_sdk_streams_are_stored_and_replayed_as_sdk_chunks(
    server: FakeOpenAIServer,
) -> None:
    cache = MemoryExactCache(value_types=TYPES)
    async with InferenceGateway(sdk_provider(server.client()), exact_cache=cache) as gateway:
        streamed = await read(await gateway.resolve({**QUERY, "stream": True}))
        replayed = await read(await gateway.resolve({**QUERY, "stream": True}))
        plain = await gateway.resolve(QUERY)
    assert server.stream_requests == 1
    assert server.requests == 2  # one stream, one plain completion
    assert all(type(chunk) is ChatCompletionChunk for chunk in streamed + replayed)
    assert text_of(streamed) == ANSWER
    assert replayed == streamed
    assert replayed[0] is not streamed[0]
    assert isinstance(plain, ChatCompletion)
    assert plain.choices[0].message.content == ANSWER


async def test_concurrent_sdk_streams_make_one_http_stream(server: FakeOpenAIServer) -> None:
    server.chunk_delay = 0.02
    async with InferenceGateway(sdk_provider(server.client())) as gateway:

        async def consumer(index: int) -> list[Any]:
            await asyncio.sleep(index * 0.002)
            return await read(gateway.stream(QUERY))

        results = await asyncio.gather(*(consumer(i) for i in range(30)))
    assert server.stream_requests == 1
    assert server.bodies[0]["stream"] is True  # the SDK was asked for a stream
    assert all(text_of(result) == ANSWER for result in results)
    assert all(result == results[0] for result in results)


async def test_usage_of_the_last_chunk_settles_the_rate_limit(server: FakeOpenAIServer) -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=100_000))
    query = {**QUERY, "stream": True, "stream_options": {"include_usage": True}}
    async with InferenceGateway(sdk_provider(server.client()), rate_limiter=limiter) as gateway:
        chunks = await read(await gateway.resolve(query, user_id="alice"))
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.total_tokens > 0
    assert await limiter.get_remaining("alice") == 100_000 - usage.total_tokens


async def test_a_broken_http_stream_reaches_every_consumer_and_is_not_stored(
    server: FakeOpenAIServer,
) -> None:
    server.fail_after = 2
    server.chunk_delay = 0.02
    async with InferenceGateway(sdk_provider(server.client())) as gateway:

        async def consumer() -> tuple[int, BaseException | None]:
            seen = 0
            try:
                async for _ in gateway.stream(QUERY):
                    seen += 1
            except openai.APIConnectionError as exc:
                return seen, exc
            return seen, None

        results = await asyncio.gather(*(consumer() for _ in range(5)))
        server.fail_after = None
        assert text_of(await read(gateway.stream(QUERY))) == ANSWER
    assert all(seen == 3 and error is not None for seen, error in results)  # role + 2 pieces
    assert server.stream_requests == 2


async def test_the_http_stream_is_closed_when_every_consumer_leaves(
    server: FakeOpenAIServer,
) -> None:
    server.chunk_delay = 0.05
    server.pieces = 40
    async with InferenceGateway(sdk_provider(server.client())) as gateway:
        async with gateway.stream(QUERY) as stream:
            await stream.__anext__()
        await server.wait_for(lambda: server.streams_closed_early == 1)
        assert gateway.stats().streams_abandoned == 1


@pytest.mark.redis
async def test_sdk_chunks_stored_on_redis_replay_in_another_process(
    server: FakeOpenAIServer, real_redis: RedisTarget
) -> None:
    def gateway() -> InferenceGateway:
        cache = RedisExactCache(
            client=real_redis.client, key_prefix=real_redis.prefix, value_types=TYPES
        )
        return InferenceGateway(sdk_provider(server.client()), exact_cache=cache)

    async with gateway() as first:
        streamed = await read(first.stream(QUERY))
    async with gateway() as second:  # another process: the same prefix, its own objects
        replayed = await read(second.stream(QUERY))
        assert second.stats().stream_hits == 1
    assert server.stream_requests == 1
    assert all(type(chunk) is ChatCompletionChunk for chunk in replayed)
    assert replayed == streamed
