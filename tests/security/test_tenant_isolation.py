"""Tenants never see each other's entries: exact, semantic, chat memory and whole gateways.

Two tenants share one Redis (or one process) and differ only in their key prefix (or
their instance, in memory). They ask the same questions and get different answers;
whatever one does (put, paraphrase lookups, invalidate, clear, eviction, coalesced
provider calls) never shows in the other. Prefix pairs include a sibling
(``acme`` / ``acme-eu``) and a nested one (``acme`` / ``acme:eu``), the two ways a
naive prefix match leaks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aiocache_llm import (
    AsyncChatMemory,
    AsyncExactCache,
    AsyncSemanticCache,
    InferenceGateway,
    MemoryChatMemory,
    MemoryExactCache,
    MemorySemanticCache,
    RedisChatMemory,
    RedisExactCache,
    RedisSemanticCache,
)
from aiocache_llm.embedders import HashingEmbedder
from tests.conftest import Backend

QUERY = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
PARAPHRASE = {
    "model": "m",
    "messages": [{"role": "user", "content": "what's the capital of france"}],
}
PREFIX_PAIRS = [("acme", "globex"), ("acme", "acme-eu"), ("acme", "acme:eu")]
PAIR_IDS = ["distinct", "sibling", "nested"]

pytestmark = pytest.mark.timeout(30)


class Tenants:
    """Builds the two tenants' objects of one backend kind; closes them afterwards."""

    def __init__(self, backend: Backend, names: tuple[str, str]) -> None:
        self.backend = backend
        self.names = names
        self.made: list[Any] = []

    def prefix(self, tenant: int, kind: str = "") -> str:
        """The tenant's prefix as is (so pairs really nest), or with a suffix per cache kind."""
        assert self.backend.redis is not None
        prefix = f"{self.backend.redis.prefix}:{self.names[tenant]}"
        return f"{prefix}:{kind}" if kind else prefix

    def exact(self, tenant: int, kind: str = "", **kwargs: Any) -> AsyncExactCache:
        cache: AsyncExactCache
        if self.backend.redis is None:
            cache = MemoryExactCache(clock=self.backend.clock, **kwargs)
        else:
            kwargs.setdefault("max_size", 0)
            cache = RedisExactCache(
                client=self.backend.redis.client, key_prefix=self.prefix(tenant, kind), **kwargs
            )
        self.made.append(cache)
        return cache

    def semantic(
        self, tenant: int, embed: Callable[[str], Any], kind: str = ""
    ) -> AsyncSemanticCache:
        cache: AsyncSemanticCache
        if self.backend.redis is None:
            cache = MemorySemanticCache(
                embed, similarity_threshold=0.8, clock=self.backend.clock, embed_in_thread=False
            )
        else:
            cache = RedisSemanticCache(
                embed,
                client=self.backend.redis.client,
                key_prefix=self.prefix(tenant, kind),
                similarity_threshold=0.8,
                embed_in_thread=False,
            )
        self.made.append(cache)
        return cache

    def chat(self, tenant: int) -> AsyncChatMemory:
        memory: AsyncChatMemory
        if self.backend.redis is None:
            memory = MemoryChatMemory(clock=self.backend.clock)
        else:
            memory = RedisChatMemory(
                client=self.backend.redis.client, key_prefix=self.prefix(tenant)
            )
        self.made.append(memory)
        return memory

    async def aclose(self) -> None:
        for made in self.made:
            await made.aclose()


@pytest.fixture(params=PREFIX_PAIRS, ids=PAIR_IDS)
async def tenants(backend: Backend, request: pytest.FixtureRequest) -> AsyncIterator[Tenants]:
    if backend.is_memory and request.param != PREFIX_PAIRS[0]:
        pytest.skip("memory tenants are separate objects: prefixes mean nothing there")
    made = Tenants(backend, request.param)
    yield made
    await made.aclose()


async def test_exact_caches_of_two_tenants_never_share_entries(tenants: Tenants) -> None:
    a, b = tenants.exact(0), tenants.exact(1)
    await a.put(QUERY, "answer for A")
    assert await b.get(QUERY) is None
    await b.put(QUERY, {"answer": "for B"})
    assert await a.get(QUERY) == "answer for A"
    assert await b.get(QUERY) == {"answer": "for B"}

    assert await a.invalidate(QUERY) is True
    assert await b.get(QUERY) == {"answer": "for B"}
    await a.put(QUERY, "answer for A")
    await a.clear()
    assert await a.get(QUERY) is None
    assert await b.get(QUERY) == {"answer": "for B"}
    assert (await b.stats()).size == 1
    await b.clear()
    assert await b.get(QUERY) is None


async def test_eviction_in_one_bounded_tenant_leaves_the_other_alone(tenants: Tenants) -> None:
    a, b = tenants.exact(0, max_size=3), tenants.exact(1, max_size=3)
    await b.put(QUERY, "kept")
    for i in range(10):  # far beyond A's bound: A evicts only its own entries
        await a.put(f"question {i}", f"answer {i}")
    assert await b.get(QUERY) == "kept"
    assert (await a.stats()).size == 3
    assert (await b.stats()).size == 1
    assert [await a.get(f"question {i}") for i in range(7, 10)] == [
        "answer 7",
        "answer 8",
        "answer 9",
    ]


async def test_semantic_caches_of_two_tenants_never_answer_for_each_other(
    tenants: Tenants,
) -> None:
    embed = HashingEmbedder(dimension=64)
    a, b = tenants.semantic(0, embed), tenants.semantic(1, embed)
    await a.put(QUERY, "semantic answer for A")
    # a paraphrase close enough to hit A's entry finds nothing in B
    assert await a.get(PARAPHRASE) == "semantic answer for A"
    assert await b.get(PARAPHRASE) is None
    assert await b.get(QUERY) is None
    await b.put(PARAPHRASE, "semantic answer for B")
    assert await a.get(PARAPHRASE) == "semantic answer for A"
    assert await b.get(QUERY) == "semantic answer for B"

    await a.clear()
    assert await a.get(QUERY) is None
    assert await b.get(QUERY) == "semantic answer for B"
    assert (await b.stats()).size == 1


async def test_semantic_tenants_may_use_embedders_of_different_dimensions(
    tenants: Tenants,
) -> None:
    """Each prefix keeps its own dimension: one tenant's embedder never locks out another's."""
    a = tenants.semantic(0, HashingEmbedder(dimension=32))
    b = tenants.semantic(1, HashingEmbedder(dimension=48))
    await a.put(QUERY, "A")
    await b.put(QUERY, "B")
    assert (await a.get(PARAPHRASE), await b.get(PARAPHRASE)) == ("A", "B")


async def test_chat_memories_of_two_tenants_keep_separate_histories(tenants: Tenants) -> None:
    a, b = tenants.chat(0), tenants.chat(1)
    await a.append("conv-1", "user", "A's secret")
    await b.append("conv-1", "user", "B's question")
    assert await a.get_history("conv-1") == [{"role": "user", "content": "A's secret"}]
    assert await b.get_history("conv-1") == [{"role": "user", "content": "B's question"}]
    await a.clear("conv-1")
    assert await a.get_history("conv-1") == []
    assert await b.get_history("conv-1") == [{"role": "user", "content": "B's question"}]


@pytest.mark.parametrize("tenants", [PREFIX_PAIRS[2]], ids=["nested"], indirect=True)
async def test_a_conversation_id_cannot_reach_into_a_nested_tenant(tenants: Tenants) -> None:
    if tenants.backend.is_memory:
        pytest.skip("memory tenants are separate objects")
    outer, inner = tenants.chat(0), tenants.chat(1)  # prefixes "<p>:acme", "<p>:acme:eu"
    await inner.append("1", "user", "inner tenant's secret")
    assert await outer.get_history("eu:1") == []


# -- a gateway per tenant --------------------------------------------------------------


class TenantProvider:
    """Answers every query with the tenant's name, slowly enough for calls to overlap."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    async def __call__(self, query: Any) -> str:
        self.calls += 1
        await asyncio.sleep(0.05)
        return f"{self.name}: {query['messages'][-1]['content']}"


async def test_gateways_of_two_tenants_never_share_answers_or_provider_calls(
    tenants: Tenants,
) -> None:
    embed = HashingEmbedder(dimension=64)
    providers = [TenantProvider("A"), TenantProvider("B")]
    gateways = [
        InferenceGateway(
            providers[t],
            exact_cache=tenants.exact(t, "exact"),
            semantic_cache=tenants.semantic(t, embed, "semantic"),
            backend_timeout=5,
        )
        for t in (0, 1)
    ]
    try:
        # concurrent identical misses: coalesced within a tenant, never across tenants
        answers = await asyncio.gather(*(g.resolve(QUERY) for g in gateways for _ in range(5)))
        question = QUERY["messages"][0]["content"]  # type: ignore[index]
        assert answers == [f"A: {question}"] * 5 + [f"B: {question}"] * 5
        assert [p.calls for p in providers] == [1, 1]
        # hits (exact, then semantic) come from the tenant's own caches
        assert await gateways[1].resolve(QUERY) == f"B: {question}"
        assert await gateways[0].resolve(PARAPHRASE) == f"A: {question}"
        assert await gateways[1].resolve(PARAPHRASE) == f"B: {question}"
        assert [p.calls for p in providers] == [1, 1]
        assert [g.stats().semantic_hits for g in gateways] == [1, 1]
        assert sum(g.stats().backend_errors for g in gateways) == 0
    finally:
        for gateway in gateways:
            await gateway.aclose()
