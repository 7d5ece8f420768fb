"""``LangChainCache`` needs a capability, not a class (a user's wrapper around a cache
works), and a failing cache never fails a LangChain call: a lookup is a miss, an update
is skipped, both counted and logged once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from langchain_core.globals import set_llm_cache
from langchain_core.outputs import Generation
from langchain_openai import ChatOpenAI

from aiocache_llm import BreakerState, InvalidInputTypeError, MemoryExactCache, RedisExactCache
from aiocache_llm.integrations.langchain import LangChainCache, LangChainCacheStats, LangChainStore
from tests.support.openai_server import FakeOpenAIServer
from tests.support.redis_server import free_port

pytestmark = pytest.mark.timeout(60)

PROMPT = "What is the capital of France?"
LLM_STRING = "model='gpt-test' temperature=0"
GENERATIONS = [Generation(text="Paris")]
LOGGER = "aiocache_llm.integrations.langchain"


class MinimalWrapper:
    """A user's wrapper: only the three methods LangChainCache needs, delegated."""

    def __init__(self, inner: MemoryExactCache) -> None:
        self.inner = inner
        self.gets = 0

    async def get(self, query: Any) -> Any:
        self.gets += 1
        return await self.inner.get(query)

    async def put(self, query: Any, value: Any, *, ttl_seconds: float | None = None) -> None:
        await self.inner.put(query, value, ttl_seconds=ttl_seconds)

    async def clear(self) -> None:
        await self.inner.clear()


class InlineWrapper(MinimalWrapper):
    """The same, declaring that its coroutines never yield (as MemoryExactCache's)."""

    completes_inline = True


class FailingCache(InlineWrapper):
    """A cache whose reads and writes fail (a custom backend gone wrong)."""

    async def get(self, query: Any) -> Any:
        raise RuntimeError(f"cannot read {query}")  # quotes the prompt: must not be logged

    async def put(self, query: Any, value: Any, *, ttl_seconds: float | None = None) -> None:
        raise RuntimeError("cannot write")


@pytest.fixture(autouse=True)
def _no_global_llm_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(name, raising=False)
    yield
    set_llm_cache(None)


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
async def model(server: FakeOpenAIServer) -> AsyncIterator[ChatOpenAI]:
    sync_http = openai.DefaultHttpxClient(trust_env=False)
    async_http = openai.DefaultAsyncHttpxClient(trust_env=False)
    try:
        yield ChatOpenAI(
            model="gpt-test",
            base_url=server.base_url,
            api_key="test",  # type: ignore[arg-type]
            max_retries=0,
            timeout=10,
            http_client=sync_http,
            http_async_client=async_http,
        )
    finally:
        sync_http.close()
        await async_http.aclose()


def failure_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "failed and was" in r.getMessage()]


# -- a capability, not a class --------------------------------------------------------


async def test_a_minimal_wrapper_around_a_memory_cache_works() -> None:
    wrapper = MinimalWrapper(MemoryExactCache())
    assert isinstance(wrapper, LangChainStore)
    async with LangChainCache(wrapper) as cache:
        assert "private loop" in repr(cache)  # not declared inline: driven off this loop
        assert await cache.alookup(PROMPT, LLM_STRING) is None
        await cache.aupdate(PROMPT, LLM_STRING, GENERATIONS)
        assert await cache.alookup(PROMPT, LLM_STRING) == GENERATIONS
        # from a thread with no loop, sync calls block for the answer
        assert await asyncio.to_thread(cache.lookup, PROMPT, LLM_STRING) == GENERATIONS
        assert wrapper.gets == 3
        await cache.aclear()
        assert await cache.alookup(PROMPT, LLM_STRING) is None


async def test_a_wrapper_declaring_completes_inline_is_driven_inline() -> None:
    wrapper = InlineWrapper(MemoryExactCache())
    async with LangChainCache(wrapper) as cache:
        assert "inline" in repr(cache)
        # sync calls on this loop's thread answer at once, as with a MemoryExactCache
        cache.update(PROMPT, LLM_STRING, GENERATIONS)
        assert cache.lookup(PROMPT, LLM_STRING) == GENERATIONS


async def test_an_object_without_the_methods_is_refused() -> None:
    class OnlyGet:
        async def get(self, query: Any) -> Any:
            return None

    with pytest.raises(InvalidInputTypeError, match="get, put and clear"):
        LangChainCache(OnlyGet())  # type: ignore[arg-type]


async def test_chat_openai_through_a_wrapper_makes_one_request(
    server: FakeOpenAIServer, model: ChatOpenAI
) -> None:
    async with LangChainCache(MinimalWrapper(MemoryExactCache())) as cache:
        set_llm_cache(cache)
        first = await model.ainvoke(PROMPT)
        second = await model.ainvoke(PROMPT)
    assert server.requests == 1
    assert second.content == first.content


# -- a failing backend never fails the call -------------------------------------------


async def test_a_failing_inline_cache_is_a_miss_and_a_skipped_write(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with LangChainCache(FailingCache(MemoryExactCache())) as cache:
        with caplog.at_level(logging.DEBUG):
            for _ in range(2):
                assert cache.lookup(PROMPT, LLM_STRING) is None
                cache.update(PROMPT, LLM_STRING, GENERATIONS)
                assert await cache.alookup(PROMPT, LLM_STRING) is None
                await cache.aupdate(PROMPT, LLM_STRING, GENERATIONS)
        stats = cache.stats()
    assert isinstance(stats, LangChainCacheStats)
    assert (stats.lookup_failures, stats.update_failures) == (4, 4)
    # three failures in a row open the breaker: the cache is not even asked for a while
    assert stats.breaker is BreakerState.OPEN
    assert len(failure_warnings(caplog)) == 1
    assert PROMPT not in caplog.text


async def test_redis_on_a_closed_port_never_fails_a_langchain_call(
    server: FakeOpenAIServer, model: ChatOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    exact = RedisExactCache(url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="test:down")
    async with LangChainCache(exact) as cache:
        set_llm_cache(cache)
        with caplog.at_level(logging.WARNING):
            first = await model.ainvoke(PROMPT)
            second = await model.ainvoke(PROMPT)
            # sync paths too, from a worker thread (blocking calls)
            assert await asyncio.to_thread(cache.lookup, PROMPT, LLM_STRING) is None
            await asyncio.to_thread(cache.update, PROMPT, LLM_STRING, GENERATIONS)
        stats = cache.stats()
    assert first.content == second.content == f"Echo: {PROMPT}"
    assert server.requests == 2  # every call reached the model: nothing could be cached
    assert (stats.lookup_failures, stats.update_failures) == (3, 3)
    assert len(failure_warnings(caplog)) == 1
    assert any("skipping it" in r.getMessage() for r in caplog.records)  # the breaker opened
    assert PROMPT not in caplog.text


async def test_the_cache_works_again_when_the_backend_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky(InlineWrapper):
        broken = True

        async def get(self, query: Any) -> Any:
            if self.broken:
                raise OSError("connection refused")
            return await super().get(query)

    flaky = Flaky(MemoryExactCache())
    cache = LangChainCache(flaky)
    assert cache.lookup(PROMPT, LLM_STRING) is None
    flaky.broken = False
    cache.update(PROMPT, LLM_STRING, GENERATIONS)
    assert cache.lookup(PROMPT, LLM_STRING) == GENERATIONS
    assert cache.stats().lookup_failures == 1
    assert cache.stats().breaker is BreakerState.CLOSED
    await cache.aclose()
