"""``aiocache_llm.integrations.langchain``: ``LangChainCache`` as LangChain's LLM cache.

LangChain's own standard suites (``SyncCacheTestSuite``, ``AsyncCacheTestSuite``) run
over it on memory and on the real Redis, and ``ChatOpenAI`` uses it through
``set_llm_cache`` against a local OpenAI-compatible server over real HTTP. No test
reaches the internet.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
import redis
from langchain_core.caches import BaseCache
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.load import dumpd
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation
from langchain_core.prompts import PromptTemplate
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import AsyncCacheTestSuite, SyncCacheTestSuite

from aiocache_llm import (
    ClosedResourceError,
    InvalidInputError,
    InvalidInputTypeError,
    MemoryExactCache,
    RedisExactCache,
)
from aiocache_llm.integrations.langchain import FORMAT_VERSION, LangChainCache
from tests.conftest import (
    REDIS_URL,
    FakeClock,
    RedisTarget,
    open_redis_target,
    require_real_redis,
)
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(60)

PROMPT = "What is the capital of France?"
LLM_STRING = "model='gpt-test' temperature=0"


def _chat_generations() -> list[Generation]:
    message = AIMessage(
        content="Paris",
        id="chatcmpl-123",
        response_metadata={
            "token_usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
            "model_name": "gpt-test",
            "system_fingerprint": "fp_x",
            "finish_reason": "stop",
            "logprobs": None,
        },
        usage_metadata={
            "input_tokens": 7,
            "output_tokens": 1,
            "total_tokens": 8,
            "input_token_details": {"cache_read": 0},
            "output_token_details": {"reasoning": 0},
        },
        tool_calls=[{"name": "lookup", "args": {"city": "Paris"}, "id": "call_1"}],
        additional_kwargs={"refusal": None, "lc": "a user dict key named lc"},
    )
    return [
        ChatGeneration(message=message, generation_info={"finish_reason": "stop"}),
        ChatGenerationChunk(message=AIMessageChunk(content="Par", chunk_position="last")),
        Generation(text="plain", generation_info={"scores": [1, 2.5, None]}),
    ]


def _delete_prefix_sync(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


# -- LangChain's standard suites ------------------------------------------------------


class TestSyncSuiteOnMemory(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self) -> Iterator[BaseCache]:
        cache = LangChainCache()
        yield cache
        cache.close()


class TestAsyncSuiteOnMemory(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self) -> AsyncIterator[BaseCache]:
        async with LangChainCache() as cache:
            yield cache


@pytest.mark.redis
class TestSyncSuiteOnRedis(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self) -> Iterator[BaseCache]:
        require_real_redis()
        prefix = f"test:{uuid.uuid4().hex[:12]}"
        cache = LangChainCache(RedisExactCache(url=REDIS_URL, key_prefix=prefix))
        try:
            yield cache
        finally:
            cache.close()
            _delete_prefix_sync(prefix)


@pytest.mark.redis
class TestAsyncSuiteOnRedis(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, real_redis: RedisTarget) -> AsyncIterator[BaseCache]:
        async with LangChainCache(
            RedisExactCache(url=REDIS_URL, key_prefix=real_redis.prefix)
        ) as cache:
            yield cache


# -- values, keys, security -----------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def lc_cache(request: pytest.FixtureRequest) -> AsyncIterator[LangChainCache]:
    if request.param == "memory":
        async with LangChainCache() as cache:
            yield cache
        return
    require_real_redis()
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    try:
        async with LangChainCache(RedisExactCache(url=REDIS_URL, key_prefix=prefix)) as cache:
            yield cache
    finally:
        await asyncio.to_thread(_delete_prefix_sync, prefix)


async def test_chat_generations_come_back_equal_with_their_metadata(
    lc_cache: LangChainCache,
) -> None:
    generations = _chat_generations()
    await lc_cache.aupdate(PROMPT, LLM_STRING, generations)
    back = await lc_cache.alookup(PROMPT, LLM_STRING)
    assert back == generations
    assert back is not None
    assert [type(g) for g in back] == [ChatGeneration, ChatGenerationChunk, Generation]
    message = back[0].message  # type: ignore[attr-defined]
    assert type(message) is AIMessage
    assert message.usage_metadata == generations[0].message.usage_metadata  # type: ignore[attr-defined]
    assert message.response_metadata["token_usage"]["total_tokens"] == 8
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    # every hit is a fresh object: LangChain mutates what it gets (it zeroes cost)
    again = await lc_cache.alookup(PROMPT, LLM_STRING)
    assert again == back
    assert again is not None
    assert again[0] is not back[0]


async def test_sync_and_async_share_entries(lc_cache: LangChainCache) -> None:
    generations = _chat_generations()
    await asyncio.to_thread(lc_cache.update, PROMPT, LLM_STRING, generations)
    assert await lc_cache.alookup(PROMPT, LLM_STRING) == generations
    await lc_cache.aclear()
    assert await asyncio.to_thread(lc_cache.lookup, PROMPT, LLM_STRING) is None


async def test_prompt_and_llm_string_are_kept_apart(lc_cache: LangChainCache) -> None:
    await lc_cache.aupdate("a:b", "c", [Generation(text="first")])
    await lc_cache.aupdate("a", "b:c", [Generation(text="second")])
    await lc_cache.aupdate("c", "a:b", [Generation(text="third")])
    assert await lc_cache.alookup("a:b", "c") == [Generation(text="first")]
    assert await lc_cache.alookup("a", "b:c") == [Generation(text="second")]
    assert await lc_cache.alookup("c", "a:b") == [Generation(text="third")]
    assert await lc_cache.alookup("a:bc", "") is None


async def test_entries_are_json_data_not_pickles() -> None:
    exact = MemoryExactCache()
    async with LangChainCache(exact) as cache:
        await cache.aupdate(PROMPT, LLM_STRING, [Generation(text="Paris")])
        stored = await exact.get(
            {"langchain_cache": FORMAT_VERSION, "prompt": PROMPT, "llm_string": LLM_STRING}
        )
        assert stored == {
            "langchain_cache": FORMAT_VERSION,
            "langchain_generations": dumpd([Generation(text="Paris")]),
        }


async def test_a_value_that_would_not_come_back_equal_is_refused() -> None:
    exact = MemoryExactCache()
    async with LangChainCache(exact) as cache:
        not_json = [Generation(text="x", generation_info={"when": object()})]
        human = [ChatGeneration(message=HumanMessage(content="not a model answer"))]
        for value in (not_json, human):
            with pytest.raises(InvalidInputError):
                await cache.aupdate(PROMPT, LLM_STRING, value)
            with pytest.raises(InvalidInputError):
                cache.update(PROMPT, LLM_STRING, value)
        with pytest.raises(InvalidInputTypeError):
            await cache.aupdate(PROMPT, LLM_STRING, ["not a generation"])  # type: ignore[list-item]
        with pytest.raises(InvalidInputTypeError):
            await cache.alookup(PROMPT, 42)  # type: ignore[arg-type]
        assert (await exact.stats()).size == 0

    async with LangChainCache(skip_unstorable=True) as cache:
        await cache.aupdate(PROMPT, LLM_STRING, not_json)
        assert await cache.alookup(PROMPT, LLM_STRING) is None
        built = cache.exact_cache
        assert isinstance(built, MemoryExactCache)  # the one LangChainCache builds
        assert (await built.stats()).size == 0


async def test_stored_data_can_only_revive_the_allowed_data_classes() -> None:
    exact = MemoryExactCache()
    key = {"langchain_cache": FORMAT_VERSION, "prompt": PROMPT, "llm_string": LLM_STRING}
    # a serialized prompt template (a core class LangChain's default "core" allowlist
    # would build) and a secret read from the environment
    forged: list[Any] = [
        dumpd(PromptTemplate.from_template("{x}")),
        {"lc": 1, "type": "secret", "id": ["PATH"]},
        {"lc": 1, "type": "constructor", "id": ["os", "system"], "kwargs": {}},
    ]
    async with LangChainCache(exact) as cache:
        for entry in forged:
            await exact.put(
                key, {"langchain_cache": FORMAT_VERSION, "langchain_generations": [entry]}
            )
            assert await cache.alookup(PROMPT, LLM_STRING) is None
            assert cache.lookup(PROMPT, LLM_STRING) is None
        await exact.put(key, "not ours")
        assert await cache.alookup(PROMPT, LLM_STRING) is None


async def test_ttl_seconds_applies_to_every_entry(clock: FakeClock) -> None:
    async with LangChainCache(MemoryExactCache(clock=clock), ttl_seconds=10) as cache:
        await cache.aupdate(PROMPT, LLM_STRING, [Generation(text="Paris")])
        clock.advance(9.9)
        assert await cache.alookup(PROMPT, LLM_STRING) == [Generation(text="Paris")]
        clock.advance(0.2)
        assert await cache.alookup(PROMPT, LLM_STRING) is None


async def test_bad_arguments_raise() -> None:
    with pytest.raises(InvalidInputTypeError):
        LangChainCache(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        LangChainCache(ttl_seconds=0)
    async with LangChainCache() as cache:
        with pytest.raises(InvalidInputTypeError):
            await cache.aclear(everything=True)


async def test_closed_cache_raises() -> None:
    exact = MemoryExactCache()
    cache = LangChainCache(exact)
    await cache.aclose()
    await cache.aclose()  # idempotent
    with pytest.raises(ClosedResourceError):
        await cache.alookup(PROMPT, LLM_STRING)
    with pytest.raises(ClosedResourceError):
        cache.lookup(PROMPT, LLM_STRING)
    with pytest.raises(ClosedResourceError):
        await exact.get(PROMPT)  # the cache it drove is closed too


# -- threads and event loops ----------------------------------------------------------


async def test_memory_sync_calls_work_on_the_loop_thread() -> None:
    # an inline cache never waits for anything: sync calls are safe here
    async with LangChainCache() as cache:
        cache.update(PROMPT, LLM_STRING, [Generation(text="Paris")])
        assert cache.lookup(PROMPT, LLM_STRING) == [Generation(text="Paris")]
        cache.clear()
        assert cache.lookup(PROMPT, LLM_STRING) is None


def test_memory_sync_calls_from_many_threads() -> None:
    cache = LangChainCache()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                cache.update(f"p{n}-{i}", LLM_STRING, [Generation(text=str(i))])
                assert cache.lookup(f"p{n}-{i}", LLM_STRING) == [Generation(text=str(i))]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()
    assert errors == []


class _YieldingCache(MemoryExactCache):
    async def get(self, query: Any) -> Any | None:
        await asyncio.sleep(0)
        return await super().get(query)


async def test_an_inline_cache_that_yields_is_refused() -> None:
    async with LangChainCache(_YieldingCache(), inline=True) as cache:
        with pytest.raises(RuntimeError, match="inline=False"):
            await cache.alookup(PROMPT, LLM_STRING)
    # the same cache driven on the private loop works
    async with LangChainCache(_YieldingCache(), inline=False) as cache:
        await cache.aupdate(PROMPT, LLM_STRING, [Generation(text="Paris")])
        assert await cache.alookup(PROMPT, LLM_STRING) == [Generation(text="Paris")]
        assert await asyncio.to_thread(cache.lookup, PROMPT, LLM_STRING) == [
            Generation(text="Paris")
        ]


@pytest.mark.redis
async def test_redis_sync_calls_on_the_loop_thread_never_block_it(
    real_redis: RedisTarget, caplog: pytest.LogCaptureFixture
) -> None:
    exact = RedisExactCache(url=REDIS_URL, key_prefix=real_redis.prefix)
    async with LangChainCache(exact) as cache:
        await cache.aupdate(PROMPT, LLM_STRING, [Generation(text="Paris")])
        # stored, yet a sync lookup on this loop's thread is a miss, without I/O
        assert cache.lookup(PROMPT, LLM_STRING) is None
        assert "running event loop" in caplog.text
        # a sync update is handed to the private loop and not waited for
        cache.update("other", LLM_STRING, [Generation(text="later")])
        with pytest.raises(RuntimeError, match="aclear"):
            cache.clear()
        with pytest.raises(RuntimeError, match="aclose"):
            cache.close()
        for _ in range(500):  # the detached write lands within a round trip or two
            if await cache.alookup("other", LLM_STRING) is not None:
                break
            await asyncio.sleep(0.01)
        assert await cache.alookup("other", LLM_STRING) == [Generation(text="later")]
        assert await cache.alookup(PROMPT, LLM_STRING) == [Generation(text="Paris")]
        # from a thread with no running loop, sync calls block that thread and work
        assert await asyncio.to_thread(cache.lookup, PROMPT, LLM_STRING) == [
            Generation(text="Paris")
        ]
    # a Redis client on a private loop, reachable from another Redis client
    assert await real_redis.client.exists(f"{real_redis.prefix}:{exact.signature(_key())}")


def _key() -> dict[str, Any]:
    return {"langchain_cache": FORMAT_VERSION, "prompt": PROMPT, "llm_string": LLM_STRING}


@pytest.mark.redis
async def test_redis_cache_is_shared_by_two_langchain_caches(real_redis: RedisTarget) -> None:
    async with (
        LangChainCache(RedisExactCache(url=REDIS_URL, key_prefix=real_redis.prefix)) as one,
        LangChainCache(RedisExactCache(url=REDIS_URL, key_prefix=real_redis.prefix)) as two,
    ):
        await one.aupdate(PROMPT, LLM_STRING, _chat_generations())
        assert await two.alookup(PROMPT, LLM_STRING) == _chat_generations()
        await two.aclear()
        assert await one.alookup(PROMPT, LLM_STRING) is None


def test_without_langchain_core_the_import_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "langchain_core.caches", None)
    monkeypatch.delitem(sys.modules, "aiocache_llm.integrations.langchain")
    with pytest.raises(ImportError, match=r"aiocache_llm\[langchain\]"):
        importlib.import_module("aiocache_llm.integrations.langchain")


# -- ChatOpenAI through set_llm_cache -------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _no_global_llm_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(name, raising=False)
    yield
    set_llm_cache(None)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def exact_cache(request: pytest.FixtureRequest) -> AsyncIterator[RedisExactCache | None]:
    """None (LangChainCache builds its memory cache) or a Redis cache on a private prefix."""
    if request.param == "memory":
        yield None
        return
    async with open_redis_target("redis") as target:
        yield RedisExactCache(url=REDIS_URL, key_prefix=target.prefix)


@pytest.fixture
async def model(server: FakeOpenAIServer) -> AsyncIterator[ChatOpenAI]:
    """A ChatOpenAI on the local server, its HTTP clients closed afterwards."""
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


async def test_chat_openai_ainvoke_twice_makes_one_request(
    server: FakeOpenAIServer, model: ChatOpenAI, exact_cache: RedisExactCache | None
) -> None:
    async with LangChainCache(exact_cache) as cache:
        set_llm_cache(cache)
        first = await model.ainvoke(PROMPT)
        second = await model.ainvoke(PROMPT)
        assert server.requests == 1
        assert first.content == second.content == f"Echo: {PROMPT}"
        assert second.response_metadata["token_usage"] == first.response_metadata["token_usage"]
        assert second.usage_metadata is not None
        assert second.usage_metadata["total_tokens"] == first.usage_metadata["total_tokens"]  # type: ignore[index]
        await model.ainvoke("another question")
        assert server.requests == 2
        assert get_llm_cache() is cache


async def test_chat_openai_sync_invoke_twice_makes_one_request(
    server: FakeOpenAIServer, model: ChatOpenAI, exact_cache: RedisExactCache | None
) -> None:
    async with LangChainCache(exact_cache) as cache:
        set_llm_cache(cache)

        def invoke_twice() -> tuple[Any, Any]:
            # a worker thread: no running loop here, the server answers on the test loop
            return model.invoke(PROMPT), model.invoke(PROMPT)

        first, second = await asyncio.to_thread(invoke_twice)
        assert server.requests == 1
        assert first.content == second.content == f"Echo: {PROMPT}"
        # and an async call finds what the sync one stored
        third = await model.ainvoke(PROMPT)
        assert third.content == first.content
        assert server.requests == 1
