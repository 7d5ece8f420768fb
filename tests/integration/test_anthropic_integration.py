"""``aiocache_llm.integrations.anthropic`` with the real SDK over real HTTP (a local server).

``wrap_anthropic`` answers ``messages.create`` through the gateway with the SDK's own
types (``Message``, the raw stream events); ``AnthropicProvider`` is the provider it runs
on. No test reaches the internet.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import pytest
from anthropic.types import (
    Message,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
)
from pydantic import BaseModel

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
    RateLimitExceeded,
    RedisExactCache,
)
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.integrations.anthropic import (
    HEADERS_FIELD,
    AnthropicProvider,
    CachedAnthropic,
    anthropic_value_types,
    default_namespace,
    wrap_anthropic,
)
from tests.conftest import RedisTarget
from tests.support.anthropic_server import FakeAnthropicServer

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

QUERY: dict[str, Any] = {
    "model": "claude-test",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "what is the capital of France"}],
}
ANSWER = "Echo: what is the capital of France"
EVENT_TYPES = {
    RawMessageStartEvent,
    RawContentBlockStartEvent,
    RawContentBlockDeltaEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStopEvent,
}


@pytest.fixture
async def server() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer() as server:
        yield server


@pytest.fixture
async def wrapped(server: FakeAnthropicServer) -> AsyncIterator[CachedAnthropic]:
    async with wrap_anthropic(server.client()) as client:
        yield client


def text_of(events: list[Any]) -> str:
    return "".join(
        e.delta.text
        for e in events
        if isinstance(e, RawContentBlockDeltaEvent) and isinstance(e.delta, TextDelta)
    )


def message_text(message: Message) -> str:
    return "".join(block.text for block in message.content if isinstance(block, TextBlock))


async def read(stream: Any) -> list[Any]:
    return [event async for event in stream]


def without_ids(events: list[Any]) -> list[dict[str, Any]]:
    """The events as data, without the message id (each server answer has its own)."""
    dumped = [{"class": type(e).__name__, **e.model_dump(mode="json")} for e in events]
    for event in dumped:
        if "message" in event:
            event["message"].pop("id")
    return dumped


# -- plain and streamed answers -------------------------------------------------------


async def test_identical_creates_make_one_request_and_keep_the_sdk_type(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    first = await wrapped.messages.create(**QUERY)
    second = await wrapped.messages.create(**QUERY)
    assert server.requests == 1
    assert type(first) is Message
    assert type(second) is Message
    assert second == first
    assert second is not first
    assert message_text(second) == ANSWER
    assert wrapped.gateway.stats().exact_hits == 1


async def test_a_hit_has_response_ids_of_none_and_a_fresh_answer_its_own(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    fresh = await wrapped.messages.create(**QUERY)
    hit = await wrapped.messages.create(**QUERY)
    assert server.requests == 1
    assert hit == fresh
    # never an AttributeError, never another response's id
    assert (hit._request_id, hit._workspace_id) == (None, None)
    assert isinstance(fresh._request_id, str)
    assert fresh._request_id.startswith("req_")


async def test_identical_streams_make_one_stream_replayed_as_the_sdk_events(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    direct = await read(await server.client().messages.create(**QUERY, stream=True))
    stream = await wrapped.messages.create(**QUERY, stream=True)
    assert isinstance(stream, ChunkStream)
    streamed = await read(stream)
    replayed = await read(await wrapped.messages.create(**QUERY, stream=True))
    assert server.stream_requests == 2  # the direct call and one through the wrapper
    assert server.bodies[1]["stream"] is True
    # what the SDK itself yields: the same classes in the same order, the same data
    assert [type(event) for event in streamed] == [type(event) for event in direct]
    assert without_ids(streamed) == without_ids(direct)
    assert {type(event) for event in streamed} == EVENT_TYPES
    assert text_of(streamed) == ANSWER
    assert [type(event) for event in replayed] == [type(event) for event in streamed]
    assert replayed == streamed
    assert replayed[0] is not streamed[0]
    assert wrapped.gateway.stats().stream_hits == 1


async def test_plain_and_streamed_answers_never_mix(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    plain = await wrapped.messages.create(**QUERY)
    events = await read(await wrapped.messages.create(**QUERY, stream=True))
    plain_again = await wrapped.messages.create(**QUERY, stream=False)
    events_again = await read(await wrapped.messages.create(**QUERY, stream=True))
    assert server.requests == 2
    assert server.stream_requests == 1
    assert type(plain) is Message
    assert type(plain_again) is Message
    assert plain_again == plain
    assert all(type(event) in EVENT_TYPES for event in events + events_again)
    assert events_again == events


async def test_twenty_concurrent_streamed_creates_share_one_server_stream(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    server.chunk_delay = 0.02

    async def consumer(index: int) -> list[Any]:
        await asyncio.sleep(index * 0.003)  # some join while the stream is running
        return await read(await wrapped.messages.create(**QUERY, stream=True))

    results = await asyncio.gather(*(consumer(i) for i in range(20)))
    assert server.stream_requests == 1
    assert server.requests == 1
    assert all(text_of(result) == ANSWER for result in results)
    assert all(result == results[0] for result in results)
    assert type(results[-1][0]) is RawMessageStartEvent
    assert type(results[-1][-1]) is RawMessageStopEvent


# -- errors ---------------------------------------------------------------------------


async def test_status_errors_raise_the_sdk_error_and_are_not_cached(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    server.status_error = 429
    with pytest.raises(anthropic.RateLimitError) as plain_error:
        await wrapped.messages.create(**QUERY)
    with pytest.raises(anthropic.RateLimitError):  # before the first event: from create
        await wrapped.messages.create(**QUERY, stream=True)
    assert plain_error.value.status_code == 429
    assert (await wrapped.gateway.exact_cache.stats()).size == 0
    server.status_error = None
    message = await wrapped.messages.create(**QUERY)
    events = await read(await wrapped.messages.create(**QUERY, stream=True))
    assert message_text(message) == ANSWER
    assert text_of(events) == ANSWER
    assert server.requests == 4


async def test_a_stream_cut_mid_way_fails_every_consumer_after_its_events(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    server.fail_after = 2
    server.chunk_delay = 0.02

    async def consumer() -> tuple[list[Any], BaseException | None]:
        seen: list[Any] = []
        try:
            async for event in await wrapped.messages.create(**QUERY, stream=True):
                seen.append(event)
        except anthropic.APIConnectionError as exc:
            return seen, exc
        return seen, None

    results = await asyncio.gather(*(consumer() for _ in range(5)))
    assert server.stream_requests == 1
    assert server.streams_aborted == 1
    for seen, error in results:
        assert isinstance(error, anthropic.APIConnectionError)
        # message_start, content_block_start and two deltas, then the error
        assert [type(event) for event in seen] == [
            RawMessageStartEvent,
            RawContentBlockStartEvent,
            RawContentBlockDeltaEvent,
            RawContentBlockDeltaEvent,
        ]
        assert seen == results[0][0]
    assert (await wrapped.gateway.exact_cache.stats()).size == 0  # nothing stored
    server.fail_after = None
    assert text_of(await read(await wrapped.messages.create(**QUERY, stream=True))) == ANSWER
    assert server.stream_requests == 2


async def test_an_error_event_mid_stream_raises_the_sdk_error_after_the_events(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    server.error_after = 2
    seen: list[Any] = []

    async def consume() -> None:
        async for event in await wrapped.messages.create(**QUERY, stream=True):
            seen.append(event)

    with pytest.raises(anthropic.APIStatusError) as caught:
        await consume()
    assert server.streams_errored == 1
    # the SDK's own exception, as it raises it for an error event (the HTTP status was
    # 200, so the plain APIStatusError), with the API's body
    assert type(caught.value) is anthropic.APIStatusError
    assert "overloaded_error" in str(caught.value)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert [type(event) for event in seen] == [
        RawMessageStartEvent,
        RawContentBlockStartEvent,
        RawContentBlockDeltaEvent,
        RawContentBlockDeltaEvent,
    ]
    assert text_of(seen) == " ".join(ANSWER.split()[:2]) + " "
    assert (await wrapped.gateway.exact_cache.stats()).size == 0  # nothing stored
    server.error_after = None
    assert text_of(await read(await wrapped.messages.create(**QUERY, stream=True))) == ANSWER
    assert server.stream_requests == 2  # the identical request reached the server again
    assert server.streams_completed == 1


class SlowStreamingClient:
    """An AsyncAnthropic look-alike whose stream never sends its first event."""

    base_url = "http://slow.example"

    def __init__(self) -> None:
        self.messages = SimpleNamespace(create=self.create)
        self.stream_closed = asyncio.Event()

    async def create(self, **kwargs: Any) -> AsyncIterator[str]:
        async def events() -> AsyncIterator[str]:
            try:
                await asyncio.sleep(30)
                yield "never"
            finally:
                self.stream_closed.set()

        return events()


async def test_cancelling_a_streamed_create_before_its_first_event_closes_the_stream() -> None:
    client = SlowStreamingClient()
    async with wrap_anthropic(client) as wrapped:  # type: ignore[arg-type]
        task = asyncio.create_task(wrapped.messages.create(**QUERY, stream=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # nobody holds the stream any more: it is abandoned and the provider's closed
        await asyncio.wait_for(client.stream_closed.wait(), timeout=2)
        assert wrapped.gateway.stats().streams_abandoned == 1


# -- per-request cache control --------------------------------------------------------


async def test_no_cache_asks_again_and_stores_the_fresh_answer(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    server.reply = lambda body: "first answer"
    await wrapped.messages.create(**QUERY)
    server.reply = lambda body: "fresh answer"
    fresh = await wrapped.messages.create(**QUERY, cache={"no_cache": True})
    cached = await wrapped.messages.create(**QUERY)
    assert server.requests == 2
    assert message_text(fresh) == "fresh answer"
    assert message_text(cached) == "fresh answer"
    assert "cache" not in server.bodies[1]  # never sent to the API


async def test_no_store_keeps_the_answer_out_of_the_cache(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    await wrapped.messages.create(**QUERY, cache={"no_store": True})
    await read(await wrapped.messages.create(**QUERY, stream=True, cache={"no_store": True}))
    assert (await wrapped.gateway.exact_cache.stats()).size == 0
    await wrapped.messages.create(**QUERY)
    await read(await wrapped.messages.create(**QUERY, stream=True))
    assert server.requests == 4
    assert server.stream_requests == 2
    assert (await wrapped.gateway.exact_cache.stats()).size == 2


async def test_ttl_seconds_bounds_the_entry(server: FakeAnthropicServer) -> None:
    async with wrap_anthropic(server.client(), ttl_seconds=3600) as wrapped:
        await wrapped.messages.create(**QUERY, cache={"ttl_seconds": 0.05})
        await asyncio.sleep(0.1)
        await wrapped.messages.create(**QUERY)
        await wrapped.messages.create(**QUERY)
    assert server.requests == 2


@pytest.mark.parametrize(
    ("cache", "error"),
    [
        pytest.param("no_cache", InvalidInputTypeError, id="not-a-mapping"),
        pytest.param({"no_cahce": True}, InvalidInputError, id="unknown-option"),
        pytest.param({"no_store": "yes"}, InvalidInputTypeError, id="not-a-bool"),
        pytest.param({"ttl_seconds": -1}, InvalidInputError, id="negative-ttl"),
        pytest.param({"user_id": ""}, InvalidInputError, id="empty-user"),
    ],
)
async def test_bad_cache_options_raise_before_any_request(
    server: FakeAnthropicServer, wrapped: CachedAnthropic, cache: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await wrapped.messages.create(**QUERY, cache=cache)
    with pytest.raises(error):
        await wrapped.messages.create(**QUERY, stream=True, cache=cache)
    assert server.requests == 0


# -- rate limiting: Anthropic usage is input_tokens / output_tokens -------------------


async def test_a_plain_answer_is_charged_its_input_and_output_tokens(
    server: FakeAnthropicServer,
) -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=100_000))
    async with wrap_anthropic(server.client(), rate_limiter=limiter) as wrapped:
        message = await wrapped.messages.create(**QUERY, cache={"user_id": "alice"})
        await wrapped.messages.create(**QUERY, cache={"user_id": "bob"})  # a hit: free
    # the question's 29 characters // 4 + 1 in, the answer's 7 words out
    assert (message.usage.input_tokens, message.usage.output_tokens) == (8, 7)
    used = message.usage.input_tokens + message.usage.output_tokens
    assert await limiter.get_remaining("alice") == 100_000 - used
    assert await limiter.get_remaining("bob") == 100_000


async def test_a_streamed_answer_is_charged_the_usage_its_events_report(
    server: FakeAnthropicServer,
) -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=100_000))
    async with wrap_anthropic(server.client(), rate_limiter=limiter) as wrapped:
        events = await read(
            await wrapped.messages.create(**QUERY, stream=True, cache={"user_id": "carol"})
        )
        await read(await wrapped.messages.create(**QUERY, stream=True, cache={"user_id": "dan"}))
    start, delta = events[0], events[-2]
    assert isinstance(start, RawMessageStartEvent)
    assert isinstance(delta, RawMessageDeltaEvent)
    # input from message_start, the final (cumulative) output from message_delta
    assert (start.message.usage.input_tokens, delta.usage.output_tokens) == (8, 7)
    used = start.message.usage.input_tokens + delta.usage.output_tokens
    assert await limiter.get_remaining("carol") == 100_000 - used
    assert await limiter.get_remaining("dan") == 100_000


async def test_the_reservation_counts_max_tokens_before_any_request(
    server: FakeAnthropicServer,
) -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=200))
    async with wrap_anthropic(server.client(), rate_limiter=limiter) as wrapped:
        # the estimate is the prompt plus the max_tokens allowance (256): never grantable
        with pytest.raises(RateLimitExceeded):
            await wrapped.messages.create(**QUERY, cache={"user_id": "erin"})
        assert server.requests == 0
        small = await wrapped.messages.create(
            **{**QUERY, "max_tokens": 50}, cache={"user_id": "erin"}
        )
    # then settled with what the answer reports
    used = small.usage.input_tokens + small.usage.output_tokens
    assert await limiter.get_remaining("erin") == 200 - used


# -- what is keyed, what is sent ------------------------------------------------------


async def test_sdk_only_arguments_stay_out_of_the_key_and_reach_the_sdk(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    await wrapped.messages.create(**QUERY)
    again = await wrapped.messages.create(
        **QUERY,
        timeout=30.0,
        extra_headers={"X-Trace": "abc"},
        system=anthropic.NOT_GIVEN,
        stop_sequences=anthropic.omit,
        metadata={"user_id": "someone"},
    )
    assert server.requests == 1
    assert message_text(again) == ANSWER
    # an argument that changes the answer is a different key, and is sent as given
    await wrapped.messages.create(**QUERY, system="Answer in French.")
    assert server.requests == 2
    assert server.bodies[-1]["system"] == "Answer in French."


async def test_workspace_and_beta_headers_are_keyed(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    await wrapped.messages.create(**QUERY)
    await wrapped.messages.create(**QUERY, workspace_id="wrkspc_a")  # another account
    await wrapped.messages.create(**QUERY, extra_headers={"Anthropic-Workspace-Id": "wrkspc_b"})
    await wrapped.messages.create(**QUERY, extra_headers={"anthropic-beta": "feature-x"})
    await wrapped.messages.create(**QUERY, extra_headers={"anthropic-beta": "feature-x"})
    assert server.requests == 4
    assert server.headers[1]["anthropic-workspace-id"] == "wrkspc_a"
    assert server.headers[2]["anthropic-workspace-id"] == "wrkspc_b"
    assert server.headers[3]["anthropic-beta"] == "feature-x"
    key = wrapped.key_query({**QUERY, "extra_headers": {"Anthropic-Beta": "b", "X-Key": "s"}})
    assert key[HEADERS_FIELD] == {"anthropic-beta": "b"}  # only the keyed ones


async def test_one_shot_message_iterables_are_keyed_and_sent_whole(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    messages = QUERY["messages"]
    first = await wrapped.messages.create(
        model="claude-test", max_tokens=256, messages=iter(messages)
    )
    second = await wrapped.messages.create(
        model="claude-test", max_tokens=256, messages=tuple(messages)
    )
    assert server.requests == 1
    assert server.bodies[0]["messages"] == messages
    assert second == first


async def test_a_returned_message_in_the_history_is_keyed_like_its_dict(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    answer = await wrapped.messages.create(**QUERY)
    follow_up = {"role": "user", "content": "and of Italy"}
    as_objects = {"role": "assistant", "content": answer.content}
    as_dicts = {
        "role": "assistant",
        "content": [block.model_dump(mode="json", exclude_unset=True) for block in answer.content],
    }
    first = await wrapped.messages.create(
        model="claude-test", max_tokens=256, messages=[*QUERY["messages"], as_objects, follow_up]
    )
    second = await wrapped.messages.create(
        model="claude-test", max_tokens=256, messages=[*QUERY["messages"], as_dicts, follow_up]
    )
    assert server.requests == 2
    assert message_text(first) == "Echo: and of Italy"
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


async def test_a_cache_without_a_codec_is_used_as_is(server: FakeAnthropicServer) -> None:
    cache = DictCache()
    async with wrap_anthropic(server.client(), exact_cache=cache) as wrapped:
        first = await wrapped.messages.create(**QUERY)
        second = await wrapped.messages.create(**QUERY)
    assert server.requests == 1
    assert len(cache.entries) == 1
    assert second == first


async def test_a_supplied_memory_cache_learns_every_sdk_type(server: FakeAnthropicServer) -> None:
    cache = MemoryExactCache()
    async with wrap_anthropic(server.client(), exact_cache=cache) as wrapped:
        await wrapped.messages.create(**QUERY)
    # registered up front: entries written elsewhere decode before this cache stored any
    samples = [
        RawMessageStopEvent(type="message_stop"),
        RawContentBlockStopEvent(type="content_block_stop", index=0),
        RawContentBlockStartEvent.model_validate(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
    ]
    for sample in samples:
        data = ValueCodec().encode(sample)
        assert type(cache.codec.decode(data)) is type(sample)
    await cache.put("still open", "yes")  # the cache stays the caller's: not closed
    assert await cache.get("still open") == "yes"


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
            },
            id="tool-use-start",
        ),
        pytest.param(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'},
            },
            id="input-json-delta",
        ),
        pytest.param(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me see"},
            },
            id="thinking-delta",
        ),
        pytest.param(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQB"},
            },
            id="signature-delta",
        ),
    ],
)
def test_tool_use_and_thinking_events_are_storable(event: dict[str, Any]) -> None:
    # the fake server streams text only: the other event shapes must round-trip too,
    # or a tool-use or thinking stream would silently never be stored
    classes: dict[str, type[BaseModel]] = {
        "content_block_start": RawContentBlockStartEvent,
        "content_block_delta": RawContentBlockDeltaEvent,
    }
    value = classes[event["type"]].model_validate(event)
    codec = ValueCodec(anthropic_value_types())
    decoded = codec.decode(codec.encode(value))
    assert type(decoded) is type(value)
    assert decoded == value
    assert decoded.model_dump(mode="json") == value.model_dump(mode="json")


@pytest.mark.redis
async def test_a_second_wrapper_on_the_same_redis_prefix_reads_the_first_ones_entries(
    server: FakeAnthropicServer, real_redis: RedisTarget
) -> None:
    def redis_cache() -> RedisExactCache:  # no value_types: the wrapper registers them
        return RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix)

    async with wrap_anthropic(server.client(), exact_cache=redis_cache()) as first:
        plain = await first.messages.create(**QUERY)
        streamed = await read(await first.messages.create(**QUERY, stream=True))
    # another process: its own cache object and client on the same prefix and server
    async with wrap_anthropic(server.client(), exact_cache=redis_cache()) as second:
        plain_again = await second.messages.create(**QUERY)
        replayed = await read(await second.messages.create(**QUERY, stream=True))
        stats = second.gateway.stats()
    assert server.requests == 2
    assert (stats.exact_hits, stats.stream_hits) == (2, 1)
    assert stats.provider_calls == 0
    assert type(plain_again) is Message
    assert plain_again == plain
    assert [type(event) for event in replayed] == [type(event) for event in streamed]
    assert replayed == streamed
    assert text_of(replayed) == ANSWER


# -- tenancy and secrets --------------------------------------------------------------


async def test_clients_of_different_servers_never_share_entries() -> None:
    async with FakeAnthropicServer() as one, FakeAnthropicServer() as two:
        one.reply = lambda body: "from server one"
        two.reply = lambda body: "from server two"
        cache = MemoryExactCache()
        async with (
            wrap_anthropic(one.client(), exact_cache=cache) as first,
            wrap_anthropic(two.client(), exact_cache=cache) as second,
        ):
            a = await first.messages.create(**QUERY)
            b = await second.messages.create(**QUERY)
            await read(await first.messages.create(**QUERY, stream=True))
            streamed = await read(await second.messages.create(**QUERY, stream=True))
        assert first.namespace != second.namespace
        assert (one.requests, two.requests) == (2, 2)
        assert message_text(a) == "from server one"
        assert message_text(b) == "from server two"
        assert text_of(streamed) == "from server two"


async def test_client_level_workspaces_never_share_entries(server: FakeAnthropicServer) -> None:
    cache = MemoryExactCache()
    workspace_a = {"default_headers": {"anthropic-workspace-id": "wrkspc_a"}}
    workspace_b = {"default_headers": {"anthropic-workspace-id": "wrkspc_b"}}
    async with (
        wrap_anthropic(server.client(**workspace_a), exact_cache=cache) as first,
        wrap_anthropic(server.client(**workspace_b), exact_cache=cache) as second,
        wrap_anthropic(server.client(), exact_cache=cache) as third,
    ):
        for wrapper in (first, second, third):
            await wrapper.messages.create(**QUERY)
    assert server.requests == 3
    assert (await cache.stats()).size == 3


async def test_the_api_key_does_not_split_the_namespace(server: FakeAnthropicServer) -> None:
    cache = MemoryExactCache()
    async with (
        wrap_anthropic(server.client(api_key="sk-one"), exact_cache=cache) as first,
        wrap_anthropic(server.client(api_key="sk-two"), exact_cache=cache) as second,
    ):
        await first.messages.create(**QUERY)
        await second.messages.create(**QUERY)
    assert first.namespace == second.namespace
    assert server.requests == 1


async def test_a_common_namespace_opts_in_to_sharing() -> None:
    async with FakeAnthropicServer() as one, FakeAnthropicServer() as two:
        cache = MemoryExactCache()
        async with (
            wrap_anthropic(one.client(), exact_cache=cache, namespace="eu") as first,
            wrap_anthropic(two.client(), exact_cache=cache, namespace="eu") as second,
        ):
            a = await first.messages.create(**QUERY)
            b = await second.messages.create(**QUERY)
            streamed = await read(await first.messages.create(**QUERY, stream=True))
            replayed = await read(await second.messages.create(**QUERY, stream=True))
        assert (one.requests, two.requests) == (2, 0)
        assert b == a
        assert replayed == streamed


async def test_a_shared_semantic_cache_keeps_namespaces_apart(
    server: FakeAnthropicServer,
) -> None:
    semantic = MemorySemanticCache(HashingEmbedder(), similarity_threshold=0.5)
    paraphrase = {**QUERY, "messages": [{"role": "user", "content": "capital of France?"}]}
    workspace_b = {"default_headers": {"anthropic-workspace-id": "wrkspc_b"}}
    async with (
        wrap_anthropic(server.client(), semantic_cache=semantic) as first,
        wrap_anthropic(server.client(**workspace_b), semantic_cache=semantic) as second,
    ):
        await first.messages.create(**QUERY)
        hit = await first.messages.create(**paraphrase)  # same namespace: a hit
        assert server.requests == 1
        assert message_text(hit) == ANSWER
        other = await second.messages.create(**paraphrase)  # another workspace
    assert server.requests == 2
    assert message_text(other) == "Echo: capital of France?"


def test_the_default_namespace_leaves_credentials_out() -> None:
    client = anthropic.AsyncAnthropic(
        api_key="sk-ant-SECRET",
        base_url="https://user:pw-SECRET@llm.example:8443/anthropic/?key=q-SECRET",
        default_headers={"X-Api-Key": "hdr-SECRET", "anthropic-workspace-id": "wrkspc_1"},
    )
    namespace = default_namespace(client)
    assert "SECRET" not in namespace
    assert "llm.example:8443/anthropic" in namespace
    assert "wrkspc_1" in namespace


@pytest.mark.redis
async def test_api_keys_and_auth_headers_are_never_stored_or_logged(
    server: FakeAnthropicServer, real_redis: RedisTarget, caplog: pytest.LogCaptureFixture
) -> None:
    api_key = f"sk-ant-SECRET-{uuid.uuid4().hex}"
    header_secret = f"hdr-SECRET-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    cache = RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix)
    async with wrap_anthropic(server.client(api_key=api_key), exact_cache=cache) as wrapped:
        secret_headers = {"X-Api-Key": header_secret}
        await wrapped.messages.create(**QUERY, extra_headers=secret_headers)
        await wrapped.messages.create(**QUERY, extra_headers=secret_headers)
        await read(
            await wrapped.messages.create(**QUERY, stream=True, extra_headers=secret_headers)
        )
        server.status_error = 401
        with pytest.raises(anthropic.AuthenticationError):
            await wrapped.messages.create(**QUERY, system="other", extra_headers=secret_headers)
        assert api_key not in repr(wrapped)
        assert api_key not in wrapped.namespace
    assert server.requests == 3
    assert server.headers[0]["authorization"] == f"Bearer {api_key}"  # both were sent
    assert server.headers[0]["x-api-key"] == header_secret

    redis: Any = real_redis.client  # returns bytes: decode_responses is off
    stored: list[bytes] = []
    async for key in redis.scan_iter(match=f"{real_redis.prefix}*"):
        stored.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            stored.append(await redis.get(key))
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                stored.extend(b"%s=%s" % item for item in fields.items())
        elif kind == "zset":
            stored.extend(await redis.zrange(key, 0, -1))
        elif kind == "hash":
            stored.extend(b"%s=%s" % item for item in (await redis.hgetall(key)).items())
        else:
            stored.append(repr(await redis.dump(key)).encode())
    blob = b"\n".join(stored)
    assert b"Echo: what is the capital of France" in blob  # the values were read
    assert b"content_block_delta" in blob  # the stream too
    assert api_key.encode() not in blob
    assert header_secret.encode() not in blob

    logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert any(record.name.startswith("anthropic") for record in caplog.records)  # it captured
    assert api_key not in logged
    assert header_secret not in logged
    assert "<redacted>" in logged  # the SDK logged the header: its value was replaced


# -- the rest of the client, the provider, the module --------------------------------


async def test_other_attributes_pass_through_to_the_client(
    server: FakeAnthropicServer, wrapped: CachedAnthropic
) -> None:
    client = wrapped.client
    assert wrapped.models is client.models
    assert wrapped.base_url == client.base_url
    assert wrapped.messages.count_tokens == client.messages.count_tokens
    assert wrapped.messages.with_raw_response is not None
    with pytest.raises(anthropic.NotFoundError):  # the local server only knows messages
        await wrapped.models.list()
    assert server.requests == 1  # it went out, uncached
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute


async def test_the_provider_runs_a_gateway_built_by_hand(server: FakeAnthropicServer) -> None:
    provider = AnthropicProvider(server.client())
    assert set(provider.value_types) == {Message, *EVENT_TYPES}
    assert provider.value_types == anthropic_value_types()
    cache = MemoryExactCache(value_types=provider.value_types)
    async with InferenceGateway(provider, exact_cache=cache) as gateway:
        plain = await gateway.resolve(QUERY)
        events = await read(gateway.stream(QUERY))
        replayed = await read(await gateway.resolve({**QUERY, "stream": True}))
    assert type(plain) is Message
    assert text_of(events) == ANSWER
    assert replayed == events
    assert (server.requests, server.stream_requests) == (2, 1)
    with pytest.raises(InvalidInputError):
        await provider.complete({**QUERY, "stream": True})
    with pytest.raises(InvalidInputTypeError):
        await provider.complete("a bare string has no model")


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(object(), id="object"),
        pytest.param(anthropic.Anthropic(api_key="x", base_url="http://127.0.0.1:9"), id="sync"),
    ],
)
def test_a_client_that_is_not_an_async_anthropic_is_refused(client: Any) -> None:
    with pytest.raises(InvalidInputTypeError):
        AnthropicProvider(client)
    with pytest.raises(InvalidInputTypeError):
        wrap_anthropic(client)


async def test_bad_wrap_options_are_refused(server: FakeAnthropicServer) -> None:
    client = server.client()
    async with wrap_anthropic(client) as wrapped:
        with pytest.raises(InvalidInputTypeError):
            wrap_anthropic(wrapped)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputTypeError):
            await wrapped.messages.create(**QUERY, stream="yes")  # type: ignore[call-overload]
    with pytest.raises(InvalidInputError):
        wrap_anthropic(client, provider=lambda query: None)
    with pytest.raises(InvalidInputError):
        wrap_anthropic(client, namespace="")
    with pytest.raises(InvalidInputTypeError):
        wrap_anthropic(client, namespace=42)  # type: ignore[arg-type]
    assert server.requests == 0


def test_without_the_sdk_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    importlib.import_module("aiocache_llm.integrations.anthropic")
    monkeypatch.setitem(sys.modules, "anthropic", None)  # import anthropic now raises ImportError
    monkeypatch.delitem(sys.modules, "aiocache_llm.integrations.anthropic")
    with pytest.raises(ImportError, match=r"aiocache_llm\[anthropic\]"):
        importlib.import_module("aiocache_llm.integrations.anthropic")
    importlib.import_module("aiocache_llm.integrations")  # the package needs no SDK


async def test_the_readme_example_runs_as_written(server: FakeAnthropicServer) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Integrations: Anthropic\n", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().endswith("_PROXY") and not name.startswith("ANTHROPIC_")
    }
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(PYTHONPATH=pythonpath, ANTHROPIC_BASE_URL=server.base_url, ANTHROPIC_API_KEY="test")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=50)
    assert process.returncode == 0, err.decode()
    answer = "Echo: Capital of France?"
    assert out.decode().splitlines() == [answer, answer, answer, answer, "2 API calls"]
    assert (server.requests, server.stream_requests) == (2, 1)
