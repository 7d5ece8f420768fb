"""Fleet coalescing when the leader's answer cannot be read back from the cache.

Gateways on one Redis stand for processes (the multi-process version is in
tests/integration/test_fleet_unstorable_processes.py). The leader tells its waiters
the outcome: the answer itself when it is small, else "compute it yourselves", which
they then do at once and concurrently, never one after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiocache_llm import InferenceGateway, RedisExactCache
from tests.conftest import REDIS_BACKENDS, RedisTarget, open_redis_target

QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}
LATENCY = 0.4


@pytest.fixture(params=REDIS_BACKENDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param) as target:
        yield target


class OverlapProvider:
    """Answers ``answer`` after LATENCY seconds; records how many calls ran at once."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0
        self.running = 0
        self.peak = 0

    async def __call__(self, query: Any) -> Any:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(LATENCY)
        finally:
            self.running -= 1
        return self.answer


async def resolve_in(
    target: RedisTarget, provider: OverlapProvider, processes: int, **cache_options: Any
) -> list[Any]:
    gateways = [
        InferenceGateway(
            provider,
            exact_cache=RedisExactCache(
                client=target.client, key_prefix=target.prefix, **cache_options
            ),
        )
        for _ in range(processes)
    ]
    try:
        return await asyncio.gather(*(gateway.resolve(QUERY) for gateway in gateways))
    finally:
        for gateway in gateways:
            await gateway.aclose()


@pytest.mark.parametrize(
    "cache_options",
    [{"max_value_bytes": 16}, {"ttl_seconds": 0.001}],
    ids=["too-large-for-the-cache", "tiny-ttl"],
)
async def test_a_small_answer_that_is_not_stored_reaches_the_waiters_itself(
    target: RedisTarget, cache_options: dict[str, Any]
) -> None:
    provider = OverlapProvider({"answer": "Paris", "sources": ["an atlas"]})
    answers = await resolve_in(target, provider, 4, **cache_options)
    assert answers == [{"answer": "Paris", "sources": ["an atlas"]}] * 4
    assert provider.calls == 1


@pytest.mark.parametrize(
    "answer",
    [None, "x" * 100_000, {"tuple": (1, 2)}],
    ids=["none", "larger-than-a-notification", "not-cacheable"],
)
async def test_waiters_compute_at_once_and_together_when_the_answer_cannot_be_shared(
    target: RedisTarget, answer: Any
) -> None:
    provider = OverlapProvider(answer)
    answers = await resolve_in(target, provider, 4, max_value_bytes=1000)
    assert answers == [answer] * 4
    # the leader, then its three waiters side by side (not one after another)
    assert provider.calls == 4
    assert provider.peak == 3


class ForgetfulCache(RedisExactCache):
    """Stores, then loses the entry at once (as an eviction by another process would)."""

    async def put_by_signature(
        self, digest: str, value: Any, *, ttl_seconds: float | None = None
    ) -> None:
        await super().put_by_signature(digest, value, ttl_seconds=ttl_seconds)
        await self.invalidate_by_signature(digest)


async def test_waiters_that_find_nothing_after_stored_compute_at_once_and_together(
    target: RedisTarget,
) -> None:
    """The leader stored a large answer, but it is gone when the waiters read it."""
    provider = OverlapProvider("x" * 100_000)
    gateways = [
        InferenceGateway(
            provider, exact_cache=ForgetfulCache(client=target.client, key_prefix=target.prefix)
        )
        for _ in range(3)
    ]
    answers = await asyncio.gather(*(gateway.resolve(QUERY) for gateway in gateways))
    for gateway in gateways:
        await gateway.aclose()
    assert answers == ["x" * 100_000] * 3
    assert (provider.calls, provider.peak) == (3, 2)
