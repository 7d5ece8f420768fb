"""Streaming through the gateway, in one process: keys, live fan-out, errors, storage, budget."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiocache_llm import (
    ChunkStream,
    HashingEmbedder,
    InferenceGateway,
    InvalidInputError,
    InvalidInputTypeError,
    LLMResponse,
    MemoryExactCache,
    MemoryRateLimiter,
    MemorySemanticCache,
    ProviderTimeoutError,
    RateLimitConfig,
    RateLimitExceeded,
    RecordedStream,
    StreamInterruptedError,
)
from tests.gateway.streams import QUERY, StreamingProvider, collect

TEXT = [f"w{i} " for i in range(10)]


async def settled(gateway: InferenceGateway) -> None:
    """Wait (bounded) until no stream is in flight: its producer has stored or dropped it."""
    for _ in range(200):
        if gateway.stats().in_flight == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("a stream is still in flight")


async def test_fifty_concurrent_streams_with_late_joiners_share_one_provider_stream() -> None:
    provider = StreamingProvider(delay=0.03)
    async with InferenceGateway(provider) as gateway:

        async def consumer(index: int) -> list[Any]:
            await asyncio.sleep(index * 0.001)  # joiners arrive while chunks flow
            return await collect(gateway.stream(QUERY))

        results = await asyncio.gather(*(consumer(i) for i in range(50)))
        stats = gateway.stats()
    assert provider.streams == 1
    assert all(result == TEXT for result in results)
    assert stats.streams_shared == 49
    assert (stats.stream_requests, stats.provider_calls, stats.misses) == (50, 1, 1)


async def test_a_late_joiner_gets_the_chunks_so_far_then_the_live_ones() -> None:
    provider = StreamingProvider(delay=0.02)
    async with InferenceGateway(provider) as gateway:
        first = gateway.stream(QUERY)
        early = [await first.__anext__() for _ in range(4)]
        late = gateway.stream(QUERY)
        rest_late, rest_first = await asyncio.gather(collect(late), collect(first))
    assert provider.streams == 1
    assert early + rest_first == TEXT
    assert rest_late == TEXT


async def test_a_finished_stream_is_stored_and_replayed_in_order() -> None:
    chunks = [{"delta": i} for i in range(5)]
    provider = StreamingProvider(chunks)
    async with InferenceGateway(provider) as gateway:
        assert await collect(gateway.stream(QUERY)) == chunks
        replay = await collect(gateway.stream(QUERY))
        replay[0]["delta"] = "mutated"
        again = await collect(gateway.stream(QUERY))
        stats = gateway.stats()
    assert provider.streams == 1
    assert again == chunks
    assert (stats.stream_hits, stats.chunks_replayed, stats.exact_hits) == (2, 10, 2)


async def test_replayed_models_keep_their_type() -> None:
    chunks = [LLMResponse(content="a"), LLMResponse(content="b", finish_reason="stop")]
    async with InferenceGateway(StreamingProvider(chunks)) as gateway:
        await collect(gateway.stream(QUERY))
        replay = await collect(gateway.stream(QUERY))
    assert replay == chunks
    assert all(type(chunk) is LLMResponse for chunk in replay)
    assert replay[0] is not chunks[0]


async def test_live_consumers_get_their_own_copies_of_mutable_chunks() -> None:
    chunks = [{"n": i} for i in range(3)]
    provider = StreamingProvider(chunks, delay=0.01)
    async with InferenceGateway(provider) as gateway:

        async def mutating() -> list[Any]:
            seen = []
            async for chunk in gateway.stream(QUERY):
                seen.append(dict(chunk))
                chunk["n"] = "mutated"
            return seen

        seen, other = await asyncio.gather(mutating(), collect(gateway.stream(QUERY)))
        stored = await collect(gateway.stream(QUERY))
    assert seen == chunks
    assert other == chunks
    assert stored == chunks


async def test_plain_answer_is_never_given_to_a_stream_nor_the_reverse() -> None:
    provider = StreamingProvider(["s1", "s2"])
    async with InferenceGateway(provider) as gateway:
        assert await gateway.resolve(QUERY) == "plain:tell me"  # cached plain first
        stream = await gateway.resolve({**QUERY, "stream": True})
        assert isinstance(stream, ChunkStream)
        assert await collect(stream) == ["s1", "s2"]
        assert await gateway.resolve(QUERY) == "plain:tell me"
        assert await collect(gateway.stream(QUERY)) == ["s1", "s2"]
    assert (provider.plain_calls, provider.streams) == (1, 1)


async def test_plain_and_streamed_requests_in_flight_together_are_coalesced_apart() -> None:
    provider = StreamingProvider(["s1", "s2"], delay=0.02)

    async def slow_plain(query: Any) -> str:
        provider.plain_calls += 1
        await asyncio.sleep(0.05)
        return "plain"

    provider.complete = slow_plain  # type: ignore[method-assign]
    async with InferenceGateway(provider) as gateway:
        plain = [gateway.resolve(QUERY) for _ in range(5)]
        streamed = [collect(await gateway.resolve({**QUERY, "stream": True})) for _ in range(5)]
        results = await asyncio.gather(*plain, *streamed)
    assert results[:5] == ["plain"] * 5
    assert results[5:] == [["s1", "s2"]] * 5
    assert (provider.plain_calls, provider.streams) == (1, 1)


async def test_a_cache_entry_of_the_other_kind_is_a_miss() -> None:
    cache = MemoryExactCache()
    provider = StreamingProvider(["s"])
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        # a recording under the plain key (someone's normalize= merged the keys)
        await cache.put(QUERY, RecordedStream(["x"]))
        assert await gateway.resolve(QUERY) == "plain:tell me"
    assert provider.plain_calls == 1


async def test_a_failure_after_k_chunks_reaches_every_consumer_after_them() -> None:
    provider = StreamingProvider(delay=0.03, fail_after=4)
    async with InferenceGateway(provider) as gateway:

        async def consumer(index: int) -> tuple[list[Any], BaseException | None]:
            await asyncio.sleep(index * 0.005)
            seen: list[Any] = []
            try:
                async for chunk in gateway.stream(QUERY):
                    seen.append(chunk)
            except RuntimeError as exc:
                return seen, exc
            return seen, None

        results = await asyncio.gather(*(consumer(i) for i in range(10)))
        stats = gateway.stats()
        provider.fail_after = None
        assert await collect(gateway.stream(QUERY)) == TEXT  # nothing was stored
    assert all(seen == TEXT[:4] and str(error) == "boom" for seen, error in results)
    assert provider.streams == 2
    assert stats.provider_errors == 1


async def test_consumers_that_break_or_are_cancelled_leave_the_others_whole() -> None:
    provider = StreamingProvider(delay=0.01)
    async with InferenceGateway(provider) as gateway:

        async def breaker() -> None:
            async with gateway.stream(QUERY) as stream:
                async for _ in stream:
                    break

        async def stalled() -> None:
            async for _ in gateway.stream(QUERY):
                await asyncio.sleep(3600)

        stuck = asyncio.ensure_future(stalled())
        waiting = [asyncio.ensure_future(collect(gateway.stream(QUERY))) for _ in range(5)]
        await asyncio.sleep(0.03)
        for task in waiting[:2]:
            task.cancel()
        whole = await asyncio.gather(breaker(), *(collect(gateway.stream(QUERY)) for _ in range(5)))
        stuck.cancel()
        await asyncio.gather(stuck, *waiting[:2], return_exceptions=True)
        rest = await asyncio.gather(*waiting[2:])
    assert provider.streams == 1
    assert all(result == TEXT for result in whole[1:])
    assert all(result == TEXT for result in rest)


async def test_a_stream_every_consumer_left_is_closed_and_not_stored() -> None:
    provider = StreamingProvider(delay=0.02)
    async with InferenceGateway(provider) as gateway:
        stream = gateway.stream(QUERY)
        assert await stream.__anext__() == "w0 "
        await stream.aclose()
        for _ in range(50):
            if provider.closed_early:
                break
            await asyncio.sleep(0.01)
        stats = gateway.stats()
        assert await collect(gateway.stream(QUERY)) == TEXT
    assert provider.closed_early == 1
    assert stats.streams_abandoned == 1
    assert provider.streams == 2


async def test_a_dropped_consumer_counts_as_gone() -> None:
    provider = StreamingProvider(delay=0.02)
    async with InferenceGateway(provider) as gateway:

        async def read_one() -> None:
            stream = gateway.stream(QUERY)
            await stream.__anext__()  # then drop it without closing

        await read_one()
        gc.collect()
        for _ in range(50):
            if provider.closed_early:
                break
            await asyncio.sleep(0.01)
    assert provider.closed_early == 1


async def test_finish_abandoned_streams_reads_to_the_end_and_stores() -> None:
    provider = StreamingProvider(delay=0.01)
    async with InferenceGateway(provider, finish_abandoned_streams=True) as gateway:
        stream = gateway.stream(QUERY)
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if provider.finished:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert await collect(gateway.stream(QUERY)) == TEXT
    assert (provider.streams, provider.closed_early) == (1, 0)


async def test_an_oversized_stream_passes_through_unstored_and_takes_no_new_joiners() -> None:
    chunks = ["x" * 100 for _ in range(20)]
    provider = StreamingProvider(chunks, delay=0.01)
    async with InferenceGateway(provider, max_stream_bytes=1000) as gateway:
        first = asyncio.ensure_future(collect(gateway.stream(QUERY)))
        await asyncio.sleep(0.15)  # past the bound by now
        late = await collect(gateway.stream(QUERY))
        assert await first == chunks
        assert late == chunks
        assert await collect(gateway.stream(QUERY)) == chunks
    assert provider.streams == 3


async def test_a_consumer_far_behind_an_oversized_stream_is_told() -> None:
    chunks = ["x" * 100 for _ in range(30)]
    provider = StreamingProvider(chunks, delay=0.005)
    async with InferenceGateway(provider, max_stream_bytes=1000) as gateway:
        slow = gateway.stream(QUERY)
        assert await slow.__anext__() == chunks[0]
        fast = await collect(gateway.stream(QUERY))
        with pytest.raises(StreamInterruptedError, match="fell more than 1000 bytes behind"):
            await collect(slow)
    assert fast == chunks


async def test_provider_timeout_bounds_the_first_chunk() -> None:
    provider = StreamingProvider(first_delay=1.0)
    async with InferenceGateway(provider, provider_timeout=0.05) as gateway:
        with pytest.raises(ProviderTimeoutError, match=r"no first chunk within 0\.05 s"):
            await gateway.resolve({**QUERY, "stream": True})
    assert provider.closed_early == 1


async def test_idle_timeout_bounds_the_gap_between_chunks() -> None:
    provider = StreamingProvider(delay=1.0)
    async with InferenceGateway(provider, stream_idle_timeout=0.05) as gateway:
        stream = gateway.stream(QUERY)
        assert await stream.__anext__() == "w0 "
        with pytest.raises(ProviderTimeoutError, match="stream_idle_timeout"):
            await stream.__anext__()


async def test_rate_limit_reconciles_with_the_usage_the_stream_reports() -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=10_000))
    provider = StreamingProvider(usage=1234)
    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        await collect(gateway.stream(QUERY, user_id="alice"))
        assert await limiter.get_remaining("alice") == 10_000 - 1234
        await collect(gateway.stream(QUERY, user_id="alice"))  # a replay costs nothing
        assert await limiter.get_remaining("alice") == 10_000 - 1234


async def test_rate_limit_estimates_a_stream_that_reports_no_usage() -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=10_000))
    provider = StreamingProvider(["a" * 400])
    query = {**QUERY, "max_tokens": 1000}
    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        await collect(gateway.stream(query, user_id="bob"))
    # prompt: 7 characters -> 2 tokens + 4 of framing; text: 400 characters -> 100 tokens
    assert await limiter.get_remaining("bob") == 10_000 - 106


async def test_a_refused_stream_raises_from_resolve_before_any_chunk() -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=10))
    provider = StreamingProvider()
    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        with pytest.raises(RateLimitExceeded):
            await gateway.resolve({**QUERY, "stream": True}, user_id="carol")
    assert provider.streams == 0


async def test_a_semantic_hit_on_a_stream_replays_the_stored_chunks() -> None:
    semantic = MemorySemanticCache(HashingEmbedder(), similarity_threshold=0.5)
    provider = StreamingProvider(["s1", "s2"])
    async with InferenceGateway(provider, semantic_cache=semantic) as gateway:
        await collect(gateway.stream(QUERY))
        await gateway.resolve(QUERY)  # a plain answer in the same semantic scope
        paraphrase = {"model": "m", "messages": [{"role": "user", "content": "tell me!"}]}
        assert await collect(gateway.stream(paraphrase)) == ["s1", "s2"]
        assert await gateway.resolve(paraphrase) == "plain:tell me"
        stats = gateway.stats()
    assert (provider.streams, provider.plain_calls) == (1, 1)
    assert (stats.semantic_hits, stats.stream_hits) == (2, 1)


async def test_a_provider_callable_gets_stream_true_and_may_return_an_awaitable() -> None:
    seen: list[Any] = []

    async def chunks() -> AsyncIterator[str]:
        yield "a"
        yield "b"

    async def provider(query: Any) -> Any:
        seen.append(query)
        return chunks()

    async with InferenceGateway(provider) as gateway:
        assert await collect(gateway.stream(QUERY)) == ["a", "b"]
    assert seen == [{**QUERY, "stream": True}]


async def test_a_provider_that_does_not_stream_is_a_clear_error() -> None:
    async def provider(query: Any) -> str:
        return "not a stream"

    async with InferenceGateway(provider) as gateway:
        with pytest.raises(InvalidInputTypeError, match="async iterable of chunks"):
            await collect(gateway.stream(QUERY))


async def test_a_stream_returned_for_a_plain_request_is_refused_not_shared() -> None:
    async def provider(query: Any) -> Any:
        async def chunks() -> AsyncIterator[str]:
            yield "a"

        return chunks()

    async with InferenceGateway(provider) as gateway:
        results = await asyncio.gather(
            *(gateway.resolve(QUERY) for _ in range(3)), return_exceptions=True
        )
    assert all(isinstance(r, InvalidInputTypeError) for r in results)
    assert "does not stream" in str(results[0])


async def test_uncacheable_chunks_pass_through_unstored() -> None:
    marker = object()
    provider = StreamingProvider(["a", marker])
    async with InferenceGateway(provider) as gateway:
        assert await collect(gateway.stream(QUERY)) == ["a", marker]
        await settled(gateway)
        assert await collect(gateway.stream(QUERY)) == ["a", marker]
    assert provider.streams == 2


async def test_no_store_streams_are_not_stored() -> None:
    provider = StreamingProvider()
    async with InferenceGateway(provider) as gateway:
        await collect(gateway.stream(QUERY, no_store=True))
        await collect(gateway.stream(QUERY))
        await collect(gateway.stream(QUERY, no_cache=True))
        await collect(gateway.stream(QUERY))
    assert provider.streams == 3


async def test_bad_input_raises_when_the_stream_is_asked_for() -> None:
    async with InferenceGateway(StreamingProvider()) as gateway:
        with pytest.raises(InvalidInputError):
            gateway.stream("")
        with pytest.raises(InvalidInputError):
            gateway.stream(QUERY, ttl_seconds=-1)
        with pytest.raises(InvalidInputError):
            InferenceGateway(StreamingProvider(), max_stream_bytes=0)
        with pytest.raises(InvalidInputTypeError):
            InferenceGateway(StreamingProvider(), finish_abandoned_streams=1)  # type: ignore[arg-type]


async def test_empty_stream_ends_at_once_and_is_not_stored() -> None:
    provider = StreamingProvider([])
    async with InferenceGateway(provider) as gateway:
        assert await collect(await gateway.resolve({**QUERY, "stream": True})) == []
        await settled(gateway)
        assert await collect(gateway.stream(QUERY)) == []
    assert provider.streams == 2


async def test_ttl_applies_to_a_stored_stream() -> None:
    provider = StreamingProvider(["a"])
    async with InferenceGateway(provider) as gateway:
        await collect(gateway.stream(QUERY, ttl_seconds=0.05))
        await asyncio.sleep(0.1)
        await collect(gateway.stream(QUERY))
    assert provider.streams == 2


async def test_warm_reads_streamed_queries_to_the_end_and_stores_them() -> None:
    provider = StreamingProvider()
    async with InferenceGateway(provider) as gateway:
        report = await gateway.warm([{**QUERY, "stream": True}])
        await settled(gateway)
        assert await collect(gateway.stream(QUERY)) == TEXT
        stats = gateway.stats()
    assert (report.ok, report.computed, report.failed) == (1, 1, ())
    assert stats.stream_hits == 1
    assert provider.streams == 1


async def test_closing_the_gateway_ends_streams_in_flight_with_a_clear_error() -> None:
    provider = StreamingProvider(delay=0.05)
    gateway = InferenceGateway(provider)
    stream = gateway.stream(QUERY)
    assert await stream.__anext__() == "w0 "
    await gateway.aclose()
    with pytest.raises(StreamInterruptedError, match="closed before its end"):
        await collect(stream)
    assert provider.closed_early == 1
