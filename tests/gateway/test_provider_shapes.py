"""The gateway with Anthropic-shaped requests and answers (issue 14): the token budget
settles on what Anthropic reports, and tool-result turns never trouble the semantic cache.

Each test runs on memory (a fake clock), on fakeredis and on the real Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiocache_llm import (
    AsyncRateLimiter,
    AsyncSemanticCache,
    InferenceGateway,
    MemoryExactCache,
    MemoryRateLimiter,
    MemorySemanticCache,
    RateLimitConfig,
    RedisExactCache,
    RedisRateLimiter,
    RedisSemanticCache,
)
from aiocache_llm.gateway.tokens import estimate_tokens
from tests.conftest import Backend
from tests.gateway.fakes import CountingProvider

pytestmark = pytest.mark.timeout(30)

BUDGET = 10_000
# a 4000-character system prompt, estimated at 105 tokens before issue 14
QUERY: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "system": "You are a terse geography tutor. " + "x" * 3967,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}
RESERVED = 1000 + 8 + 4 + 100  # (4000 + 30 characters) / 4, framing, max_tokens


def anthropic_answer(**usage: int) -> dict[str, Any]:
    """A Messages API answer (as in Anthropic's API reference) reporting ``usage``."""
    return {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Paris."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


@pytest.fixture
async def limiter(backend: Backend) -> AsyncIterator[AsyncRateLimiter]:
    config = RateLimitConfig(BUDGET, 60.0)
    made: AsyncRateLimiter
    if backend.redis is None:
        made = MemoryRateLimiter(config, clock=backend.clock)
    else:
        made = RedisRateLimiter(
            client=backend.redis.client,
            key_prefix=f"{backend.redis.prefix}:limiter",
            config=config,
            failure_mode="raise",
            operation_timeout=None,
        )
    yield made
    await made.aclose()


def test_the_query_is_estimated_with_its_system_prompt() -> None:
    assert estimate_tokens(QUERY) == RESERVED


@pytest.mark.parametrize(
    ("usage", "used"),
    [
        ({"input_tokens": 12, "output_tokens": 10}, 22),
        (
            {
                "input_tokens": 12,
                "output_tokens": 10,
                "cache_creation_input_tokens": 1500,
                "cache_read_input_tokens": 0,
            },
            1522,
        ),
    ],
    ids=["less-than-reserved", "more-than-reserved"],
)
async def test_an_anthropic_answer_settles_the_budget_on_what_it_reports(
    limiter: AsyncRateLimiter, usage: dict[str, int], used: int
) -> None:
    async def provider(query: Any) -> dict[str, Any]:
        return anthropic_answer(**usage)

    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        answer = await gateway.resolve(QUERY, user_id="alice")
        assert answer["usage"] == usage
        assert await limiter.get_remaining("alice") == BUDGET - used
        await gateway.resolve(QUERY, user_id="alice")  # an exact hit costs nothing
        assert await limiter.get_remaining("alice") == BUDGET - used
        assert gateway.stats().backend_errors == 0


async def test_an_anthropic_stream_settles_the_budget_on_what_it_reports(
    limiter: AsyncRateLimiter,
) -> None:
    async def provider(query: Any) -> AsyncIterator[dict[str, Any]]:
        yield {
            "type": "message_start",
            "message": {
                **anthropic_answer(input_tokens=12, output_tokens=1, cache_read_input_tokens=3000),
                "content": [],
            },
        }
        yield {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Paris."},
        }
        yield {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 10},
        }
        yield {"type": "message_stop"}

    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        async for _ in gateway.stream(QUERY, user_id="alice"):
            pass
        assert await limiter.get_remaining("alice") == BUDGET - (12 + 3000 + 10)


# a tool-result turn has no text for the semantic cache to compare

TOOL_TURN: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "tools": [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "input_schema": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        }
    ],
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "name": "get_weather",
                    "input": {"location": "Paris, France"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                    "content": "15 degrees, sunny",
                }
            ],
        },
    ],
}
VECTORS = {
    "capital of France?": [1.0, 0.0, 0.0, 0.0],
    "France's capital?": [0.96, 0.28, 0.0, 0.0],
}


def embed(text: str) -> list[float]:
    return VECTORS[text]  # any other text fails the test as a backend error


@pytest.fixture
async def caches(backend: Backend) -> AsyncIterator[tuple[Any, AsyncSemanticCache]]:
    """An exact and a semantic cache of the backend under test."""
    exact: Any
    semantic: AsyncSemanticCache
    if backend.redis is None:
        exact = MemoryExactCache(clock=backend.clock)
        semantic = MemorySemanticCache(
            embed, similarity_threshold=0.9, clock=backend.clock, embed_in_thread=False
        )
    else:
        client, prefix = backend.redis.client, backend.redis.prefix
        exact = RedisExactCache(client=client, key_prefix=f"{prefix}:exact")
        semantic = RedisSemanticCache(
            embed,
            client=client,
            key_prefix=f"{prefix}:semantic",
            similarity_threshold=0.9,
            embed_in_thread=False,
        )
    yield exact, semantic
    await exact.aclose()
    await semantic.aclose()


async def test_a_tool_result_turn_skips_the_semantic_cache_without_a_backend_error(
    caches: tuple[Any, AsyncSemanticCache], caplog: pytest.LogCaptureFixture
) -> None:
    exact, semantic = caches
    provider = CountingProvider()
    caplog.set_level(logging.WARNING)
    async with InferenceGateway(provider, exact, semantic) as gateway:
        answer = await gateway.resolve(TOOL_TURN)
        assert answer == f"answer:{TOOL_TURN['messages'][-1]['content']}"
        assert await gateway.resolve(TOOL_TURN) == answer  # the exact cache still holds it
        stats = gateway.stats()
    assert provider.calls == 1
    assert (stats.backend_errors, stats.misses, stats.exact_hits) == (0, 1, 1)
    semantic_stats = await semantic.stats()
    assert (semantic_stats.misses, semantic_stats.size) == (0, 0)
    assert "refused" not in caplog.text


async def test_a_text_block_paraphrase_of_a_string_question_is_a_semantic_hit(
    caches: tuple[Any, AsyncSemanticCache],
) -> None:
    exact, semantic = caches
    provider = CountingProvider()
    asked = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}
    block = [{"type": "text", "text": "France's capital?"}]
    paraphrase = {"model": "m", "messages": [{"role": "user", "content": block}]}
    async with InferenceGateway(provider, exact, semantic) as gateway:
        answer = await gateway.resolve(asked)
        assert await gateway.resolve(paraphrase) == answer
        stats = gateway.stats()
    assert provider.calls == 1
    assert (stats.semantic_hits, stats.backend_errors) == (1, 0)
