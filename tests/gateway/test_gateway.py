"""InferenceGateway on in-process backends: order, coalescing, errors, cache control, stats."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from aiocache_llm import (
    AsyncExactCache,
    BreakerState,
    InferenceGateway,
    InvalidInputError,
    InvalidInputTypeError,
    LLMResponse,
    MemoryExactCache,
    ProviderTimeoutError,
)
from tests.gateway.fakes import CountingProvider, FlakyCache, HangingCache

QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}


def query(i: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}]}


async def test_miss_calls_the_provider_then_hits() -> None:
    provider = CountingProvider()
    async with InferenceGateway(provider) as gateway:
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
        stats = gateway.stats()
    assert provider.calls == 1
    assert (stats.requests, stats.exact_hits, stats.misses, stats.provider_calls) == (2, 1, 1, 1)
    assert stats.hit_rate == 0.5


async def test_a_thousand_concurrent_identical_resolves_make_one_provider_call() -> None:
    provider = CountingProvider(latency=0.05)
    async with InferenceGateway(provider) as gateway:
        answers = await asyncio.gather(*(gateway.resolve(QUERY) for _ in range(1000)))
        stats = gateway.stats()
    assert provider.calls == 1
    assert set(answers) == {"answer:capital of France?"}
    assert (stats.provider_calls, stats.coalesced, stats.misses) == (1, 999, 1)


async def test_a_hundred_resolves_over_ten_queries_make_ten_provider_calls() -> None:
    provider = CountingProvider(latency=0.02)
    async with InferenceGateway(provider) as gateway:
        answers = await asyncio.gather(*(gateway.resolve(query(i % 10)) for i in range(100)))
    assert provider.calls == 10
    assert answers == [f"answer:question {i % 10}" for i in range(100)]


async def test_provider_object_with_complete_method() -> None:
    class Client:
        async def complete(self, query: Any) -> LLMResponse:
            return LLMResponse(content="Paris", model="m")

    async with InferenceGateway(Client()) as gateway:
        first = await gateway.resolve(QUERY)
        second = await gateway.resolve(QUERY)
    assert first == second == LLMResponse(content="Paris", model="m")
    assert isinstance(second, LLMResponse)


async def test_provider_errors_reach_every_coalesced_caller_and_are_never_cached() -> None:
    provider = CountingProvider(latency=0.02, fail_with=RuntimeError("provider down"))
    async with InferenceGateway(provider) as gateway:
        outcomes = await asyncio.gather(
            *(gateway.resolve(QUERY) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert provider.calls == 1
        provider.fail_with = None
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
        stats = gateway.stats()
    assert provider.calls == 2
    assert stats.provider_errors == 1


async def test_provider_timeout_raises_provider_timeout_error() -> None:
    provider = CountingProvider(latency=5)
    async with InferenceGateway(provider, provider_timeout=0.05) as gateway:
        started = time.perf_counter()
        with pytest.raises(ProviderTimeoutError, match=r"0\.05"):
            await gateway.resolve(QUERY)
        assert time.perf_counter() - started < 1
        assert gateway.stats().provider_errors == 1
        assert (await gateway.exact_cache.stats()).size == 0


async def test_a_sync_provider_is_refused_with_a_clear_error() -> None:
    def sync_provider(query: Any) -> str:
        return "blocking"

    async with InferenceGateway(sync_provider) as gateway:
        with pytest.raises(InvalidInputTypeError, match="must be async"):
            await gateway.resolve(QUERY)


async def test_cancelled_caller_does_not_cancel_the_call_for_others() -> None:
    provider = CountingProvider()
    provider.gate = asyncio.Event()
    async with InferenceGateway(provider) as gateway:
        first = asyncio.ensure_future(gateway.resolve(QUERY))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(gateway.resolve(QUERY))
        await asyncio.sleep(0.01)
        first.cancel()
        provider.gate.set()
        assert await second == "answer:capital of France?"
        assert first.cancelled()
        # the call finished and was stored even though its first caller left
        assert await gateway.exact_cache.get(QUERY) == "answer:capital of France?"
    assert provider.calls == 1


async def test_no_cache_skips_the_read_but_stores_the_fresh_answer() -> None:
    provider = CountingProvider()
    cache = MemoryExactCache()
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        await cache.put(QUERY, "stale")
        assert await gateway.resolve(QUERY, no_cache=True) == "answer:capital of France?"
        assert await cache.get(QUERY) == "answer:capital of France?"
    assert provider.calls == 1


async def test_no_store_keeps_the_answer_out_of_the_cache() -> None:
    provider = CountingProvider()
    async with InferenceGateway(provider) as gateway:
        await gateway.resolve(QUERY, no_store=True)
        assert await gateway.exact_cache.get(QUERY) is None
        await gateway.resolve(QUERY, no_store=True)
    assert provider.calls == 2


async def test_per_request_ttl_overrides_the_default() -> None:
    now = [100.0]
    cache = MemoryExactCache(clock=lambda: now[0])
    provider = CountingProvider()
    async with InferenceGateway(provider, exact_cache=cache, ttl_seconds=3600) as gateway:
        await gateway.resolve(QUERY, ttl_seconds=10)
        await gateway.resolve(query(1))
        now[0] += 11
        await gateway.resolve(QUERY)
        await gateway.resolve(query(1))
    assert provider.calls == 3  # QUERY expired after 10 s, query(1) lives an hour


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ttl_seconds": 0}, InvalidInputError),
        ({"user_id": ""}, InvalidInputError),
        ({"user_id": 7}, InvalidInputTypeError),
    ],
)
async def test_bad_per_request_arguments_raise_before_any_call(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    provider = CountingProvider()
    async with InferenceGateway(provider) as gateway:
        with pytest.raises(error):
            await gateway.resolve(QUERY, **kwargs)
    assert provider.calls == 0


@pytest.mark.parametrize("bad_query", ["", {}, 3, {"messages": [], "t": float("nan")}])
async def test_bad_query_raises_before_any_call(bad_query: Any) -> None:
    provider = CountingProvider()
    async with InferenceGateway(provider) as gateway:
        with pytest.raises((InvalidInputError, InvalidInputTypeError)):
            await gateway.resolve(bad_query)
    assert provider.calls == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"provider_timeout": 0},
        {"backend_timeout": -1},
        {"breaker_threshold": 0},
        {"rate_limit_timeout": -1},
        {"on_limiter_error": "maybe"},
        {"exact_cache": object()},
        {"estimate_tokens": 5},
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises((InvalidInputError, InvalidInputTypeError)):
        InferenceGateway(CountingProvider(), **kwargs)


def test_provider_must_be_callable() -> None:
    with pytest.raises(InvalidInputTypeError, match="provider"):
        InferenceGateway("not a provider")


async def test_an_answer_the_cache_refuses_is_still_served() -> None:
    provider = CountingProvider()
    cache = MemoryExactCache(max_value_bytes=10)
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
    assert (await cache.stats()).size == 0


async def test_a_failing_cache_never_fails_a_resolve_and_the_breaker_opens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = FlakyCache()
    cache.down = True
    provider = CountingProvider()
    gateway = InferenceGateway(
        provider, exact_cache=cache, breaker_threshold=3, breaker_reset_after=60
    )
    with caplog.at_level(logging.INFO, logger="aiocache_llm"):
        answers = [await gateway.resolve(query(i)) for i in range(10)]
    assert answers == [f"answer:question {i}" for i in range(10)]
    stats = gateway.stats()
    # 3 failed reads open the breaker; afterwards no call reaches the dead backend
    assert cache.calls == 3
    assert stats.backend_errors == 3
    assert stats.backend_skipped == 17  # 7 reads + 10 writes skipped
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one log line per state change, not per request"
    assert "capital" not in caplog.text
    assert "question" not in caplog.text


async def test_the_breaker_probes_and_closes_when_the_backend_recovers() -> None:
    now = [0.0]
    cache = FlakyCache()
    cache.down = True
    provider = CountingProvider()
    gateway = InferenceGateway(provider, exact_cache=cache, breaker_threshold=1)
    guard = gateway._exact_guard
    assert guard is not None
    guard._clock = lambda: now[0]
    await gateway.resolve(QUERY)
    assert guard.state is BreakerState.OPEN
    cache.down = False
    await gateway.resolve(QUERY)  # skipped: still within reset_after
    assert (await cache.inner.stats()).size == 0
    now[0] += 5.0
    assert guard.state is BreakerState.HALF_OPEN
    await gateway.resolve(QUERY)  # the probe succeeds: caching resumes
    assert guard.state is BreakerState.CLOSED
    assert await gateway.resolve(QUERY) == "answer:capital of France?"
    assert provider.calls == 3
    assert gateway.stats().exact_hits == 1


async def test_a_hanging_cache_is_bounded_by_the_backend_timeout() -> None:
    cache = HangingCache()
    cache.down = True
    provider = CountingProvider()
    async with InferenceGateway(provider, exact_cache=cache, backend_timeout=0.05) as gateway:
        started = time.perf_counter()
        assert await gateway.resolve(QUERY) == "answer:capital of France?"
        assert time.perf_counter() - started < 0.5
        assert gateway.stats().backend_errors == 1


async def test_warm_preloads_and_reports_failures_without_stopping() -> None:
    async def provider(q: Any) -> str:
        text = q["messages"][-1]["content"]
        if text.endswith(("3", "7")):
            raise RuntimeError(f"cannot answer {text}")
        return f"answer:{text}"

    async with InferenceGateway(provider) as gateway:
        report = await gateway.warm((query(i) for i in range(10)), concurrency=3)
        assert report.ok == 8
        assert report.computed == 10
        assert sorted(f.query["messages"][0]["content"] for f in report.failed) == [
            "question 3",
            "question 7",
        ]
        assert all(isinstance(f.error, RuntimeError) for f in report.failed)
        again = await gateway.warm([query(0), query(1)])
        assert (again.ok, again.computed) == (2, 0)
        with pytest.raises(InvalidInputError):
            await gateway.warm([], concurrency=0)


async def test_latency_percentiles_are_reported() -> None:
    provider = CountingProvider(latency=0.02)
    async with InferenceGateway(provider) as gateway:
        await gateway.resolve(QUERY)
        for _ in range(9):
            await gateway.resolve(QUERY)
        stats = gateway.stats()
    assert stats.latency_p99_ms >= 20
    assert stats.latency_p50_ms < 5


async def test_custom_exact_cache_is_keyed_by_query() -> None:
    cache = FlakyCache()
    assert isinstance(cache, AsyncExactCache)
    provider = CountingProvider()
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        await gateway.resolve(QUERY)
        await gateway.resolve(QUERY)
    assert provider.calls == 1


async def test_closing_the_gateway_closes_only_its_own_cache() -> None:
    mine = MemoryExactCache()
    async with InferenceGateway(CountingProvider(), exact_cache=mine) as gateway:
        await gateway.resolve(QUERY)
    assert await mine.get(QUERY) == "answer:capital of France?"  # still open
    own = InferenceGateway(CountingProvider())
    await own.aclose()
    from aiocache_llm import ClosedResourceError

    with pytest.raises(ClosedResourceError):
        await own.resolve(QUERY)


async def test_repr_shows_configuration_and_counters() -> None:
    async with InferenceGateway(CountingProvider()) as gateway:
        await gateway.resolve(QUERY)
        text = repr(gateway)
    assert "MemoryExactCache" in text
    assert "provider_calls=1" in text
