"""Redis Cluster and Sentinel specifics: URL forms, slots, every primary, mapped errors.

The contract suites run on both too (their ``cluster``/``sentinel`` parameters); these
tests check what only a cluster can get wrong: commands that would span slots,
entries spread over several primaries, a fresh client used concurrently, and the
driver's cluster errors at the library's boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from aiocache_llm import (
    BackendError,
    BackendUnavailableError,
    ChatMemoryConfig,
    InvalidInputError,
    InvalidInputTypeError,
    RateLimitConfig,
    RedisChatMemory,
    RedisExactCache,
    RedisRateLimiter,
    RedisSemanticCache,
)
from aiocache_llm.backends.redis.cluster import key_slot_of, scan_keys
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, backend_error, client_from_url
from tests.conftest import RedisTarget, open_redis_target
from tests.support.redis_cluster import LocalCluster
from tests.support.redis_sentinel import SERVICE, LocalSentinel
from tests.support.redis_server import free_port

pytestmark = pytest.mark.cluster


def query(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target("cluster", request) as opened:
        yield opened


def fresh_client(cluster: LocalCluster) -> RedisCluster:
    """A client that has not fetched the topology yet (the redis-py 8 trap)."""
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])


async def primaries_holding(client: RedisCluster, pattern: str) -> set[str]:
    names = set()
    for node in client.get_primaries():
        reply: Any = await client.scan(0, match=pattern, count=10_000, target_nodes=node)
        if reply[1]:
            names.add(node.name)
    return names


# -- URL forms and client types ------------------------------------------------------


def test_url_forms_build_the_client_they_name() -> None:
    cluster = client_from_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert isinstance(cluster, RedisCluster)
    assert {n.port for n in cluster.nodes_manager.startup_nodes.values()} == {7000, 7001}
    assert isinstance(client_from_url("redis://127.0.0.1:7000/?cluster=true"), RedisCluster)
    assert isinstance(client_from_url("rediss+cluster://127.0.0.1:7000"), RedisCluster)
    single = client_from_url("redis://127.0.0.1:7000/0?cluster=false")
    assert isinstance(single, Redis)
    assert not isinstance(single, RedisCluster)
    sentinel = client_from_url(
        "redis+sentinel://:secret@127.0.0.1:26379,127.0.0.1:26380/mymaster/2"
    )
    assert isinstance(sentinel, Redis)
    kwargs = sentinel.connection_pool.connection_kwargs
    assert kwargs["db"] == 2
    assert kwargs["password"] == "secret"
    assert sentinel.connection_pool.service_name == "mymaster"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",  # no service name
        "redis+sentinel://127.0.0.1:26379/a/b/c",
        "redis+sentinel://127.0.0.1:26379/svc/notadb",
        "redis+cluster://127.0.0.1:notaport",
        "redis+cluster://127.0.0.1:7000?unknown=1",
    ],
)
def test_malformed_cluster_and_sentinel_urls_are_refused_before_any_io(url: str) -> None:
    with pytest.raises(InvalidInputError):
        RedisExactCache(url=url)


async def test_every_backend_takes_a_cluster_url(redis_cluster: LocalCluster) -> None:
    prefix = "test:url-forms"
    cache = RedisExactCache(url=redis_cluster.url, key_prefix=prefix)
    limiter = RedisRateLimiter(url=redis_cluster.url, config=RateLimitConfig(3), key_prefix=prefix)
    chat = RedisChatMemory(url=redis_cluster.url, key_prefix=prefix)
    try:
        assert isinstance(cache.cluster, RedisCluster)
        await cache.put(query("q"), "a")
        assert await cache.get(query("q")) == "a"
        assert [await limiter.check_and_consume("u") for _ in range(4)] == [1, 1, 1, 0]
        await chat.append("c", "user", "hi")
        assert await chat.get_history("c") == [{"role": "user", "content": "hi"}]
    finally:
        await cache.clear()
        await limiter.reset("u")
        await chat.clear("c")
        for obj in (cache, limiter, chat):
            await obj.aclose()


async def test_every_backend_takes_a_sentinel_url(redis_sentinel: LocalSentinel) -> None:
    prefix = "test:sentinel-url"
    cache = RedisExactCache(url=redis_sentinel.url, key_prefix=prefix, max_size=10)
    chat = RedisChatMemory(url=redis_sentinel.url, key_prefix=prefix)
    try:
        assert cache.cluster is None
        await cache.put(query("q"), "a")
        assert await cache.get(query("q")) == "a"
        await chat.append("c", "user", "hi")
        assert await chat.get_history("c") == [{"role": "user", "content": "hi"}]
        # it is the primary the sentinel names
        assert redis_sentinel.primary is not None
        direct = Redis(port=redis_sentinel.primary.port)
        assert await direct.exists(cache.key(query("q"))) == 1  # type: ignore[attr-defined]
        await direct.aclose()
    finally:
        await cache.clear()
        await chat.clear("c")
        await cache.aclose()
        await chat.aclose()
    assert SERVICE in redis_sentinel.url


async def test_client_types_are_checked(target: RedisTarget) -> None:
    with pytest.raises(InvalidInputTypeError, match="RedisCluster"):
        RedisExactCache(client=object())  # type: ignore[arg-type]
    decoding = RedisCluster(host="127.0.0.1", port=7000, decode_responses=True)
    with pytest.raises(InvalidInputError, match="decode_responses"):
        RedisChatMemory(client=cast(Redis, decoding))
    # its scripts span slots: refused with a clear message rather than failing later
    with pytest.raises(InvalidInputError, match="Cluster"):
        RedisSemanticCache(lambda text: [1.0, 0.0], client=target.client)


async def test_a_bounded_exact_cache_needs_a_hash_tagged_prefix(target: RedisTarget) -> None:
    with pytest.raises(InvalidInputError, match="hash tag"):
        RedisExactCache(client=target.client, key_prefix=target.prefix, max_size=10)
    cache = RedisExactCache(client=target.client, key_prefix="{" + target.prefix + "}", max_size=5)
    for i in range(12):
        await cache.put(query(f"q{i}"), i)
    assert (await cache.stats()).size == 5
    assert [await cache.get(query(f"q{i}")) for i in range(12)] == [None] * 7 + list(range(7, 12))
    await cache.clear()
    assert (await cache.stats()).size == 0
    await cache.aclose()


# -- slots and primaries ---------------------------------------------------------------


async def test_concurrent_gets_on_a_fresh_client_span_every_primary(
    redis_cluster: LocalCluster, target: RedisTarget
) -> None:
    """Batched gets become per-slot MGETs: no CROSSSLOT, no driver error, all answers right."""
    writer = RedisExactCache(client=target.client, key_prefix=target.prefix)
    for i in range(60):
        await writer.put(query(f"q{i}"), f"a{i}")
    cluster = cast(RedisCluster, target.client)
    assert len(await primaries_holding(cluster, f"{target.prefix}:*")) == 3
    for _ in range(3):  # fresh clients: the first commands run concurrently
        client = fresh_client(redis_cluster)
        reader = RedisExactCache(client=cast(Redis, client), key_prefix=target.prefix)
        answers = await asyncio.gather(*(reader.get(query(f"q{i % 70}")) for i in range(300)))
        assert answers == [f"a{i % 70}" if i % 70 < 60 else None for i in range(300)]
        assert reader._reads._nodes, "gets were batched per node"  # type: ignore[attr-defined]
        await reader.aclose()
        await client.aclose()
    assert (await writer.stats()).size == 60  # SCAN on every primary
    await writer.clear()
    assert (await writer.stats()).size == 0
    assert [k async for keys in scan_keys(cluster, f"{target.prefix}:*") for k in keys] == []
    await writer.aclose()


async def test_limiter_budgets_hold_for_users_on_every_primary(
    redis_cluster: LocalCluster, target: RedisTarget
) -> None:
    users = [f"user-{i}" for i in range(12)]
    probe = RedisRateLimiter(
        client=target.client, config=RateLimitConfig(5), key_prefix=target.prefix
    )
    slots = {key_slot_of(probe.keys(user)[0]) for user in users}
    assert len(slots) == len(users)
    limiters = []
    clients = [fresh_client(redis_cluster) for _ in range(3)]
    for client in clients:
        limiters.append(
            RedisRateLimiter(
                client=cast(Redis, client),
                config=RateLimitConfig(5),
                key_prefix=target.prefix,
                failure_mode="raise",
            )
        )
    calls = [limiters[i % 3].check_and_consume(users[i % 12]) for i in range(12 * 20)]
    results = await asyncio.gather(*calls)
    granted = dict.fromkeys(users, 0)
    for i, result in enumerate(results):
        granted[users[i % 12]] += result
    assert granted == dict.fromkeys(users, 5)
    for user in users:
        assert await probe.get_remaining(user) == 0
    for limiter in [probe, *limiters]:
        await limiter.aclose()
    for client in clients:
        await client.aclose()


async def test_concurrent_chat_appends_on_every_primary_lose_nothing(target: RedisTarget) -> None:
    chat = RedisChatMemory(
        client=target.client, key_prefix=target.prefix, config=ChatMemoryConfig(max_turns=100)
    )
    conversations = [f"conv-{i}" for i in range(9)]

    async def writer(conv: str) -> None:  # one writer per conversation keeps its order
        for n in range(20):
            await chat.append(conv, "user", f"m{n}")

    await asyncio.gather(*(writer(conv) for conv in conversations))
    for conv in conversations:
        assert [m["content"] for m in await chat.get_history(conv)] == [f"m{n}" for n in range(20)]
    cluster = cast(RedisCluster, target.client)
    assert len(await primaries_holding(cluster, f"{target.prefix}:conv-*")) >= 2
    for conv in conversations:
        await chat.clear(conv)
    await chat.aclose()


async def test_fleet_lease_and_waiter_marker_share_a_slot() -> None:
    from aiocache_llm.coalescing.fleet import lease_key_of

    digest = "ab" * 32
    lease = lease_key_of("tenant:exact", digest)
    assert lease == f"tenant:exact:lease:{{{digest}}}"
    assert key_slot_of(lease) == key_slot_of(lease + ":w") == key_slot_of(digest)
    assert key_slot_of(f"tenant:exact:live:{{{digest}}}:token") == key_slot_of(digest)


# -- errors at the boundary ------------------------------------------------------------


async def test_an_unreachable_cluster_raises_library_errors_only() -> None:
    port = free_port()
    client = cast(Redis, RedisCluster(host="127.0.0.1", port=port, socket_connect_timeout=0.5))
    cache = RedisExactCache(client=client, key_prefix="test:dead")
    chat = RedisChatMemory(client=client, key_prefix="test:dead")
    limiter = RedisRateLimiter(
        client=client, config=RateLimitConfig(5), key_prefix="test:dead", failure_mode="raise"
    )
    with pytest.raises(BackendUnavailableError) as caught:
        await cache.get(query("q"))
    assert caught.value.__cause__ is not None
    with pytest.raises(BackendUnavailableError):
        await chat.append("c", "user", "hi")
    with pytest.raises(BackendUnavailableError):
        await limiter.check_and_consume("u")
    with pytest.raises(BackendUnavailableError):
        await cache.clear()
    for obj in (cache, chat, limiter):
        await obj.aclose()
    await client.aclose()


async def test_twenty_fresh_clients_running_scripts_at_once_never_fail(
    redis_cluster: LocalCluster, target: RedisTarget
) -> None:
    """redis-py 8's trap: a fresh RedisCluster's first concurrent commands could fail
    inside the driver; each backend initializes its client once, under a lock."""
    clients = [fresh_client(redis_cluster) for _ in range(20)]
    limiters = [
        RedisRateLimiter(
            client=cast(Redis, client),
            config=RateLimitConfig(1000),
            key_prefix=target.prefix,
            failure_mode="raise",
            # 20 topologies fetched at once on a shared CI machine: not a latency test
            operation_timeout=10,
        )
        for client in clients
    ]
    results = await asyncio.gather(
        *(limiter.check_and_consume(f"u{i}") for limiter in limiters for i in range(20))
    )
    assert results == [True] * 400
    for limiter in limiters:
        assert (await limiter.stats()).backend_errors == 0
        await limiter.aclose()
    for client in clients:
        await client.aclose()


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (redis_errors.MovedError("3999 127.0.0.1:6381"), True),
        (redis_errors.AskError("3999 127.0.0.1:6381"), True),
        (redis_errors.TryAgainError("TRYAGAIN"), True),
        (redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"), True),
        (redis_errors.SlotNotCoveredError("slot 7 not covered"), True),
        (redis_errors.RedisClusterException("Redis Cluster cannot be connected."), True),
        (redis_errors.RedisClusterException("CROSSSLOT keys"), False),
        (redis_errors.ResponseError("ERR something"), False),
    ],
)
def test_cluster_errors_map_into_the_library_errors(
    error: BaseException, unavailable: bool
) -> None:
    assert isinstance(error, DRIVER_ERRORS)
    mapped = backend_error(error, "get")
    assert isinstance(mapped, BackendError)
    assert isinstance(mapped, BackendUnavailableError) is unavailable


async def test_node_of_names_the_primary_serving_a_key(target: RedisTarget) -> None:
    cache = RedisExactCache(client=target.client, key_prefix=target.prefix)
    cluster = cast(RedisCluster, target.client)
    primaries = {node.name for node in cluster.get_primaries()}
    names = {cache.node_of(cache.key(query(f"q{i}"))) for i in range(30)}
    assert names == primaries
    single = RedisExactCache(url="redis://127.0.0.1:1/0")
    assert single.node_of("anything") is None
    await cache.aclose()
    await single.aclose()
