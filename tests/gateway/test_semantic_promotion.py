"""Semantic hits promoted into the exact cache live no longer than, and die with, their entry.

Each test runs on memory caches (a fake clock), on fakeredis and on the real Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from aiocache_llm import (
    InferenceGateway,
    MemoryExactCache,
    MemorySemanticCache,
    RedisExactCache,
    RedisSemanticCache,
)
from tests.conftest import Backend
from tests.gateway.fakes import CountingProvider
from tests.gateway.streams import StreamingProvider

ORIGINAL = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}
PARAPHRASE = {"model": "m", "messages": [{"role": "user", "content": "France's capital?"}]}
VECTORS = {
    "capital of France?": [1.0, 0.0, 0.0, 0.0],
    "France's capital?": [0.96, 0.28, 0.0, 0.0],
}


def embed(text: str) -> list[float]:
    return VECTORS[text]


@dataclass
class Caches:
    exact: Any
    semantic: Any


@pytest.fixture
async def caches(backend: Backend) -> AsyncIterator[Caches]:
    """An exact and a semantic cache in the same place (a process, or one Redis)."""
    exact: Any
    semantic: Any
    if backend.redis is None:
        exact = MemoryExactCache(clock=backend.clock)
        semantic = MemorySemanticCache(
            embed, similarity_threshold=0.9, clock=backend.clock, embed_in_thread=False
        )
    else:
        client, prefix = backend.redis.client, backend.redis.prefix
        exact = RedisExactCache(client=client, key_prefix=f"{prefix}:exact", max_size=100)
        semantic = RedisSemanticCache(
            embed,
            client=client,
            key_prefix=f"{prefix}:semantic",
            similarity_threshold=0.9,
            embed_in_thread=False,
        )
    yield Caches(exact, semantic)
    await exact.aclose()
    await semantic.aclose()


async def test_a_promoted_hit_expires_with_its_entry(caches: Caches, backend: Backend) -> None:
    provider = CountingProvider()
    gateway = InferenceGateway(provider, exact_cache=caches.exact, semantic_cache=caches.semantic)
    async with gateway:
        await gateway.resolve(ORIGINAL, ttl_seconds=0.3)
        assert await gateway.resolve(PARAPHRASE) == "answer:capital of France?"
        assert gateway.stats().semantic_hits == 1
        assert await caches.exact.get(PARAPHRASE) == "answer:capital of France?"  # promoted
        await backend.wait(0.45)
        assert await caches.exact.get(PARAPHRASE) is None
        assert await gateway.resolve(PARAPHRASE) == "answer:France's capital?"
    assert provider.calls == 2


async def test_a_promoted_hit_dies_when_its_entry_is_invalidated(caches: Caches) -> None:
    provider = CountingProvider()
    gateway = InferenceGateway(provider, exact_cache=caches.exact, semantic_cache=caches.semantic)
    async with gateway:
        await gateway.resolve(ORIGINAL)
        await gateway.resolve(PARAPHRASE)
        assert await caches.exact.get(PARAPHRASE) == "answer:capital of France?"  # promoted
        # the answer is withdrawn where it was stored
        assert await caches.exact.invalidate(ORIGINAL) is True
        assert await caches.semantic.invalidate(ORIGINAL) is True
        assert await gateway.resolve(PARAPHRASE) == "answer:France's capital?"
    assert provider.calls == 2


async def test_a_promotion_keeps_the_shorter_lifetime_asked_for(
    caches: Caches, backend: Backend
) -> None:
    provider = CountingProvider()
    gateway = InferenceGateway(provider, exact_cache=caches.exact, semantic_cache=caches.semantic)
    async with gateway:
        await gateway.resolve(ORIGINAL, ttl_seconds=60)
        await gateway.resolve(PARAPHRASE, ttl_seconds=0.2)
        await backend.wait(0.35)
        assert await caches.exact.get(PARAPHRASE) is None
        assert await caches.exact.get(ORIGINAL) == "answer:capital of France?"


async def test_a_streamed_semantic_hit_is_promoted_under_the_same_rule(
    caches: Caches, backend: Backend
) -> None:
    provider = StreamingProvider(chunks=["Par", "is"])
    gateway = InferenceGateway(provider, exact_cache=caches.exact, semantic_cache=caches.semantic)
    async with gateway:
        assert [c async for c in gateway.stream(ORIGINAL, ttl_seconds=0.3)] == ["Par", "is"]
        assert [c async for c in gateway.stream(PARAPHRASE)] == ["Par", "is"]
        assert provider.streams == 1
        assert gateway.stats().semantic_hits == 1
        assert [c async for c in gateway.stream(PARAPHRASE)] == ["Par", "is"]
        assert gateway.stats().stream_hits == 2  # the promotion answered
        await backend.wait(0.45)
        await asyncio.sleep(0.01)  # let the replaying flights finish (memory never yields)
        assert [c async for c in gateway.stream(PARAPHRASE)] == ["Par", "is"]
    assert provider.streams == 2


async def test_no_promotion_into_an_exact_cache_the_entry_cannot_reach(backend: Backend) -> None:
    """A semantic entry shared through Redis may be invalidated by another process, which
    cannot reach this process's memory: such a promotion would outlive its entry."""
    if backend.redis is None:
        pytest.skip("needs a semantic cache shared through Redis")
    client, prefix = backend.redis.client, backend.redis.prefix
    exact = MemoryExactCache(clock=backend.clock)
    semantic = RedisSemanticCache(
        embed, client=client, key_prefix=prefix, similarity_threshold=0.9, embed_in_thread=False
    )
    provider = CountingProvider()
    async with (
        exact,
        semantic,
        InferenceGateway(provider, exact_cache=exact, semantic_cache=semantic) as gateway,
    ):
        await gateway.resolve(ORIGINAL)
        assert await gateway.resolve(PARAPHRASE) == "answer:capital of France?"
        assert await exact.get(PARAPHRASE) is None
        assert gateway.stats().semantic_hits == 1
    assert provider.calls == 1
