"""``aiocache_llm.integrations.openai`` with the real SDK over real HTTP (a local server).

``wrap_openai`` answers ``chat.completions.create`` through the gateway with the SDK's
own types; ``OpenAIProvider`` is the provider it runs on. No test reaches the internet.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ParsedChatCompletion

from aiocache_llm import (
    CacheStats,
    ChunkStream,
    HashingEmbedder,
    InferenceGateway,
    InvalidInputError,
    InvalidInputTypeError,
    MemoryExactCache,
    MemoryRateLimiter,
    MemorySemanticCache,
    RateLimitConfig,
    RedisExactCache,
    RedisSemanticCache,
)
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.integrations.openai import (
    CachedOpenAI,
    OpenAIProvider,
    default_namespace,
    wrap_openai,
)
from tests.conftest import RedisTarget
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(60)

QUERY: dict[str, Any] = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "what is the capital of France"}],
}
ANSWER = "Echo: what is the capital of France"


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
async def wrapped(server: FakeOpenAIServer) -> AsyncIterator[CachedOpenAI]:
    async with wrap_openai(server.client()) as client:
        yield client


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def read(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


# -- plain and streamed answers -------------------------------------------------------


async def test_identical_creates_make_one_request_and_keep_the_sdk_type(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    first = await wrapped.chat.completions.create(**QUERY)
    second = await wrapped.chat.completions.create(**QUERY)
    assert server.requests == 1
    assert type(first) is ChatCompletion
    assert type(second) is ChatCompletion
    assert second == first
    assert second is not first
    assert second.choices[0].message.content == ANSWER
    assert wrapped.gateway.stats().exact_hits == 1


async def test_identical_streamed_creates_make_one_stream_replayed_as_sdk_chunks(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    stream = await wrapped.chat.completions.create(**QUERY, stream=True)
    assert isinstance(stream, ChunkStream)
    streamed = await read(stream)
    replayed = await read(await wrapped.chat.completions.create(**QUERY, stream=True))
    assert server.stream_requests == 1
    assert server.bodies[0]["stream"] is True
    assert all(type(chunk) is ChatCompletionChunk for chunk in streamed + replayed)
    assert text_of(streamed) == ANSWER
    assert replayed == streamed
    assert replayed[0] is not streamed[0]
    assert wrapped.gateway.stats().stream_hits == 1


async def test_plain_and_streamed_answers_never_mix(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    plain = await wrapped.chat.completions.create(**QUERY)
    chunks = await read(await wrapped.chat.completions.create(**QUERY, stream=True))
    plain_again = await wrapped.chat.completions.create(**QUERY, stream=False)
    chunks_again = await read(await wrapped.chat.completions.create(**QUERY, stream=True))
    assert server.requests == 2
    assert server.stream_requests == 1
    assert type(plain) is ChatCompletion
    assert type(plain_again) is ChatCompletion
    assert plain_again == plain
    assert all(type(chunk) is ChatCompletionChunk for chunk in chunks + chunks_again)
    assert chunks_again == chunks


async def test_twenty_concurrent_streamed_creates_share_one_server_stream(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    server.chunk_delay = 0.02

    async def consumer(index: int) -> list[Any]:
        await asyncio.sleep(index * 0.003)  # some join while the stream is running
        return await read(await wrapped.chat.completions.create(**QUERY, stream=True))

    results = await asyncio.gather(*(consumer(i) for i in range(20)))
    assert server.stream_requests == 1
    assert server.requests == 1
    assert all(text_of(result) == ANSWER for result in results)
    assert all(result == results[0] for result in results)
    assert all(type(chunk) is ChatCompletionChunk for chunk in results[-1])


async def test_errors_before_the_first_chunk_raise_from_create_and_are_not_cached(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    server.status_error = 429
    with pytest.raises(openai.RateLimitError):
        await wrapped.chat.completions.create(**QUERY)
    with pytest.raises(openai.RateLimitError):
        await wrapped.chat.completions.create(**QUERY, stream=True)
    server.status_error = None
    completion = await wrapped.chat.completions.create(**QUERY)
    chunks = await read(await wrapped.chat.completions.create(**QUERY, stream=True))
    assert completion.choices[0].message.content == ANSWER
    assert text_of(chunks) == ANSWER
    assert server.requests == 4


class SlowStreamingClient:
    """An AsyncOpenAI look-alike whose stream never sends its first chunk."""

    base_url = "http://slow.example/v1"
    organization = None
    project = None

    def __init__(self) -> None:
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))
        self.stream_closed = asyncio.Event()

    async def create(self, **kwargs: Any) -> AsyncIterator[str]:
        async def chunks() -> AsyncIterator[str]:
            try:
                await asyncio.sleep(30)
                yield "never"
            finally:
                self.stream_closed.set()

        return chunks()


async def test_cancelling_a_streamed_create_before_its_first_chunk_closes_the_stream() -> None:
    client = SlowStreamingClient()
    async with wrap_openai(client) as wrapped:  # type: ignore[arg-type]
        task = asyncio.create_task(wrapped.chat.completions.create(**QUERY, stream=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # nobody holds the stream any more: it is abandoned and the provider's closed
        await asyncio.wait_for(client.stream_closed.wait(), timeout=2)
        assert wrapped.gateway.stats().streams_abandoned == 1


# -- per-request cache control --------------------------------------------------------


async def test_no_cache_asks_again_and_stores_the_fresh_answer(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    server.reply = lambda body: "first answer"
    await wrapped.chat.completions.create(**QUERY)
    server.reply = lambda body: "fresh answer"
    fresh = await wrapped.chat.completions.create(**QUERY, cache={"no_cache": True})
    cached = await wrapped.chat.completions.create(**QUERY)
    assert server.requests == 2
    assert fresh.choices[0].message.content == "fresh answer"
    assert cached.choices[0].message.content == "fresh answer"
    assert "cache" not in server.bodies[1]  # never sent to the API


async def test_no_store_keeps_the_answer_out_of_the_cache(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    await wrapped.chat.completions.create(**QUERY, cache={"no_store": True})
    chunks = await wrapped.chat.completions.create(**QUERY, stream=True, cache={"no_store": True})
    await read(chunks)
    assert (await wrapped.gateway.exact_cache.stats()).size == 0
    await wrapped.chat.completions.create(**QUERY)
    await read(await wrapped.chat.completions.create(**QUERY, stream=True))
    assert server.requests == 4
    assert server.stream_requests == 2


async def test_ttl_seconds_bounds_the_entry(server: FakeOpenAIServer) -> None:
    async with wrap_openai(server.client(), ttl_seconds=3600) as wrapped:
        await wrapped.chat.completions.create(**QUERY, cache={"ttl_seconds": 0.05})
        await asyncio.sleep(0.1)
        await wrapped.chat.completions.create(**QUERY)
        await wrapped.chat.completions.create(**QUERY)
    assert server.requests == 2


async def test_user_id_chooses_whose_budget_pays(server: FakeOpenAIServer) -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=100_000))
    async with wrap_openai(server.client(), rate_limiter=limiter) as wrapped:
        completion = await wrapped.chat.completions.create(**QUERY, cache={"user_id": "alice"})
        await wrapped.chat.completions.create(**QUERY, cache={"user_id": "bob"})  # a hit
    assert completion.usage is not None
    assert await limiter.get_remaining("alice") == 100_000 - completion.usage.total_tokens
    assert await limiter.get_remaining("bob") == 100_000


@pytest.mark.parametrize(
    ("cache", "error"),
    [
        pytest.param("no_cache", InvalidInputTypeError, id="not-a-mapping"),
        pytest.param({"no_cahce": True}, InvalidInputError, id="unknown-option"),
        pytest.param({"no_cache": 1}, InvalidInputTypeError, id="not-a-bool"),
        pytest.param({"ttl_seconds": -1}, InvalidInputError, id="negative-ttl"),
        pytest.param({"user_id": ""}, InvalidInputError, id="empty-user"),
    ],
)
async def test_bad_cache_options_raise_before_any_request(
    server: FakeOpenAIServer, wrapped: CachedOpenAI, cache: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await wrapped.chat.completions.create(**QUERY, cache=cache)
    with pytest.raises(error):
        await wrapped.chat.completions.create(**QUERY, stream=True, cache=cache)
    assert server.requests == 0


# -- what is keyed, what is sent ------------------------------------------------------


async def test_sdk_only_arguments_stay_out_of_the_key_and_reach_the_sdk(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    await wrapped.chat.completions.create(**QUERY)
    again = await wrapped.chat.completions.create(
        **QUERY,
        timeout=30.0,
        extra_headers={"X-Trace": "abc"},
        temperature=openai.NOT_GIVEN,
        top_p=openai.omit,
        user="someone",
    )
    assert server.requests == 1
    assert again.choices[0].message.content == ANSWER
    # an argument that changes the answer is a different key, and is sent as given
    await wrapped.chat.completions.create(**QUERY, temperature=0.5)
    assert server.requests == 2
    assert server.bodies[-1]["temperature"] == 0.5


async def test_stream_options_reach_the_sdk_and_usage_streams_are_keyed_apart(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    without = await read(await wrapped.chat.completions.create(**QUERY, stream=True))
    with_usage = await read(
        await wrapped.chat.completions.create(
            **QUERY, stream=True, stream_options={"include_usage": True}
        )
    )
    replayed = await read(
        await wrapped.chat.completions.create(
            **QUERY, stream=True, stream_options={"include_usage": True}
        )
    )
    assert server.stream_requests == 2
    assert server.bodies[1]["stream_options"] == {"include_usage": True}
    assert without[-1].usage is None
    assert with_usage[-1].usage is not None
    assert replayed == with_usage


async def test_one_shot_message_iterables_are_keyed_and_sent_whole(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    messages = QUERY["messages"]
    first = await wrapped.chat.completions.create(model="gpt-test", messages=iter(messages))
    second = await wrapped.chat.completions.create(model="gpt-test", messages=tuple(messages))
    assert server.requests == 1
    assert server.bodies[0]["messages"] == messages
    assert second == first


async def test_sdk_message_objects_in_the_history_are_keyed_like_dicts(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    answer = await wrapped.chat.completions.create(**QUERY)
    follow_up = "and of Italy"
    as_object = [*QUERY["messages"], answer.choices[0].message]
    as_dicts = [
        *QUERY["messages"],
        answer.choices[0].message.model_dump(mode="json", exclude_unset=True),
    ]
    first = await wrapped.chat.completions.create(
        model="gpt-test", messages=[*as_object, {"role": "user", "content": follow_up}]
    )
    second = await wrapped.chat.completions.create(
        model="gpt-test", messages=[*as_dicts, {"role": "user", "content": follow_up}]
    )
    assert server.requests == 2
    assert first.choices[0].message.content == "Echo: and of Italy"
    assert second == first


# -- backends -------------------------------------------------------------------------


class DictCache:
    """An exact cache of the caller's own, with no codec: used as is."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}

    async def get(self, query: Any) -> Any | None:
        return self.entries.get(repr(sorted(query.items())))

    async def put(self, query: Any, value: Any, *, ttl_seconds: float | None = None) -> None:
        self.entries[repr(sorted(query.items()))] = value

    async def invalidate(self, query: Any) -> bool:
        return self.entries.pop(repr(sorted(query.items())), None) is not None

    async def clear(self) -> None:
        self.entries.clear()

    async def stats(self) -> CacheStats:
        return CacheStats(size=len(self.entries))

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> DictCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def test_a_cache_without_a_codec_is_used_as_is(server: FakeOpenAIServer) -> None:
    cache = DictCache()
    async with wrap_openai(server.client(), exact_cache=cache) as wrapped:
        first = await wrapped.chat.completions.create(**QUERY)
        second = await wrapped.chat.completions.create(**QUERY)
    assert server.requests == 1
    assert len(cache.entries) == 1
    assert second == first


async def test_a_supplied_memory_cache_learns_the_sdk_types(server: FakeOpenAIServer) -> None:
    cache = MemoryExactCache()
    async with wrap_openai(server.client(), exact_cache=cache) as wrapped:
        await wrapped.chat.completions.create(**QUERY)
    # registered up front: entries written elsewhere decode before this cache stored any
    fields = {"id": "x", "choices": [], "created": 0, "model": "m"}
    samples = [
        ChatCompletionChunk.model_validate({**fields, "object": "chat.completion.chunk"}),
        ParsedChatCompletion.model_validate({**fields, "object": "chat.completion"}),
    ]
    for sample in samples:
        data = ValueCodec().encode(sample)
        assert type(cache.codec.decode(data)) is type(sample)
    await cache.put("still open", "yes")  # the cache stays the caller's: not closed
    assert await cache.get("still open") == "yes"


@pytest.mark.redis
async def test_redis_cache_learns_the_sdk_types_and_another_process_reads_them(
    server: FakeOpenAIServer, real_redis: RedisTarget
) -> None:
    def redis_cache() -> RedisExactCache:  # no value_types: the wrapper registers them
        return RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix)

    async with wrap_openai(server.client(), exact_cache=redis_cache()) as first:
        plain = await first.chat.completions.create(**QUERY)
        streamed = await read(await first.chat.completions.create(**QUERY, stream=True))
    # another process: its own cache object and client on the same prefix and server
    async with wrap_openai(server.client(), exact_cache=redis_cache()) as second:
        plain_again = await second.chat.completions.create(**QUERY)
        replayed = await read(await second.chat.completions.create(**QUERY, stream=True))
        stats = second.gateway.stats()
    assert server.requests == 2
    assert stats.exact_hits == 2
    assert stats.provider_calls == 0
    assert type(plain_again) is ChatCompletion
    assert plain_again == plain
    assert all(type(chunk) is ChatCompletionChunk for chunk in replayed)
    assert replayed == streamed


@pytest.mark.redis
async def test_a_redis_semantic_cache_learns_the_sdk_types_for_another_process(
    server: FakeOpenAIServer, real_redis: RedisTarget
) -> None:
    def semantic() -> RedisSemanticCache:  # no value_types: the wrapper registers them
        return RedisSemanticCache(
            HashingEmbedder(),
            client=real_redis.client,
            key_prefix=f"{real_redis.prefix}:sem",
            similarity_threshold=0.5,
        )

    paraphrase = {**QUERY, "messages": [{"role": "user", "content": "capital of France?"}]}
    async with wrap_openai(server.client(), semantic_cache=semantic()) as first:
        answer = await first.chat.completions.create(**QUERY)
    async with wrap_openai(server.client(), semantic_cache=semantic()) as second:
        hit = await second.chat.completions.create(**paraphrase)
        stats = second.gateway.stats()
    assert server.requests == 1
    assert stats.semantic_hits == 1
    assert type(hit) is ChatCompletion
    assert hit == answer


# -- tenancy and secrets --------------------------------------------------------------


async def test_clients_of_different_servers_never_share_entries() -> None:
    async with FakeOpenAIServer() as one, FakeOpenAIServer() as two:
        one.reply = lambda body: "from server one"
        two.reply = lambda body: "from server two"
        cache = MemoryExactCache()
        async with (
            wrap_openai(one.client(), exact_cache=cache) as first,
            wrap_openai(two.client(), exact_cache=cache) as second,
        ):
            a = await first.chat.completions.create(**QUERY)
            b = await second.chat.completions.create(**QUERY)
            streamed = await read(await second.chat.completions.create(**QUERY, stream=True))
        assert first.namespace != second.namespace
        assert (one.requests, two.requests) == (1, 2)
        assert a.choices[0].message.content == "from server one"
        assert b.choices[0].message.content == "from server two"
        assert text_of(streamed) == "from server two"


@pytest.mark.parametrize(
    ("one", "two"),
    [
        pytest.param({"organization": "org-a"}, {"organization": "org-b"}, id="organization"),
        pytest.param({"project": "proj-a"}, {"project": "proj-b"}, id="project"),
        pytest.param({}, {"organization": "org-b"}, id="none-and-organization"),
    ],
)
async def test_organizations_and_projects_never_share_entries(
    server: FakeOpenAIServer, one: dict[str, str], two: dict[str, str]
) -> None:
    cache = MemoryExactCache()
    async with (
        wrap_openai(server.client(**one), exact_cache=cache) as first,
        wrap_openai(server.client(**two), exact_cache=cache) as second,
    ):
        await first.chat.completions.create(**QUERY)
        await second.chat.completions.create(**QUERY)
    assert server.requests == 2
    assert (await cache.stats()).size == 2


async def test_the_api_key_does_not_split_the_namespace(server: FakeOpenAIServer) -> None:
    cache = MemoryExactCache()
    async with (
        wrap_openai(server.client(api_key="sk-one"), exact_cache=cache) as first,
        wrap_openai(server.client(api_key="sk-two"), exact_cache=cache) as second,
    ):
        await first.chat.completions.create(**QUERY)
        await second.chat.completions.create(**QUERY)
    assert first.namespace == second.namespace
    assert server.requests == 1


async def test_a_common_namespace_opts_in_to_sharing() -> None:
    async with FakeOpenAIServer() as one, FakeOpenAIServer() as two:
        cache = MemoryExactCache()
        async with (
            wrap_openai(
                one.client(organization="org-a"), exact_cache=cache, namespace="eu"
            ) as first,
            wrap_openai(
                two.client(organization="org-b"), exact_cache=cache, namespace="eu"
            ) as second,
        ):
            a = await first.chat.completions.create(**QUERY)
            b = await second.chat.completions.create(**QUERY)
            await read(await first.chat.completions.create(**QUERY, stream=True))
            await read(await second.chat.completions.create(**QUERY, stream=True))
        assert (one.requests, two.requests) == (2, 0)
        assert b == a


async def test_a_shared_semantic_cache_keeps_namespaces_apart(server: FakeOpenAIServer) -> None:
    semantic = MemorySemanticCache(HashingEmbedder(), similarity_threshold=0.5)
    paraphrase = {**QUERY, "messages": [{"role": "user", "content": "capital of France?"}]}
    async with (
        wrap_openai(server.client(organization="org-a"), semantic_cache=semantic) as first,
        wrap_openai(server.client(organization="org-b"), semantic_cache=semantic) as second,
    ):
        await first.chat.completions.create(**QUERY)
        hit = await first.chat.completions.create(**paraphrase)  # same namespace: a hit
        assert server.requests == 1
        assert hit.choices[0].message.content == ANSWER
        other = await second.chat.completions.create(**paraphrase)  # another tenant
    assert server.requests == 2
    assert other.choices[0].message.content == "Echo: capital of France?"


def test_the_default_namespace_leaves_credentials_out() -> None:
    client = openai.AsyncOpenAI(
        api_key="sk-SECRET", base_url="https://user:pw-SECRET@llm.example:8443/v1/?key=q-SECRET"
    )
    namespace = default_namespace(client)
    assert "SECRET" not in namespace
    assert "llm.example:8443/v1" in namespace


@pytest.mark.redis
async def test_api_keys_and_auth_headers_are_never_stored_or_logged(
    server: FakeOpenAIServer, real_redis: RedisTarget, caplog: pytest.LogCaptureFixture
) -> None:
    api_key = f"sk-SECRET-{uuid.uuid4().hex}"
    header_secret = f"hdr-SECRET-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    cache = RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix)
    client = server.client(api_key=api_key, organization="org-a")
    async with wrap_openai(client, exact_cache=cache) as wrapped:
        secret_headers = {"X-Api-Key": header_secret}
        await wrapped.chat.completions.create(**QUERY, extra_headers=secret_headers)
        await wrapped.chat.completions.create(**QUERY, extra_headers=secret_headers)
        await read(
            await wrapped.chat.completions.create(
                **QUERY, stream=True, extra_headers=secret_headers
            )
        )
        server.status_error = 401
        with pytest.raises(openai.AuthenticationError):
            await wrapped.chat.completions.create(
                **QUERY, temperature=0.1, extra_headers=secret_headers
            )
        assert api_key not in repr(wrapped)
        assert api_key not in wrapped.namespace
    assert server.requests == 3

    stored: list[bytes] = []
    async for key in real_redis.client.scan_iter(match=f"{real_redis.prefix}*"):
        stored.append(key)
        kind = (await real_redis.client.type(key)).decode()
        if kind == "string":
            stored.append(await real_redis.client.get(key))
        elif kind == "stream":
            for _, fields in await real_redis.client.xrange(key):
                stored.extend(b"%s=%s" % item for item in fields.items())
        elif kind == "zset":
            stored.extend(await real_redis.client.zrange(key, 0, -1))
        elif kind == "hash":
            stored.extend(
                b"%s=%s" % item for item in (await real_redis.client.hgetall(key)).items()
            )
        else:
            stored.append(repr(await real_redis.client.dump(key)).encode())
    blob = b"\n".join(stored)
    assert b"Echo: what is the capital of France" in blob  # the values were read
    assert api_key.encode() not in blob
    assert header_secret.encode() not in blob

    logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert any(record.name.startswith("openai") for record in caplog.records)  # it captured
    assert api_key not in logged
    assert header_secret not in logged


# -- the rest of the client, the provider, the module --------------------------------


async def test_other_attributes_pass_through_to_the_client(
    server: FakeOpenAIServer, wrapped: CachedOpenAI
) -> None:
    client = wrapped.client
    assert wrapped.models is client.models
    assert wrapped.base_url == client.base_url
    assert wrapped.chat.completions.with_raw_response is not None
    with pytest.raises(openai.NotFoundError):  # the local server only knows chat completions
        await wrapped.models.list()
    assert server.requests == 1  # it went out, uncached
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute


async def test_the_provider_runs_a_gateway_built_by_hand(server: FakeOpenAIServer) -> None:
    provider = OpenAIProvider(server.client())
    assert {ChatCompletion, ChatCompletionChunk, ParsedChatCompletion} <= set(provider.value_types)
    cache = MemoryExactCache(value_types=provider.value_types)
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        plain = await gateway.resolve(QUERY)
        chunks = await read(gateway.stream(QUERY))
        replayed = await read(await gateway.resolve({**QUERY, "stream": True}))
    assert type(plain) is ChatCompletion
    assert replayed == chunks
    assert (server.requests, server.stream_requests) == (2, 1)
    with pytest.raises(InvalidInputError):
        await provider.complete({**QUERY, "stream": True})
    with pytest.raises(InvalidInputTypeError):
        await provider.complete("a bare string has no model")


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(object(), id="object"),
        pytest.param(openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1"), id="sync"),
    ],
)
def test_a_client_that_is_not_an_async_openai_is_refused(client: Any) -> None:
    with pytest.raises(InvalidInputTypeError):
        OpenAIProvider(client)
    with pytest.raises(InvalidInputTypeError):
        wrap_openai(client)


async def test_bad_wrap_options_are_refused(server: FakeOpenAIServer) -> None:
    client = server.client()
    async with wrap_openai(client) as wrapped:
        with pytest.raises(InvalidInputTypeError):
            wrap_openai(wrapped)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        wrap_openai(client, provider=lambda query: None)
    with pytest.raises(InvalidInputError):
        wrap_openai(client, namespace="")
    with pytest.raises(InvalidInputTypeError):
        wrap_openai(client, namespace=42)  # type: ignore[arg-type]


def test_without_the_sdk_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    monkeypatch.delitem(sys.modules, "aiocache_llm.integrations.openai")
    with pytest.raises(ImportError, match=r"aiocache_llm\[openai\]"):
        importlib.import_module("aiocache_llm.integrations.openai")
    importlib.import_module("aiocache_llm.integrations")  # the package needs no SDK


async def test_a_hit_has_a_request_id_of_none_and_a_fresh_answer_its_own(
    server: FakeOpenAIServer,
) -> None:
    async with wrap_openai(server.client()) as wrapped:
        fresh = await wrapped.chat.completions.create(**QUERY)
        hit = await wrapped.chat.completions.create(**QUERY)
    assert server.requests == 1
    assert hit == fresh
    assert hit._request_id is None  # never AttributeError, never another response's id
    assert fresh._request_id is None or isinstance(fresh._request_id, str)
