"""``CachedEmbedder``: memory LRU, Redis backing (fakeredis and the real server),
coalescing, validation of what it reads and is given, failures that never fail a lookup."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from aiocache_llm import (
    CachedEmbedder,
    CachedEmbedderStats,
    ClosedResourceError,
    HashingEmbedder,
    InvalidInputError,
    InvalidInputTypeError,
    MemorySemanticCache,
)
from tests.conftest import REDIS_BACKENDS, RedisTarget, open_redis_target
from tests.support.redis_server import free_port

pytestmark = pytest.mark.timeout(30)

DIM = 32
MODEL = "hashing-32"


class Counting:
    """An async embed function that counts its calls (and may be held at a gate)."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.calls: list[str] = []
        self.gate = gate
        self.entered = asyncio.Event()
        self.inner = HashingEmbedder(DIM)

    async def __call__(self, text: str) -> npt.NDArray[np.float32]:
        self.calls.append(text)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.inner(text)


@pytest.fixture(params=REDIS_BACKENDS)
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param) as target:
        yield target


def key_of(prefix: str, text: str, model_id: str = MODEL) -> str:
    return f"{prefix}:{model_id}:{hashlib.sha256(text.encode()).hexdigest()}"


# -- memory ---------------------------------------------------------------------------


async def test_the_same_text_is_embedded_once_and_callers_get_copies() -> None:
    inner = Counting()
    async with CachedEmbedder(inner, max_size=8) as embed:
        first = await embed("what is the capital of France")
        first[:] = 0  # a caller's copy: the cached vector is untouched
        second = await embed("what is the capital of France")
        assert inner.calls == ["what is the capital of France"]
        np.testing.assert_array_equal(second, HashingEmbedder(DIM)("what is the capital of France"))
        assert second.dtype == np.float32
        assert second.flags.writeable
        stats = embed.stats()
    assert isinstance(stats, CachedEmbedderStats)
    assert (stats.hits, stats.embedded, stats.size, stats.requests) == (1, 1, 1, 2)
    assert stats.hit_rate == 0.5
    with pytest.raises(Exception, match="frozen"):
        stats.hits = 5


async def test_concurrent_requests_for_one_text_make_one_call() -> None:
    gate = asyncio.Event()
    inner = Counting(gate)
    async with CachedEmbedder(inner) as embed:
        tasks = [asyncio.create_task(embed("same text")) for _ in range(5)]
        await inner.entered.wait()
        gate.set()
        vectors = await asyncio.gather(*tasks)
        assert inner.calls == ["same text"]
        assert all(np.array_equal(v, vectors[0]) for v in vectors)
        assert len({id(v) for v in vectors}) == 5  # every caller its own array
        assert (embed.stats().coalesced, embed.stats().embedded) == (4, 1)


async def test_a_cancelled_caller_leaves_the_call_to_the_others() -> None:
    gate = asyncio.Event()
    inner = Counting(gate)
    async with CachedEmbedder(inner) as embed:
        first = asyncio.create_task(embed("text"))
        await inner.entered.wait()
        second = asyncio.create_task(embed("text"))
        await asyncio.sleep(0)  # let the second join the flight
        first.cancel()
        gate.set()
        vector = await second
        assert first.cancelled()
        assert inner.calls == ["text"]
        np.testing.assert_array_equal(await embed("text"), vector)
        assert embed.stats().hits == 1


@pytest.mark.parametrize("in_thread", [True, False])
async def test_sync_embed_functions_in_a_thread_or_inline(in_thread: bool) -> None:
    calls: list[str] = []

    def embed_fn(text: str) -> list[float]:
        calls.append(text)
        return [1.0, 2.0, float(len(text))]

    async with CachedEmbedder(embed_fn, embed_in_thread=in_thread) as embed:
        assert (await embed("abc")).tolist() == [1.0, 2.0, 3.0]
        assert (await embed("abc")).tolist() == [1.0, 2.0, 3.0]
        assert calls == ["abc"]
        assert embed.dimension == 3


async def test_the_lru_drops_the_least_recently_used_vector() -> None:
    inner = Counting()
    async with CachedEmbedder(inner, max_size=2) as embed:
        for text in ("a", "b", "a", "c", "a", "b"):
            await embed(text)
        # "b" was the least recently used when "c" came in, so it is embedded again
        assert inner.calls == ["a", "b", "c", "b"]
        stats = embed.stats()
        assert (stats.size, stats.evictions) == (2, 2)


@pytest.mark.parametrize(
    ("vector", "error"),
    [
        ([1.0, float("nan")], InvalidInputError),
        ([1.0, float("inf")], InvalidInputError),
        ([1e39, 1.0], InvalidInputError),  # beyond float32
        ([], InvalidInputError),
        ([[1.0], [2.0]], InvalidInputError),
        ("1.0", InvalidInputTypeError),
        (None, InvalidInputTypeError),
        (["a", "b"], InvalidInputTypeError),
    ],
)
async def test_a_bad_vector_from_embed_fn_raises_and_is_not_kept(
    vector: Any, error: type[Exception]
) -> None:
    calls = 0

    async def embed_fn(text: str) -> Any:
        nonlocal calls
        calls += 1
        return vector

    async with CachedEmbedder(embed_fn) as embed:
        for _ in range(2):
            with pytest.raises(error):
                await embed("text")
        assert calls == 2
        assert embed.stats().embed_errors == 2
        assert embed.stats().size == 0


async def test_a_vector_of_another_dimension_is_refused() -> None:
    async def embed_fn(text: str) -> list[float]:
        return [1.0] * len(text)

    async with CachedEmbedder(embed_fn, dimension=2) as embed:
        assert (await embed("ab")).shape == (2,)
        with pytest.raises(InvalidInputError, match="dimension 3, expected 2"):
            await embed("abc")


async def test_embed_fn_errors_reach_every_waiter_and_are_not_kept() -> None:
    gate = asyncio.Event()
    calls = 0

    async def embed_fn(text: str) -> list[float]:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise RuntimeError("model crashed")

    async with CachedEmbedder(embed_fn) as embed:
        tasks = [asyncio.create_task(embed("x")) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert calls == 1
        with pytest.raises(RuntimeError):
            await embed("x")
        assert calls == 2


async def test_bad_arguments_and_closing() -> None:
    inner = Counting()
    with pytest.raises(InvalidInputTypeError):
        CachedEmbedder("not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        CachedEmbedder(inner, max_size=0)
    with pytest.raises(InvalidInputError, match="model_id is required"):
        CachedEmbedder(inner, url="redis://127.0.0.1:1/0")
    with pytest.raises(InvalidInputError, match="glob"):
        CachedEmbedder(inner, model_id="model*")
    embed = CachedEmbedder(inner, model_id="m")
    with pytest.raises(InvalidInputTypeError):
        await embed(b"bytes")  # type: ignore[arg-type]
    await embed("a")
    assert "model_id='m'" in repr(embed)
    assert "size=1/4096" in repr(embed)
    assert "embedded=1" in repr(embed)
    await embed.aclose()
    await embed.aclose()  # idempotent
    with pytest.raises(ClosedResourceError):
        await embed("a")


async def test_aclose_cancels_embeddings_in_flight() -> None:
    gate = asyncio.Event()
    inner = Counting(gate)
    embed = CachedEmbedder(inner)
    task = asyncio.create_task(embed("slow"))
    await inner.entered.wait()
    await embed.aclose()
    with pytest.raises(ClosedResourceError, match="closed while embedding"):
        await task


async def test_a_semantic_cache_never_embeds_a_text_twice() -> None:
    inner = Counting()
    async with (
        CachedEmbedder(inner) as embed,
        MemorySemanticCache(embed_fn=embed, similarity_threshold=0.9) as cache,
    ):
        query = {"model": "m", "messages": [{"role": "user", "content": "capital of France"}]}
        assert await cache.get(query) is None
        await cache.put(query, "Paris")
        assert await cache.get(query) == "Paris"
        assert inner.calls == ["capital of France"]


# -- Redis ----------------------------------------------------------------------------


async def test_vectors_are_stored_as_float32_bytes_and_shared(redis: RedisTarget) -> None:
    first_inner, second_inner = Counting(), Counting()
    async with CachedEmbedder(
        first_inner, client=redis.client, key_prefix=redis.prefix, model_id=MODEL
    ) as first:
        vector = await first("shared text")
    raw = await redis.client.get(key_of(redis.prefix, "shared text"))
    assert raw == vector.astype("<f4").tobytes()
    assert b"shared text" not in raw
    async with CachedEmbedder(
        second_inner, client=redis.client, key_prefix=redis.prefix, model_id=MODEL
    ) as second:
        np.testing.assert_array_equal(await second("shared text"), vector)
        assert second.stats().redis_hits == 1
    assert second_inner.calls == []
    # another model id never reads these vectors
    async with CachedEmbedder(
        second_inner, client=redis.client, key_prefix=redis.prefix, model_id="other"
    ) as other:
        await other("shared text")
    assert second_inner.calls == ["shared text"]


async def test_ttl_seconds_bounds_the_redis_entries(redis: RedisTarget) -> None:
    async with CachedEmbedder(
        Counting(), client=redis.client, key_prefix=redis.prefix, model_id=MODEL, ttl_seconds=60
    ) as embed:
        await embed("t")
    ttl = await redis.client.pttl(key_of(redis.prefix, "t"))
    assert 0 < ttl <= 60_000


@pytest.mark.parametrize(
    "stored",
    [
        b"",
        b"\x00\x00\x80",  # not a whole float32
        np.array([np.nan] * DIM, dtype="<f4").tobytes(),
        np.array([1.0] * (DIM + 1), dtype="<f4").tobytes(),  # another dimension
    ],
    ids=["empty", "ragged", "nan", "dimension"],
)
async def test_an_unusable_stored_vector_is_a_counted_miss_and_replaced(
    redis: RedisTarget, stored: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    key = key_of(redis.prefix, "t")
    await redis.client.set(key, stored)
    inner = Counting()
    async with CachedEmbedder(
        inner, client=redis.client, key_prefix=redis.prefix, model_id=MODEL, dimension=DIM
    ) as embed:
        with caplog.at_level(logging.WARNING, logger="aiocache_llm.embedders.cached"):
            vector = await embed("t")
        assert inner.calls == ["t"]
        assert embed.stats().corrupt_entries == 1
        assert "treated as a miss" in caplog.text
    assert await redis.client.get(key) == vector.astype("<f4").tobytes()


async def test_redis_down_falls_back_to_embedding(caplog: pytest.LogCaptureFixture) -> None:
    inner = Counting()
    async with CachedEmbedder(
        inner,
        url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        key_prefix="test:down",
        model_id=MODEL,
        redis_timeout=2.0,
    ) as embed:
        with caplog.at_level(logging.DEBUG, logger="aiocache_llm.guard"):
            for text in ("a", "b", "c", "d"):
                await embed(text)
            assert await embed("a") is not None  # from memory
        stats = embed.stats()
    assert inner.calls == ["a", "b", "c", "d"]
    # a read and a write per text: the first 3 fail, then the open breaker skips them
    assert stats.backend_errors >= 3
    assert stats.backend_errors + stats.backend_skipped == 8
    assert stats.hits == 1
    assert "skipping it" in caplog.text
