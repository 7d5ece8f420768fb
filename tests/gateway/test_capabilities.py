"""The gateway talks to capabilities, never classes: a wrapper keeps what it forwards.

A plain delegating wrapper (no inheritance) around a built-in backend stands for a
user's tracing layer or custom backend. Forwarding a capability's members
(:mod:`aiocache_llm.protocols`) keeps what the built-in class gets: one key per
request, the inline fast path, fleet coalescing, the limiter's budget and outage
policy. A wrapper of the base protocol only still works, without those extras.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aiocache_llm import (
    AsyncFailurePolicyRateLimiter,
    AsyncFleetExactCache,
    AsyncSignatureKeyedCache,
    CacheStats,
    InferenceGateway,
    InvalidInputError,
    LLMResponse,
    MemoryExactCache,
    Query,
    RateLimitConfig,
    RateLimiterStats,
    RateLimitExceeded,
    RedisExactCache,
    RedisRateLimiter,
    Reservation,
    SupportsInlineCompletion,
    Usage,
)
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.core.query import default_normalize
from tests.conftest import RedisTarget

QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}


class CountingNormalizer:
    """The default ``normalize`` hook, counting its calls: one per key computed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request: dict[str, Any]) -> Mapping[str, Any]:
        self.calls += 1
        return default_normalize(request)


class BaseOnlyCache:
    """A tracing wrapper that forwards the base ``AsyncExactCache`` protocol only."""

    def __init__(self, inner: Any, on_read: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.reads = 0
        self._on_read = on_read

    def _read(self, name: str) -> None:
        self.calls[name] += 1
        self.reads += 1
        if self._on_read is not None:
            self._on_read(self.reads)

    async def get(self, query: Query) -> Any | None:
        self._read("get")
        return await self.inner.get(query)

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        self.calls["put"] += 1
        await self.inner.put(query, value, ttl_seconds=ttl_seconds)

    async def invalidate(self, query: Query) -> bool:
        self.calls["invalidate"] += 1
        return bool(await self.inner.invalidate(query))

    async def clear(self) -> None:
        await self.inner.clear()

    async def stats(self) -> CacheStats:
        stats: CacheStats = await self.inner.stats()
        return stats

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> BaseOnlyCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ForwardingCache(BaseOnlyCache):
    """The same tracing wrapper, also forwarding every capability of a Redis exact cache."""

    def signature(self, query: Query) -> str:
        self.calls["signature"] += 1
        digest: str = self.inner.signature(query)
        return digest

    async def get_by_signature(self, digest: str) -> Any | None:
        self._read("get_by_signature")
        return await self.inner.get_by_signature(digest)

    async def put_by_signature(
        self, digest: str, value: Any, *, ttl_seconds: float | None = None
    ) -> None:
        self.calls["put_by_signature"] += 1
        await self.inner.put_by_signature(digest, value, ttl_seconds=ttl_seconds)

    @property
    def codec(self) -> ValueCodec:
        codec: ValueCodec = self.inner.codec
        return codec

    @property
    def client(self) -> Redis | RedisCluster:
        client: Redis | RedisCluster = self.inner.client
        return client

    @property
    def key_prefix(self) -> str:
        prefix: str = self.inner.key_prefix
        return prefix


class InlineForwardingCache(BaseOnlyCache):
    """A wrapper of a memory exact cache that forwards its signature keys and inline flag."""

    def signature(self, query: Query) -> str:
        digest: str = self.inner.signature(query)
        return digest

    async def get_by_signature(self, digest: str) -> Any | None:
        self._read("get_by_signature")
        return await self.inner.get_by_signature(digest)

    async def put_by_signature(
        self, digest: str, value: Any, *, ttl_seconds: float | None = None
    ) -> None:
        self.calls["put_by_signature"] += 1
        await self.inner.put_by_signature(digest, value, ttl_seconds=ttl_seconds)

    @property
    def completes_inline(self) -> bool:
        return bool(self.inner.completes_inline)


class GatedProvider:
    """Answers once ``release`` is set; a second call releases every call at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, query: Any) -> str:
        self.calls += 1
        self.started.set()
        if self.calls > 1:
            self.release.set()  # not coalesced: nobody else will release it
        await self.release.wait()
        return f"answer:{query['messages'][-1]['content']}"


def test_the_wrappers_have_exactly_the_capabilities_they_forward() -> None:
    memory = MemoryExactCache()
    forwarding, base_only = ForwardingCache(memory), BaseOnlyCache(memory)
    assert isinstance(forwarding, AsyncSignatureKeyedCache)
    assert not isinstance(base_only, AsyncSignatureKeyedCache)
    assert not isinstance(base_only, AsyncFleetExactCache)
    assert isinstance(InlineForwardingCache(memory), SupportsInlineCompletion)
    assert not isinstance(forwarding, SupportsInlineCompletion)


async def test_a_forwarding_wrapper_keys_each_request_once(real_redis: RedisTarget) -> None:
    normalize = CountingNormalizer()
    inner = RedisExactCache(
        client=real_redis.client, key_prefix=real_redis.prefix, normalize=normalize
    )
    cache = ForwardingCache(inner)
    calls = 0

    async def provider(query: Any) -> str:
        nonlocal calls
        calls += 1
        return "Paris"

    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        assert await gateway.resolve(QUERY) == "Paris"  # a miss: read, lease, store
        assert normalize.calls == 1
        assert await gateway.resolve(QUERY) == "Paris"  # a hit
        assert normalize.calls == 2
        assert gateway.stats().exact_hits == 1
    assert calls == 1
    # every read and write went by the digest, none re-keyed the query
    assert cache.calls["signature"] == 2
    assert cache.calls["get"] == cache.calls["put"] == 0
    assert cache.calls["put_by_signature"] == 1
    # stored under the cache's own key: the bare cache finds it
    assert await inner.get(QUERY) == "Paris"
    await inner.aclose()


async def test_a_signature_keyed_wrapper_refuses_a_gateway_normalize(
    real_redis: RedisTarget,
) -> None:
    """The cache's own hook keys its entries: a second hook in the gateway would split them."""
    inner = RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix)
    with pytest.raises(InvalidInputError, match="normalize"):
        InferenceGateway(lambda q: q, exact_cache=ForwardingCache(inner), normalize=dict)
    await inner.aclose()


async def test_forwarding_wrappers_coalesce_misses_across_gateways(
    real_redis: RedisTarget,
) -> None:
    """Two gateways with their own wrapped caches on one prefix stand for two processes."""
    provider = GatedProvider()

    def on_b_read(reads: int) -> None:
        # B's first read is its miss; its second, a fleet waiter's look at the cache,
        # comes once it holds no lease and waits for A's (without fleet coalescing:
        # just before it calls the provider itself)
        if reads == 2:
            provider.release.set()

    inners = [
        RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix) for _ in range(2)
    ]
    cache_a, cache_b = ForwardingCache(inners[0]), ForwardingCache(inners[1], on_read=on_b_read)
    gateway_a = InferenceGateway(provider, exact_cache=cache_a)
    gateway_b = InferenceGateway(provider, exact_cache=cache_b)
    try:
        first = asyncio.ensure_future(gateway_a.resolve(QUERY))
        await provider.started.wait()  # A leads: it holds the lease and calls the provider
        second = asyncio.ensure_future(gateway_b.resolve(QUERY))
        answers = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    finally:
        await gateway_a.aclose()
        await gateway_b.aclose()
    assert answers == ["answer:capital of France?"] * 2
    assert provider.calls == 1
    assert gateway_a.stats().provider_calls == 1
    assert gateway_b.stats().fleet_hits == 1
    keys = [k async for k in real_redis.client.scan_iter(match=f"{real_redis.prefix}:lease*")]
    assert keys == [], "the lease and its waiter marker are released"
    for inner in inners:
        await inner.aclose()


class GatedStreamProvider:
    """Streams ``w0`` then, once ``release`` is set, ``w1 w2``; a second stream releases all."""

    def __init__(self) -> None:
        self.streams = 0
        self.release = asyncio.Event()

    async def complete(self, query: Any) -> str:
        raise AssertionError("only streams are asked for")

    async def stream(self, query: Any) -> AsyncIterator[str]:
        self.streams += 1
        if self.streams > 1:
            self.release.set()  # not shared: nobody else will release it
        yield "w0 "
        await self.release.wait()
        for chunk in ("w1 ", "w2 "):
            yield chunk


async def test_forwarding_wrappers_share_one_stream_across_gateways(
    real_redis: RedisTarget,
) -> None:
    provider = GatedStreamProvider()

    def on_b_read(reads: int) -> None:
        # B's second read is a fleet follower's look for a stored recording, once the
        # lease is known to be A's (without fleet streams: just before it streams itself)
        if reads == 2:
            provider.release.set()

    inners = [
        RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix) for _ in range(2)
    ]
    leader = InferenceGateway(provider, exact_cache=ForwardingCache(inners[0]))
    follower = InferenceGateway(provider, exact_cache=ForwardingCache(inners[1], on_read=on_b_read))
    try:
        first = leader.stream(QUERY)
        head = await first.__anext__()  # A streams from the provider and holds the lease

        async def rest_of_first() -> list[Any]:
            return [chunk async for chunk in first]

        async def second() -> list[Any]:
            return [chunk async for chunk in follower.stream(QUERY)]

        rest, late = await asyncio.wait_for(asyncio.gather(rest_of_first(), second()), timeout=10)
    finally:
        await leader.aclose()
        await follower.aclose()
    assert [head, *rest] == late == ["w0 ", "w1 ", "w2 "]
    assert provider.streams == 1
    assert follower.stats().fleet_hits == 1
    for inner in inners:
        await inner.aclose()


async def test_a_forwarding_wrapper_of_the_memory_cache_keeps_the_fast_path() -> None:
    normalize = CountingNormalizer()
    inner = MemoryExactCache(normalize=normalize)
    cache = InlineForwardingCache(inner)

    async def provider(query: Any) -> str:
        return "Paris"

    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        # a cache that never suspends is called without a deadline or breaker
        assert gateway._exact_guard is None
        assert await gateway.resolve(QUERY) == "Paris"
        assert await gateway.resolve(QUERY) == "Paris"
        assert normalize.calls == 2  # one key per request
        assert gateway.stats().exact_hits == 1
    assert cache.calls["get"] == cache.calls["put"] == 0
    assert await inner.get(QUERY) == "Paris"


class ForwardingLimiter:
    """A tracing wrapper forwarding every capability of a built-in rate limiter."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    async def check_and_consume(self, user_id: str, tokens: int = 1) -> bool:
        self.calls["check_and_consume"] += 1
        return bool(await self.inner.check_and_consume(user_id, tokens))

    async def get_remaining(self, user_id: str) -> int:
        return int(await self.inner.get_remaining(user_id))

    async def acquire(self, user_id: str, tokens: int, *, timeout: float | None = None) -> None:
        await self.inner.acquire(user_id, tokens, timeout=timeout)

    async def reset(self, user_id: str) -> None:
        await self.inner.reset(user_id)

    async def stats(self) -> RateLimiterStats:
        stats: RateLimiterStats = await self.inner.stats()
        return stats

    async def reserve(
        self, user_id: str, tokens: int, *, timeout: float | None = None
    ) -> Reservation:
        self.calls["reserve"] += 1
        reservation: Reservation = await self.inner.reserve(user_id, tokens, timeout=timeout)
        return reservation

    async def release(self, reservation: Reservation, tokens: int | None = None) -> int:
        self.calls["release"] += 1
        return int(await self.inner.release(reservation, tokens))

    async def record_usage(self, user_id: str, tokens: int) -> None:
        self.calls["record_usage"] += 1
        await self.inner.record_usage(user_id, tokens)

    @property
    def config(self) -> RateLimitConfig:
        config: RateLimitConfig = self.inner.config
        return config

    @property
    def failure_mode(self) -> Any:
        return self.inner.failure_mode

    @property
    def operation_timeout(self) -> float | None:
        timeout: float | None = self.inner.operation_timeout
        return timeout

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> ForwardingLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _used(tokens: int) -> LLMResponse:
    return LLMResponse(
        content="ok", usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
    )


async def test_a_wrapped_redis_limiter_keeps_its_policy_budget_and_reservations(
    real_redis: RedisTarget,
) -> None:
    def limiter(failure_mode: Any) -> RedisRateLimiter:
        return RedisRateLimiter(
            client=real_redis.client,
            key_prefix=real_redis.prefix,
            config=RateLimitConfig(max_tokens_per_minute=1000),
            failure_mode=failure_mode,
            operation_timeout=0.3,
        )

    # its outage policy decides: a fail-open limiter can never deny
    fail_open = ForwardingLimiter(limiter("open"))
    assert isinstance(fail_open, AsyncFailurePolicyRateLimiter)
    with pytest.raises(InvalidInputError, match="failure_mode='open'"):
        InferenceGateway(lambda q: q, rate_limiter=fail_open, on_limiter_error="deny")
    # ...and the gateway's deadline leaves it room to apply that policy, as for the bare one
    bare, closed = limiter("closed"), ForwardingLimiter(limiter("closed"))
    deadlines = []
    for candidate in (bare, closed):
        gateway = InferenceGateway(
            lambda q: q, rate_limiter=candidate, backend_timeout=0.1, rate_limit_timeout=0
        )
        deadlines.append(gateway._limiter_guard._timeout)
        await gateway.aclose()
    assert deadlines == [pytest.approx(0.4)] * 2

    answers = iter([_used(100), _used(700)])

    async def provider(query: Any) -> LLMResponse:
        return next(answers)

    async with InferenceGateway(
        provider, rate_limiter=closed, estimate_tokens=lambda q: 300
    ) as gateway:
        await gateway.resolve({**QUERY, "seed": 1}, user_id="u")  # reserved 300, used 100
        await gateway.resolve({**QUERY, "seed": 2}, user_id="u")  # reserved 300, used 700
        assert await closed.get_remaining("u") == 1000 - 100 - 700
        with pytest.raises(RateLimitExceeded) as refused:
            await gateway.resolve({**QUERY, "seed": 3}, user_id="u")
        assert refused.value.user_id == "u"
    assert closed.calls["release"] == 1  # the unused 200 of the first call went back
    assert closed.calls["record_usage"] == 1  # the 400 beyond the second's reservation
    for one in (fail_open, bare, closed):
        await one.aclose()


async def test_a_wrapper_of_the_base_protocol_only_still_works(real_redis: RedisTarget) -> None:
    """No extras: the query is re-keyed by the cache, no fleet lease, still coalesced here."""
    inner = RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix)
    cache = BaseOnlyCache(inner)
    provider = GatedProvider()
    # a cache that keys by the query only: the gateway's hook keys just the coalescing
    gateway = InferenceGateway(provider, exact_cache=cache, normalize=default_normalize)
    try:
        assert gateway._fleet is None
        calls = [asyncio.ensure_future(gateway.resolve(QUERY)) for _ in range(5)]
        await provider.started.wait()
        provider.release.set()
        assert await asyncio.gather(*calls) == ["answer:capital of France?"] * 5
        assert provider.calls == 1
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
        assert gateway.stats().exact_hits == 1
    finally:
        await gateway.aclose()
    assert cache.calls["put"] == 1
    assert await inner.get(QUERY) == "answer:capital of France?"
    await inner.aclose()
