"""``aiocache_llm.integrations.litellm`` with the real LiteLLM over real HTTP (a local server).

LiteLLM talks to :class:`FakeOpenAIServer` as an OpenAI-compatible endpoint
(``model="openai/..."``, ``api_base=<server>``). No test reaches the internet: LiteLLM is
told to use its bundled model cost map (``LITELLM_LOCAL_MODEL_COST_MAP``, set before it is
imported), and every test runs under a guard that records any connection or name lookup
for a host other than loopback and fails the test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# before litellm is imported (below, through the integration): otherwise its import
# downloads the model cost map
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import asyncio
import importlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import litellm
import pytest
from litellm.types.utils import ModelResponse, ModelResponseStream, Usage

from aiocache_llm import (
    InferenceGateway,
    InvalidInputError,
    InvalidInputTypeError,
    MemoryExactCache,
    MemoryRateLimiter,
    RateLimitConfig,
    RedisExactCache,
)
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.core.errors import CorruptEntryError
from aiocache_llm.integrations.litellm import (
    LiteLLMProvider,
    LiteLLMResponse,
    LiteLLMResponseChunk,
    LiteLLMStream,
    litellm_value_types,
)
from tests.conftest import RedisTarget
from tests.support.openai_server import FakeOpenAIServer

pytestmark = [
    pytest.mark.timeout(60),
    # LiteLLM's own models warn when pydantic builds their schemas: not ours to fix
    pytest.mark.filterwarnings("ignore:.*ReadOnly. qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

QUERY: dict[str, Any] = {"messages": [{"role": "user", "content": "what is the capital of France"}]}
ANSWER = "Echo: what is the capital of France"
ROOT = Path(__file__).resolve().parents[2]
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse, and record, every connection or name lookup for a non-loopback host.

    Recorded as well as refused: LiteLLM swallows some network errors (it falls back to
    bundled data), so a refusal alone could pass unnoticed.
    """
    attempts: list[str] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
            attempts.append(f"connect {address}")
            raise OSError(f"test network guard: no connection to {address}")
        connect(sock, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in _LOOPBACK:
            attempts.append(f"getaddrinfo {name}")
            raise OSError(f"test network guard: no lookup of {name}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield attempts
    assert attempts == [], f"a test tried to reach the network: {attempts}"


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


def provider_for(server: FakeOpenAIServer, **defaults: Any) -> LiteLLMProvider:
    return LiteLLMProvider(
        model="openai/gpt-test", api_base=server.base_url, api_key="test", **defaults
    )


async def read(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_reads_the_same(copy: ModelResponse, original: ModelResponse) -> None:
    """Everything a caller reads of an answer, compared field by field."""
    assert copy.id == original.id
    assert copy.created == original.created
    assert copy.model == original.model
    assert copy.object == original.object
    assert copy.system_fingerprint == original.system_fingerprint
    assert getattr(copy, "service_tier", None) == getattr(original, "service_tier", None)
    assert len(copy.choices) == len(original.choices)
    for mine, theirs in zip(copy.choices, original.choices, strict=True):
        assert mine.index == theirs.index
        assert mine.finish_reason == theirs.finish_reason
        assert mine.message.role == theirs.message.role
        assert mine.message.content == theirs.message.content
        assert mine.message.tool_calls == theirs.message.tool_calls
        assert getattr(mine, "logprobs", None) == getattr(theirs, "logprobs", None)
    usage, expected = copy.usage, original.usage  # type: ignore[attr-defined]
    assert isinstance(usage, Usage)
    assert usage.model_dump() == expected.model_dump()


# -- the round trip: why plain ModelResponse answers were never cached ----------------


async def test_a_litellm_response_does_not_round_trip_but_its_cacheable_copy_does(
    server: FakeOpenAIServer,
) -> None:
    original = await litellm.acompletion(
        model="openai/gpt-test", api_base=server.base_url, api_key="test", **QUERY
    )
    assert type(original) is ModelResponse
    validated = ModelResponse.model_validate_json(original.model_dump_json())
    assert validated != original  # the reported bug, at its root:
    assert original.hidden_params["api_base"] == server.base_url  # per-call metadata
    assert validated.hidden_params == {}  # that JSON does not hold
    with pytest.raises(InvalidInputError, match="does not survive a JSON round trip"):
        ValueCodec().encode(original)

    copy = LiteLLMResponse.from_response(original)
    assert isinstance(copy, ModelResponse)
    assert_reads_the_same(copy, original)
    assert copy.hidden_params == {}  # per-call metadata is not part of the answer
    codec = ValueCodec(litellm_value_types())
    decoded = codec.decode(codec.encode(copy))
    assert type(decoded) is LiteLLMResponse
    assert decoded == copy
    assert decoded is not copy
    assert_reads_the_same(decoded, original)


def test_tool_calls_logprobs_and_usage_details_round_trip() -> None:
    data = {
        "id": "chatcmpl-tools",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "b", "reasoning_content": "hm"},
                "logprobs": {
                    "content": [{"token": "b", "logprob": -0.5, "bytes": [98], "top_logprobs": []}]
                },
                "finish_reason": "length",
            },
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 4,
            "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    }
    response = LiteLLMResponse.model_validate(data)
    codec = ValueCodec(litellm_value_types())
    decoded = codec.decode(codec.encode(response))
    assert decoded == response
    call = decoded.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_1",
        "weather",
        '{"city":"Paris"}',
    )
    assert decoded.choices[1].message.reasoning_content == "hm"
    assert decoded.choices[1].logprobs.content[0].logprob == -0.5
    assert decoded.usage.prompt_tokens_details.cached_tokens == 3
    assert decoded.usage.completion_tokens_details.reasoning_tokens == 2


def test_stored_data_cannot_set_metadata_and_foreign_data_is_corrupt() -> None:
    codec = ValueCodec(litellm_value_types())
    planted = LiteLLMResponse.model_validate_json(
        b'{"id": "x", "choices": [], "hidden_params": {"api_base": "https://evil"}}'
    )
    assert planted.hidden_params == {}
    name = b"aiocache_llm.integrations.litellm.LiteLLMResponse\n"
    for payload in (b"[1, 2]", b'"text"', b"{not json"):
        header = b"acl\x01m" + len(name + payload).to_bytes(4, "big")
        with pytest.raises(CorruptEntryError):
            codec.decode(header + name + payload)


# -- through the gateway ----------------------------------------------------------------


async def test_a_second_identical_resolve_is_a_hit_with_an_equal_model_response(
    server: FakeOpenAIServer,
) -> None:
    async with InferenceGateway(provider_for(server)) as gateway:
        first = await gateway.resolve(QUERY)
        second = await gateway.resolve(QUERY)
        stats = gateway.stats()
    assert len(server.bodies) == 1
    assert server.bodies[0]["model"] == "gpt-test"  # the defaults reached LiteLLM
    assert "stream" not in server.bodies[0]
    assert (stats.exact_hits, stats.provider_calls) == (1, 1)
    assert isinstance(second, ModelResponse)
    assert second == first
    assert second is not first  # a fresh copy: mutating it never changes the cache
    assert second.choices[0].message.content == ANSWER
    assert_reads_the_same(second, first)


async def test_the_query_wins_over_the_defaults(server: FakeOpenAIServer) -> None:
    provider = provider_for(server, temperature=0.5)
    async with InferenceGateway(provider) as gateway:
        await gateway.resolve({**QUERY, "temperature": 0.0})
    assert server.bodies[0]["temperature"] == 0.0


async def test_provider_errors_reach_the_caller_and_are_not_cached(
    server: FakeOpenAIServer,
) -> None:
    server.status_error = 500
    async with InferenceGateway(provider_for(server, max_retries=0)) as gateway:
        with pytest.raises(litellm.exceptions.InternalServerError):
            await gateway.resolve(QUERY)
        failed_requests = len(server.bodies)
        server.status_error = None
        answer = await gateway.resolve(QUERY)
        stats = gateway.stats()
    assert len(server.bodies) == failed_requests + 1
    assert (stats.provider_errors, stats.exact_hits) == (1, 0)
    assert answer.choices[0].message.content == ANSWER


async def test_the_rate_limit_is_settled_with_the_usage_litellm_reports(
    server: FakeOpenAIServer,
) -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=100_000))
    streamed = {**QUERY, "stream": True, "stream_options": {"include_usage": True}}
    async with InferenceGateway(provider_for(server), rate_limiter=limiter) as gateway:
        answer = await gateway.resolve(QUERY, user_id="alice")
        chunks = await read(await gateway.resolve(streamed, user_id="bob"))
        await gateway.resolve(QUERY, user_id="alice")  # a hit costs nothing
    assert answer.usage.total_tokens > 0
    assert await limiter.get_remaining("alice") == 100_000 - answer.usage.total_tokens
    assert await limiter.get_remaining("bob") == 100_000 - chunks[-1].usage.total_tokens


@pytest.mark.redis
async def test_another_gateway_on_the_same_redis_prefix_reads_the_answer(
    server: FakeOpenAIServer, real_redis: RedisTarget
) -> None:
    provider = provider_for(server)

    def cache(**options: Any) -> RedisExactCache:
        return RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix, **options)

    async with (
        cache(value_types=provider.value_types) as writer_cache,
        InferenceGateway(provider, writer_cache) as writer,
    ):
        first = await writer.resolve(QUERY)
    # a cache that was not told the types cannot decode the entry: a counted miss
    async with cache() as unaware:
        assert await unaware.get(QUERY) is None
        assert (await unaware.stats()).undeclared_entries == 1
    async with (
        cache(value_types=provider.value_types) as reader_cache,
        InferenceGateway(provider, reader_cache) as reader,
    ):
        second = await reader.resolve(QUERY)
        assert reader.stats().exact_hits == 1
    assert len(server.bodies) == 1
    assert type(second) is LiteLLMResponse
    assert second == first
    assert_reads_the_same(second, first)


# -- streams ------------------------------------------------------------------------------


async def test_identical_concurrent_streams_make_one_http_stream_and_replay_equal(
    server: FakeOpenAIServer,
) -> None:
    server.chunk_delay = 0.02
    query = {**QUERY, "stream_options": {"include_usage": True}}
    async with InferenceGateway(provider_for(server)) as gateway:

        async def consumer(index: int) -> list[Any]:
            await asyncio.sleep(index * 0.002)
            return await read(gateway.stream(query))

        results = await asyncio.gather(*(consumer(i) for i in range(10)))
        hits_before = gateway.stats().stream_hits
        replay = await read(gateway.stream(query))
        hits_after = gateway.stats().stream_hits
    assert server.stream_requests == 1
    assert server.bodies[0]["stream"] is True
    assert all(result == results[0] for result in results)
    assert replay == results[0]
    assert hits_after == hits_before + 1  # the replay came from the cache
    assert text_of(replay) == ANSWER
    assert all(type(chunk) is LiteLLMResponseChunk for chunk in replay)
    assert all(isinstance(chunk, ModelResponseStream) for chunk in replay)
    usage = replay[-1].usage
    assert isinstance(usage, Usage)
    assert usage.total_tokens == results[0][-1].usage.total_tokens > 0


async def test_resolve_of_a_streamed_query_streams(server: FakeOpenAIServer) -> None:
    async with InferenceGateway(provider_for(server)) as gateway:
        chunks = await read(await gateway.resolve({**QUERY, "stream": True}))
    assert text_of(chunks) == ANSWER
    assert server.stream_requests == 1


@pytest.mark.redis
async def test_chunks_stored_on_redis_replay_through_another_gateway(
    server: FakeOpenAIServer, real_redis: RedisTarget
) -> None:
    provider = provider_for(server)

    def gateway() -> InferenceGateway:
        cache = RedisExactCache(
            client=real_redis.client,
            key_prefix=real_redis.prefix,
            value_types=provider.value_types,
        )
        return InferenceGateway(provider, cache)

    async with gateway() as first_gateway:
        first = await read(first_gateway.stream(QUERY))
    async with gateway() as second_gateway:
        second = await read(second_gateway.stream(QUERY))
        assert second_gateway.stats().stream_hits == 1
    assert server.stream_requests == 1
    assert second == first
    assert text_of(second) == ANSWER


async def test_provider_stream_closes_the_litellm_stream(server: FakeOpenAIServer) -> None:
    server.chunk_delay = 0.05
    server.pieces = 40
    stream = await provider_for(server).stream(QUERY)
    assert isinstance(stream, LiteLLMStream)
    first = await stream.__anext__()
    assert type(first) is LiteLLMResponseChunk
    await stream.aclose()
    await server.wait_for(lambda: server.streams_closed_early == 1)


# -- the provider's contract --------------------------------------------------------------


async def test_bad_queries_and_defaults_are_refused_before_any_call(
    server: FakeOpenAIServer,
) -> None:
    provider = provider_for(server)
    with pytest.raises(InvalidInputError, match="stream"):
        await provider.complete({**QUERY, "stream": True})
    with pytest.raises(InvalidInputTypeError, match="not a str"):
        await provider.complete("hello")
    with pytest.raises(InvalidInputError, match="stream is not a default"):
        LiteLLMProvider(model="openai/gpt-test", stream=True)
    assert server.requests == 0


def test_repr_and_defaults_never_show_secret_values() -> None:
    provider = LiteLLMProvider(model="openai/gpt-test", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(provider)
    assert repr(provider) == "LiteLLMProvider(api_key, model)"
    defaults = provider.defaults
    defaults["model"] = "changed"
    assert provider.defaults["model"] == "openai/gpt-test"
    assert provider.value_types == (LiteLLMResponse, LiteLLMResponseChunk)


async def test_a_memory_cache_given_the_value_types_stores_answers(
    server: FakeOpenAIServer,
) -> None:
    provider = provider_for(server)
    async with (
        MemoryExactCache(value_types=provider.value_types) as cache,
        InferenceGateway(provider, cache) as gateway,
    ):
        first = await gateway.resolve(QUERY)
        stored = await cache.get(QUERY)
    assert stored == first
    assert len(server.bodies) == 1


def test_without_litellm_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)  # import litellm now raises ImportError
    monkeypatch.delitem(sys.modules, "aiocache_llm.integrations.litellm")
    with pytest.raises(ImportError, match=r"aiocache_llm\[litellm\]"):
        importlib.import_module("aiocache_llm.integrations.litellm")
    importlib.import_module("aiocache_llm.integrations")  # the package needs no SDK


_GUARD = """
import socket

def refuse(what):
    raise SystemExit(f"network used: {what!r}")

_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo

def connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
        refuse(address)
    return _connect(sock, address)

def getaddrinfo(host, *args, **kwargs):
    if host is not None and host not in LOOPBACK:
        refuse(host)
    return _getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
"""


def test_the_readme_example_runs_offline_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Integrations: LiteLLM\n", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    # a fresh interpreter (this one imported litellm already), whose every connection or
    # lookup for a host other than loopback exits; the example itself keeps LiteLLM's
    # import offline, so the variable is removed here
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "LITELLM_LOCAL_MODEL_COST_MAP" and not name.upper().endswith("_PROXY")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    program = f"LOOPBACK = {sorted(_LOOPBACK)!r}\n{_GUARD}\n{code}"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", program],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert result.stdout.splitlines()[-2:] == ["Paris. 1", "Paris."]
