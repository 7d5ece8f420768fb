"""Per-node circuit breakers: a frozen cluster primary costs only its own keys their hits.

A primary of a private cluster is frozen (SIGSTOP, by the pid this test's fixture
started; thawed afterwards). Resolves whose exact-cache keys live on healthy primaries
still hit the cache; those on the frozen one fall through to the provider within the
gateway's deadline, and only that node's breaker opens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from aiocache_llm import (
    BreakerState,
    InferenceGateway,
    InvalidInputError,
    RedisExactCache,
    RedisSemanticCache,
)
from aiocache_llm.embedders import HashingEmbedder
from tests.support.redis_cluster import LocalCluster

pytestmark = [pytest.mark.cluster]

BACKEND_TIMEOUT = 0.3
QUERIES = [{"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(30)]


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A cluster of its own (one of its primaries is frozen); a node timeout long
    enough that no replica takes over while the test runs."""
    own = LocalCluster(node_timeout_ms=30_000).start()
    try:
        yield own
    finally:
        own.stop()


class Provider:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, query: dict[str, Any]) -> str:
        text = query["messages"][-1]["content"]
        self.asked.append(text)
        return f"answer to {text}"


async def test_a_frozen_primary_opens_only_its_own_breaker(cluster: LocalCluster) -> None:
    exact = RedisExactCache(url=cluster.url, key_prefix="test:nodes")
    provider = Provider()
    gateway = InferenceGateway(
        provider,
        exact_cache=exact,
        backend_timeout=BACKEND_TIMEOUT,
        breaker_threshold=2,
        breaker_reset_after=60.0,
    )
    for query in QUERIES:  # fill the cache: every entry on the primary of its key
        assert await gateway.resolve(query) == f"answer to {query['messages'][0]['content']}"
    assert len(provider.asked) == len(QUERIES)
    node_of = {q["messages"][0]["content"]: exact.node_of(exact.key(q)) for q in QUERIES}
    assert None not in node_of.values()
    victim = node_of["q0"]
    assert victim is not None
    frozen = {text for text, node in node_of.items() if node == victim}
    healthy = set(node_of) - frozen
    assert frozen
    assert healthy
    provider.asked.clear()
    hits_before = gateway.stats().exact_hits
    node = cluster.node(int(victim.rsplit(":", 1)[1]))
    durations: dict[str, float] = {}

    async def timed(query: dict[str, Any]) -> Any:
        started = time.monotonic()
        answer = await gateway.resolve(query)
        durations[query["messages"][0]["content"]] = time.monotonic() - started
        return answer

    node.freeze()
    try:
        answers = await asyncio.gather(*(timed(q) for q in QUERIES))
        # a second round: the victim's breaker is open now, its keys skip Redis at once
        again = await asyncio.gather(
            *(timed(q) for q in QUERIES if q["messages"][0]["content"] in frozen)
        )
        # with the victim's breaker open, keys on healthy primaries still hit the cache
        healthy_again = await asyncio.gather(
            *(gateway.resolve(q) for q in QUERIES if q["messages"][0]["content"] in healthy)
        )
        assert gateway.breaker_states()[f"exact cache on {victim}"] is BreakerState.OPEN
    finally:
        node.thaw()
    assert len(healthy_again) == len(healthy)
    assert answers == [f"answer to {q['messages'][0]['content']}" for q in QUERIES]
    assert all(a.startswith("answer to") for a in again)
    # keys on healthy primaries were all answered by the cache; only the frozen
    # node's keys went to the provider (twice each: both rounds)
    assert set(provider.asked) == frozen
    assert gateway.stats().exact_hits - hits_before == 2 * len(healthy)
    # within the deadline: a get, the lease's re-read and a put at most, each bounded
    assert max(durations[text] for text in healthy) < BACKEND_TIMEOUT
    assert max(durations.values()) < 3 * BACKEND_TIMEOUT + 0.5
    states = gateway.breaker_states()
    assert states[f"exact cache on {victim}"] is BreakerState.OPEN
    others = {name: s for name, s in states.items() if name != f"exact cache on {victim}"}
    assert others
    assert all(s is BreakerState.CLOSED for s in others.values()), others
    assert gateway.stats().backend_skipped > 0  # the second round skipped the frozen node
    await gateway.aclose()
    await exact.clear()
    await exact.aclose()


@pytest.fixture
async def cluster_client(redis_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster.startup_nodes]
    )
    await client.initialize()
    yield client
    await client.aclose()


async def test_a_pairing_that_could_never_promote_is_refused_at_construction(
    cluster_client: RedisCluster,
) -> None:
    semantic = RedisSemanticCache(HashingEmbedder(), client=cluster_client, key_prefix="{t-pr}:sem")
    spread = RedisExactCache(client=cluster_client, key_prefix="t-pr:exact")  # every slot
    other_slot = RedisExactCache(client=cluster_client, key_prefix="{t-pr-2}:exact")
    same_slot = RedisExactCache(client=cluster_client, key_prefix="{t-pr}:exact")
    for exact in (spread, other_slot):
        with pytest.raises(InvalidInputError, match="same hash tag"):
            InferenceGateway(lambda q: "x", exact_cache=exact, semantic_cache=semantic)
        # without promotions the pairing is fine
        await InferenceGateway(
            lambda q: "x", exact_cache=exact, semantic_cache=semantic, promote_semantic_hits=False
        ).aclose()
    await InferenceGateway(lambda q: "x", exact_cache=same_slot, semantic_cache=semantic).aclose()
    for cache in (semantic, spread, other_slot, same_slot):
        await cache.aclose()
