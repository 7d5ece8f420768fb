"""Self-test of ``tests.support.anthropic_server``: the real ``anthropic`` SDK against it.

The clients use ``_strict_response_validation=True`` so that every response and event is
validated against the SDK's pydantic types, not merely constructed from them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import httpx2
import pytest
from anthropic.types import (
    Message,
    MessageParam,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlock,
    TextDelta,
)

from tests.support.anthropic_server import FakeAnthropicServer, split_pieces

pytestmark = pytest.mark.timeout(10)

SYSTEM = "Be brief."
MESSAGES: list[MessageParam] = [{"role": "user", "content": "hello big world"}]
ECHO = "Echo: hello big world"
# "Be brief." + "hello big world" = 24 characters -> 24 // 4 + 1 input tokens;
# "Echo: ", "hello ", "big ", "world" -> 4 output tokens.
INPUT_TOKENS = 7
OUTPUT_TOKENS = 4


async def collect(
    stream: anthropic.AsyncStream[RawMessageStreamEvent], into: list[RawMessageStreamEvent]
) -> None:
    """Append each event to ``into`` until the stream ends or fails."""
    async for event in stream:
        into.append(event)


@pytest.fixture
async def server() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer() as running:
        yield running


@pytest.fixture
def client(server: FakeAnthropicServer) -> anthropic.AsyncAnthropic:
    return server.client(_strict_response_validation=True)


async def create(client: anthropic.AsyncAnthropic) -> Message:
    return await client.messages.create(
        model="claude-test", max_tokens=64, system=SYSTEM, messages=MESSAGES
    )


async def open_stream(
    client: anthropic.AsyncAnthropic,
) -> anthropic.AsyncStream[RawMessageStreamEvent]:
    return await client.messages.create(
        model="claude-test", max_tokens=64, system=SYSTEM, messages=MESSAGES, stream=True
    )


async def test_non_streaming_message(
    server: FakeAnthropicServer, client: anthropic.AsyncAnthropic
) -> None:
    message = await create(client)

    assert type(message) is Message
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "claude-test"
    assert message.id.startswith("msg_")
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    [block] = message.content
    assert isinstance(block, TextBlock)
    assert block.text == ECHO
    assert message.usage.input_tokens == INPUT_TOKENS
    assert message.usage.output_tokens == OUTPUT_TOKENS
    assert message.usage.cache_read_input_tokens == 0
    assert (server.requests, server.stream_requests) == (1, 0)
    assert server.bodies[0]["messages"] == MESSAGES
    assert server.bodies[0]["system"] == SYSTEM
    assert server.headers[0]["authorization"] == "Bearer test"


async def test_streamed_message_follows_the_api_event_sequence(
    server: FakeAnthropicServer, client: anthropic.AsyncAnthropic
) -> None:
    events: list[RawMessageStreamEvent] = []
    await collect(await open_stream(client), events)

    # the SDK drops the ping; every other event arrives as its own class, in order
    kinds = [type(event) for event in events]
    assert kinds == [
        RawMessageStartEvent,
        RawContentBlockStartEvent,
        *[RawContentBlockDeltaEvent] * OUTPUT_TOKENS,
        RawContentBlockStopEvent,
        RawMessageDeltaEvent,
        RawMessageStopEvent,
    ]
    start, block_start, *deltas, block_stop, message_delta, _ = events
    assert isinstance(start, RawMessageStartEvent)
    assert start.message.content == []
    assert start.message.stop_reason is None
    assert start.message.usage.input_tokens == INPUT_TOKENS
    assert isinstance(block_start, RawContentBlockStartEvent)
    assert block_start.content_block == TextBlock(type="text", text="")
    texts = []
    for delta in deltas:
        assert isinstance(delta, RawContentBlockDeltaEvent)
        assert isinstance(delta.delta, TextDelta)
        assert delta.index == 0
        texts.append(delta.delta.text)
    assert texts == split_pieces(ECHO)
    assert isinstance(block_stop, RawContentBlockStopEvent)
    assert isinstance(message_delta, RawMessageDeltaEvent)
    assert message_delta.delta.stop_reason == "end_turn"
    assert message_delta.usage.output_tokens == OUTPUT_TOKENS
    await server.wait_for(lambda: server.streams_completed == 1)
    assert (server.stream_requests, server.streams_closed_early) == (1, 0)


async def test_the_wire_format_has_event_lines_and_a_ping(server: FakeAnthropicServer) -> None:
    # read the raw SSE, below the SDK, which hides the ping and the event names
    async with httpx2.AsyncClient(trust_env=False) as http:
        response = await http.post(
            f"{server.base_url}/v1/messages",
            json={"model": "m", "max_tokens": 8, "messages": MESSAGES, "stream": True},
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == ""
    names = [block.split("\n")[0] for block in blocks[:-1]]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert names[-3:] == [
        "event: content_block_stop",
        "event: message_delta",
        "event: message_stop",
    ]
    assert all(block.split("\n")[1].startswith("data: {") for block in blocks[:-1])


async def test_fail_after_cuts_the_stream(
    server: FakeAnthropicServer, client: anthropic.AsyncAnthropic
) -> None:
    server.fail_after = 2
    stream = await open_stream(client)
    events: list[RawMessageStreamEvent] = []
    with pytest.raises(anthropic.APIConnectionError):
        await collect(stream, events)

    assert [type(event) for event in events] == [
        RawMessageStartEvent,
        RawContentBlockStartEvent,
        RawContentBlockDeltaEvent,
        RawContentBlockDeltaEvent,
    ]
    assert (server.streams_aborted, server.streams_completed) == (1, 0)
    assert server.streams_closed_early == 0

    server.fail_after = None
    message = await create(client)
    assert isinstance(message.content[0], TextBlock)
    assert message.content[0].text == ECHO


async def test_status_error_has_the_api_error_shape(
    server: FakeAnthropicServer, client: anthropic.AsyncAnthropic
) -> None:
    server.status_error = 429
    with pytest.raises(anthropic.RateLimitError) as caught:
        await create(client)
    assert caught.value.status_code == 429
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "rate_limit_error"

    with pytest.raises(anthropic.RateLimitError):
        await open_stream(client)

    server.status_error = 529
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await create(client)
    assert overloaded.value.status_code == 529

    assert (server.requests, server.stream_requests, len(server.bodies)) == (3, 1, 3)


async def test_unknown_path_is_not_found(
    server: FakeAnthropicServer, client: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(anthropic.NotFoundError):
        await client.models.list()
    assert server.requests == 1
    assert server.bodies == []


async def test_client_closing_early_is_counted(
    server: FakeAnthropicServer, client: anthropic.AsyncAnthropic
) -> None:
    server.chunk_delay = 0.05
    server.pieces = 20
    stream = await open_stream(client)
    async for _event in stream:
        break
    await stream.close()

    await server.wait_for(lambda: server.streams_closed_early == 1, timeout=2.0)
    assert (server.streams_completed, server.streams_aborted) == (0, 0)


async def test_reset_clears_counters_and_controls(
    server: FakeAnthropicServer, client: anthropic.AsyncAnthropic
) -> None:
    server.status_error = 500
    with pytest.raises(anthropic.InternalServerError):
        await create(client)
    server.reset()
    assert (server.requests, server.stream_requests, server.bodies) == (0, 0, [])
    message = await create(client)
    assert message.stop_reason == "end_turn"
    assert server.requests == 1
