"""Shadow mode: semantic lookups are made and recorded but never served; the provider answers.

Runs on memory caches, fakeredis and the real Redis. Also: ``semantic_mode="off"`` and
``verify=`` through the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aiocache_llm import (
    InferenceGateway,
    InvalidInputError,
    InvalidInputTypeError,
    MemoryExactCache,
    MemorySemanticCache,
    RedisSemanticCache,
    SemanticGuard,
    ShadowRecord,
    calibrate_threshold,
)
from tests.conftest import Backend
from tests.gateway.fakes import CountingProvider
from tests.gateway.streams import StreamingProvider


def ask(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


ORIGINAL = "Trains from Paris to Brussels"
PARAPHRASE = "trains from paris to brussels?"
SWAPPED = "Trains from Brussels to Paris"
FAR = "Recipe for banana bread"
VECTORS = {
    ORIGINAL: [1.0, 0.0, 0.0, 0.0],
    PARAPHRASE: [0.96, 0.28, 0.0, 0.0],
    SWAPPED: [0.98, 0.0, 0.199, 0.0],
    FAR: [0.0, 0.0, 0.0, 1.0],
}


def embed(text: str) -> list[float]:
    return VECTORS[text]


@pytest.fixture
async def make_semantic(backend: Backend) -> AsyncIterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("similarity_threshold", 0.9)
        if backend.redis is None:
            cache: Any = MemorySemanticCache(
                embed, clock=backend.clock, embed_in_thread=False, **kwargs
            )
        else:
            cache = RedisSemanticCache(
                embed,
                client=backend.redis.client,
                key_prefix=f"{backend.redis.prefix}:semantic",
                embed_in_thread=False,
                **kwargs,
            )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


async def test_shadow_mode_records_would_be_hits_but_the_provider_answers(
    make_semantic: Callable[..., Any],
) -> None:
    provider = CountingProvider()
    semantic = make_semantic(verify=SemanticGuard())
    gateway = InferenceGateway(provider, semantic_cache=semantic, semantic_mode="shadow")
    async with gateway:
        assert gateway.semantic_mode == "shadow"
        await gateway.resolve(ask(ORIGINAL))  # an empty scope: recorded, nothing compared
        assert await gateway.resolve(ask(PARAPHRASE)) == f"answer:{PARAPHRASE}"
        assert await gateway.resolve(ask(SWAPPED)) == f"answer:{SWAPPED}"
        assert await gateway.resolve(ask(FAR)) == f"answer:{FAR}"
        records = gateway.shadow_records()
        stats = gateway.stats()
    assert provider.calls == 4  # nothing was served from the semantic cache
    assert stats.semantic_hits == 0
    assert (stats.shadow_lookups, stats.shadow_would_hit, stats.shadow_refused) == (4, 1, 1)
    empty, paraphrase, swapped, far = records
    assert (empty.query_text, empty.candidate_text, empty.similarity) == (ORIGINAL, None, None)
    assert not empty.would_hit
    assert paraphrase.query_text == PARAPHRASE
    assert paraphrase.candidate_text == ORIGINAL
    assert paraphrase.similarity == pytest.approx(0.96, abs=1e-4)
    assert (paraphrase.verified, paraphrase.would_hit, paraphrase.threshold) == (True, True, 0.9)
    # the nearest entry is refused by the guard (direction swapped): no would-be hit
    assert swapped.candidate_text in (ORIGINAL, PARAPHRASE)
    assert (swapped.verified, swapped.would_hit) == (False, False)
    # below the threshold: measured anyway, for calibration
    assert far.similarity is not None
    assert far.similarity < 0.9
    assert (far.verified, far.would_hit) == (True, False)
    assert all(r.label is None and r.at > 0 for r in records)


async def test_shadow_records_calibrate_a_threshold(make_semantic: Callable[..., Any]) -> None:
    gateway = InferenceGateway(
        CountingProvider(), semantic_cache=make_semantic(), semantic_mode="shadow"
    )
    async with gateway:
        for text in (ORIGINAL, PARAPHRASE, SWAPPED):
            await gateway.resolve(ask(text))
        records = gateway.shadow_records(clear=True)
        assert gateway.shadow_records() == []
    labelled = [records[1].labelled(True), records[2].labelled(False), records[0]]
    with pytest.raises(InvalidInputError, match="without a label"):
        calibrate_threshold(labelled)
    result = calibrate_threshold([*labelled[:2], (records[0], False)], max_wrong_rate=0.0)
    # the swapped trap is nearer than the paraphrase: plain cosine cannot separate them
    assert result.hits == 0
    guarded = calibrate_threshold(labelled[:2], max_wrong_rate=0.0, verify=SemanticGuard())
    assert (guarded.hits, guarded.wrong, guarded.refused) == (1, 0, 1)


async def test_on_shadow_is_called_outside_the_request_path(
    make_semantic: Callable[..., Any],
) -> None:
    seen: list[ShadowRecord] = []
    tasks: list[asyncio.Task[Any] | None] = []

    def on_shadow(record: ShadowRecord) -> None:
        seen.append(record)
        tasks.append(asyncio.current_task())  # None: a loop callback, not the request's task

    gateway = InferenceGateway(
        CountingProvider(),
        semantic_cache=make_semantic(),
        semantic_mode="shadow",
        on_shadow=on_shadow,
        shadow_log_size=0,
    )
    async with gateway:
        await gateway.resolve(ask(ORIGINAL))
        await gateway.resolve(ask(PARAPHRASE))
        await asyncio.sleep(0)
        assert [r.query_text for r in seen] == [ORIGINAL, PARAPHRASE]
        assert tasks == [None, None]
        assert gateway.shadow_records() == []  # a log of size 0 keeps nothing


async def test_an_async_on_shadow_runs_as_a_task_and_failures_never_fail_a_request(
    make_semantic: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    delivered: list[str] = []

    async def on_shadow(record: ShadowRecord) -> None:
        await asyncio.sleep(0)
        if record.query_text == ORIGINAL:
            raise RuntimeError(f"cannot store {record.query_text}")
        delivered.append(record.query_text)

    gateway = InferenceGateway(
        CountingProvider(),
        semantic_cache=make_semantic(),
        semantic_mode="shadow",
        on_shadow=on_shadow,
    )
    async with gateway:
        with caplog.at_level("WARNING", logger="aiocache_llm.gateway"):
            assert await gateway.resolve(ask(ORIGINAL)) == f"answer:{ORIGINAL}"
            assert await gateway.resolve(ask(PARAPHRASE)) == f"answer:{PARAPHRASE}"
            for _ in range(5):
                await asyncio.sleep(0)
        stats = gateway.stats()
    assert delivered == [PARAPHRASE]
    assert stats.shadow_callback_errors == 1
    messages = [r.getMessage() for r in caplog.records if "on_shadow" in r.getMessage()]
    assert len(messages) == 1
    assert "RuntimeError" in messages[0]
    assert ORIGINAL not in messages[0]  # never the texts


async def test_shadow_mode_probes_streams_too(make_semantic: Callable[..., Any]) -> None:
    provider = StreamingProvider(chunks=["a", "b"])
    gateway = InferenceGateway(provider, semantic_cache=make_semantic(), semantic_mode="shadow")
    async with gateway:
        assert [c async for c in gateway.stream(ask(ORIGINAL))] == ["a", "b"]
        assert [c async for c in gateway.stream(ask(PARAPHRASE))] == ["a", "b"]
        records = gateway.shadow_records()
    assert provider.streams == 2
    assert [r.would_hit for r in records] == [False, True]


async def test_an_exact_cache_hit_makes_no_shadow_lookup(make_semantic: Callable[..., Any]) -> None:
    gateway = InferenceGateway(
        CountingProvider(), semantic_cache=make_semantic(), semantic_mode="shadow"
    )
    async with gateway:
        await gateway.resolve(ask(ORIGINAL))
        await gateway.resolve(ask(ORIGINAL))
        assert gateway.stats().exact_hits == 1
        assert gateway.stats().shadow_lookups == 1


async def test_serve_mode_serves_what_the_verifier_accepts(
    make_semantic: Callable[..., Any],
) -> None:
    provider = CountingProvider()
    semantic = make_semantic(verify=SemanticGuard())
    gateway = InferenceGateway(provider, semantic_cache=semantic)
    async with gateway:
        assert gateway.semantic_mode == "serve"
        await gateway.resolve(ask(ORIGINAL))
        assert await gateway.resolve(ask(PARAPHRASE)) == f"answer:{ORIGINAL}"
        assert await gateway.resolve(ask(SWAPPED)) == f"answer:{SWAPPED}"  # refused: provider
        assert gateway.stats().semantic_hits == 1
    assert provider.calls == 2
    assert (await semantic.stats()).verifier_refusals >= 1


async def test_off_mode_never_touches_the_semantic_cache(
    make_semantic: Callable[..., Any],
) -> None:
    semantic = make_semantic()
    await semantic.put(ask(ORIGINAL), "stored before")
    gateway = InferenceGateway(CountingProvider(), semantic_cache=semantic, semantic_mode="off")
    async with gateway:
        assert await gateway.resolve(ask(PARAPHRASE)) == f"answer:{PARAPHRASE}"
        assert gateway.stats().shadow_lookups == 0
    stats = await semantic.stats()
    assert (stats.hits, stats.misses, stats.size) == (0, 0, 1)  # neither read nor written


class PlainSemantic:
    """A semantic cache of the user's own: get/put/invalidate/clear/stats, no probe."""

    async def get(self, query: Any) -> Any:
        return None

    async def put(self, query: Any, value: Any, *, ttl_seconds: float | None = None) -> None:
        return None

    async def invalidate(self, query: Any) -> bool:
        return False

    async def clear(self) -> None:
        return None

    async def stats(self) -> Any:
        return None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"semantic_mode": "on"}, InvalidInputError),
        ({"semantic_mode": "shadow"}, InvalidInputError),  # no semantic cache
        ({"semantic_mode": "shadow", "semantic_cache": PlainSemantic()}, InvalidInputError),
        ({"shadow_log_size": -1}, InvalidInputError),
        ({"shadow_log_size": 1.5}, InvalidInputTypeError),
        ({"on_shadow": "print"}, InvalidInputTypeError),
    ],
)
def test_bad_shadow_configuration_raises(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        InferenceGateway(CountingProvider(), exact_cache=MemoryExactCache(), **kwargs)


async def test_the_shadow_log_keeps_the_newest_records(make_semantic: Callable[..., Any]) -> None:
    gateway = InferenceGateway(
        CountingProvider(),
        semantic_cache=make_semantic(),
        semantic_mode="shadow",
        shadow_log_size=2,
    )
    async with gateway:
        for text in (ORIGINAL, PARAPHRASE, SWAPPED, FAR):
            await gateway.resolve(ask(text))
        assert [r.query_text for r in gateway.shadow_records()] == [SWAPPED, FAR]
        assert gateway.stats().shadow_lookups == 4
