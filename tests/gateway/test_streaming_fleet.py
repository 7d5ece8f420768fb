"""Streams shared across gateways on one Redis (each gateway stands for a process)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from aiocache_llm import (
    HashingEmbedder,
    InferenceGateway,
    RecordedStream,
    RedisExactCache,
    RedisSemanticCache,
    RemoteProviderError,
)
from aiocache_llm.gateway.streaming import stream_key_query
from tests.conftest import REDIS_BACKENDS, RedisTarget, open_redis_target
from tests.gateway.streams import QUERY, StreamingProvider, collect

TEXT = [f"w{i} " for i in range(10)]


@pytest.fixture(params=REDIS_BACKENDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param) as target:
        yield target


def gateway_on(target: RedisTarget, provider: Any, **options: Any) -> InferenceGateway:
    cache = RedisExactCache(client=target.client, key_prefix=target.prefix)
    return InferenceGateway(provider, exact_cache=cache, lease_seconds=1.0, **options)


async def test_two_processes_share_one_provider_stream(target: RedisTarget) -> None:
    provider = StreamingProvider(delay=0.03)
    gateways = [gateway_on(target, provider) for _ in range(2)]

    async def consumer(gateway: InferenceGateway, index: int) -> list[Any]:
        await asyncio.sleep(index * 0.003)
        return await collect(gateway.stream(QUERY))

    results = await asyncio.gather(*(consumer(g, i) for g in gateways for i in range(20)))
    stats = [g.stats() for g in gateways]
    for gateway in gateways:
        await gateway.aclose()
    assert provider.streams == 1
    assert results == [TEXT] * 40
    assert sum(s.fleet_hits for s in stats) == 1  # the other process's first consumer
    assert sum(s.misses for s in stats) == 1


async def test_a_late_joiner_in_another_process_gets_the_chunks_so_far(
    target: RedisTarget,
) -> None:
    provider = StreamingProvider(delay=0.03)
    leader, follower = gateway_on(target, provider), gateway_on(target, provider)
    first = leader.stream(QUERY)
    early = [await first.__anext__() for _ in range(5)]
    late, rest = await asyncio.gather(collect(follower.stream(QUERY)), collect(first))
    await leader.aclose()
    await follower.aclose()
    assert provider.streams == 1
    assert early + rest == TEXT
    assert late == TEXT


async def test_a_provider_error_reaches_the_other_process_after_its_chunks(
    target: RedisTarget,
) -> None:
    provider = StreamingProvider(delay=0.03, fail_after=3)
    leader, follower = gateway_on(target, provider), gateway_on(target, provider)

    async def read(gateway: InferenceGateway, delay: float) -> tuple[list[Any], BaseException]:
        await asyncio.sleep(delay)
        seen: list[Any] = []
        try:
            async for chunk in gateway.stream(QUERY):
                seen.append(chunk)
        except Exception as exc:
            return seen, exc
        raise AssertionError("the stream did not fail")

    (local_seen, local_error), (remote_seen, remote_error) = await asyncio.gather(
        read(leader, 0), read(follower, 0.02)
    )
    await leader.aclose()
    await follower.aclose()
    assert provider.streams == 1
    assert local_seen == remote_seen == TEXT[:3]
    assert isinstance(local_error, RuntimeError)
    assert isinstance(remote_error, RemoteProviderError)
    assert remote_error.error_type == "RuntimeError"
    assert "boom" in str(remote_error)
    cache = RedisExactCache(client=target.client, key_prefix=target.prefix)
    assert await cache.get(stream_key_query(QUERY)) is None


async def test_the_finished_stream_is_stored_once_for_the_fleet(target: RedisTarget) -> None:
    provider = StreamingProvider(delay=0.01)
    leader, follower = gateway_on(target, provider), gateway_on(target, provider)
    await asyncio.gather(collect(leader.stream(QUERY)), collect(follower.stream(QUERY)))
    await asyncio.sleep(0.05)
    assert await collect(follower.stream(QUERY)) == TEXT
    cache = RedisExactCache(client=target.client, key_prefix=target.prefix)
    assert await cache.get(stream_key_query(QUERY)) == RecordedStream(TEXT)
    assert follower.stats().stream_hits == 1
    await leader.aclose()
    await follower.aclose()
    assert provider.streams == 1


async def test_the_leader_streams_on_when_its_own_consumers_leave(target: RedisTarget) -> None:
    provider = StreamingProvider(delay=0.03)
    leader, follower = gateway_on(target, provider), gateway_on(target, provider)
    mine = leader.stream(QUERY)
    await mine.__anext__()
    remote = asyncio.ensure_future(collect(follower.stream(QUERY)))
    await asyncio.sleep(0.05)
    await mine.aclose()  # the follower still reads what this process streams
    assert await remote == TEXT
    await leader.aclose()
    await follower.aclose()
    assert (provider.streams, provider.closed_early) == (1, 0)


async def test_a_redis_semantic_hit_replays_a_stream_in_another_process(
    target: RedisTarget,
) -> None:
    def gateway(provider: StreamingProvider) -> InferenceGateway:
        semantic = RedisSemanticCache(
            HashingEmbedder(),
            client=target.client,
            key_prefix=f"{target.prefix}:sem",
            similarity_threshold=0.5,
        )
        return gateway_on(target, provider, semantic_cache=semantic)

    writer_provider, reader_provider = StreamingProvider(["s1", "s2"]), StreamingProvider()
    async with gateway(writer_provider) as writer:
        await collect(writer.stream(QUERY))
    paraphrase = {"model": "m", "messages": [{"role": "user", "content": "tell me!"}]}
    async with gateway(reader_provider) as reader:
        assert await collect(reader.stream(paraphrase)) == ["s1", "s2"]
        assert await reader.resolve(paraphrase) == "plain:tell me!"  # never the stream
        assert reader.stats().semantic_hits == 1
    assert (writer_provider.streams, reader_provider.streams) == (1, 0)


async def test_a_follower_streams_alone_when_the_leader_sends_nothing_in_time(
    target: RedisTarget,
) -> None:
    slow = StreamingProvider(first_delay=1.5)
    fast = StreamingProvider()
    leader = gateway_on(target, slow)
    follower = gateway_on(target, fast, fleet_max_wait=0.2)
    waiting = asyncio.ensure_future(collect(leader.stream(QUERY)))
    await asyncio.sleep(0.1)  # the leader holds the lease, its provider is silent
    started = asyncio.get_running_loop().time()
    assert await collect(follower.stream(QUERY)) == TEXT
    elapsed = asyncio.get_running_loop().time() - started
    assert await waiting == TEXT
    await leader.aclose()
    await follower.aclose()
    assert (slow.streams, fast.streams) == (1, 1)
    assert 0.15 <= elapsed < 1.0


@pytest.mark.redis
@pytest.mark.parametrize(
    "options",
    [{"protocol": 3}, {"max_connections": 4}, {"protocol": 3, "max_connections": 4}],
    ids=["resp3", "small-pool", "resp3-small-pool"],
)
async def test_streams_are_shared_through_any_client_shape(
    real_redis: RedisTarget, options: dict[str, Any]
) -> None:
    """RESP3 replies and small pools (no held connection: parsed replies) read alike."""
    assert real_redis.url is not None
    clients = [Redis.from_url(real_redis.url, **options) for _ in range(2)]
    provider = StreamingProvider(delay=0.02)
    gateways = [
        InferenceGateway(
            provider,
            exact_cache=RedisExactCache(client=client, key_prefix=real_redis.prefix),
            lease_seconds=1.0,
        )
        for client in clients
    ]
    results = await asyncio.gather(*(collect(g.stream(QUERY)) for g in gateways for _ in range(3)))
    for gateway in gateways:
        await gateway.aclose()
    for client in clients:
        await client.aclose()
    assert results == [TEXT] * 6
    assert provider.streams == 1
