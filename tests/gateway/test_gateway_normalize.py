"""InferenceGateway(normalize=...): applied to the gateway's own cache, refused when unusable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from aiocache_llm import (
    InferenceGateway,
    InvalidInputError,
    MemoryExactCache,
    RedisExactCache,
    cached_completion,
    default_normalize,
)
from tests.conftest import Backend
from tests.gateway.fakes import CountingProvider, FlakyCache

QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}


def drop_temperature(request: dict[str, Any]) -> Mapping[str, Any]:
    return {k: v for k, v in default_normalize(request).items() if k != "temperature"}


async def test_normalize_keys_the_gateways_own_cache() -> None:
    provider = CountingProvider()
    async with InferenceGateway(provider, normalize=drop_temperature) as gateway:
        for temperature in (0.0, 0.5, 1.0):
            await gateway.resolve({**QUERY, "temperature": temperature})
        assert gateway.stats().exact_hits == 2
        cache = gateway.exact_cache
        assert await cache.get({**QUERY, "temperature": 2.0}) == "answer:capital of France?"
    assert provider.calls == 1


async def test_normalize_reaches_the_cache_of_cached_completion() -> None:
    calls = 0

    def ignore_verbose(request: dict[str, Any]) -> Mapping[str, Any]:
        arguments = {k: v for k, v in request["arguments"].items() if k != "verbose"}
        return {**request, "arguments": arguments}

    @cached_completion(normalize=ignore_verbose)
    async def ask(prompt: str, verbose: bool = False) -> str:
        nonlocal calls
        calls += 1
        return prompt.upper()

    assert await ask("hi") == await ask("hi", verbose=True) == "HI"
    assert calls == 1
    assert await ask.invalidate("hi", verbose=True) is True


async def test_normalize_is_refused_with_a_cache_that_keys_queries_itself(
    backend: Backend,
) -> None:
    cache: Any
    if backend.redis is None:
        cache = MemoryExactCache()
    else:
        cache = RedisExactCache(client=backend.redis.client, key_prefix=backend.redis.prefix)
    with pytest.raises(InvalidInputError, match=r"normalize=.*exact cache"):
        InferenceGateway(CountingProvider(), exact_cache=cache, normalize=drop_temperature)
    await cache.aclose()


async def test_normalize_still_coalesces_for_a_cache_keyed_by_query() -> None:
    """A foreign cache keys queries its own way; normalize= then only groups flights."""
    provider = CountingProvider()
    async with InferenceGateway(
        provider, exact_cache=FlakyCache(), normalize=drop_temperature
    ) as gateway:
        assert gateway._signature({**QUERY, "temperature": 1}) == gateway._signature(QUERY)
