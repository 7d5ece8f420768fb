"""Self-test of ``tests.support.openai_server``: the real ``openai`` SDK against the fake server.

The clients use ``_strict_response_validation=True`` so that every response and chunk is
validated against the SDK's pydantic types, not merely constructed from them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from tests.support.openai_server import FakeOpenAIServer, split_pieces

pytestmark = pytest.mark.timeout(10)

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello big world"},
]
ECHO = "Echo: hello big world"
# "Be brief." + "hello big world" = 24 characters -> 24 // 4 + 1 prompt tokens;
# "Echo: ", "hello ", "big ", "world" -> 4 completion tokens.
PROMPT_TOKENS = 7
COMPLETION_TOKENS = 4


async def collect_contents(
    stream: openai.AsyncStream[ChatCompletionChunk], into: list[str | None]
) -> None:
    """Append each chunk's ``delta.content`` to ``into`` until the stream ends or fails."""
    async for chunk in stream:
        into.append(chunk.choices[0].delta.content)


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as running:
        yield running


@pytest.fixture
def client(server: FakeOpenAIServer) -> openai.AsyncOpenAI:
    return server.client(_strict_response_validation=True)


def test_split_pieces_rejoin_exactly() -> None:
    assert split_pieces(ECHO) == ["Echo: ", "hello ", "big ", "world"]
    assert split_pieces("  two  words ") == ["  ", "two  ", "words "]
    assert split_pieces("") == []
    for count in (1, 3, 20, 100):
        pieces = split_pieces(ECHO, count)
        assert "".join(pieces) == ECHO
        assert len(pieces) == min(count, len(ECHO))


async def test_non_streaming_completion(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    assert isinstance(completion, ChatCompletion)
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-test"
    assert completion.id.startswith("chatcmpl-")
    assert completion.system_fingerprint == server.system_fingerprint
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == ECHO
    assert choice.message.refusal is None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens == COMPLETION_TOKENS
    assert completion.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    assert server.requests == 1
    assert server.stream_requests == 0
    assert server.bodies[0]["messages"] == MESSAGES


async def test_streamed_completion_with_usage(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.model for chunk in chunks} == {"gpt-test"}
    first, *middle, finish, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert [chunk.choices[0].delta.content for chunk in middle] == split_pieces(ECHO)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == ECHO
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == PROMPT_TOKENS
    assert last.usage.completion_tokens == COMPLETION_TOKENS
    assert last.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    await server.wait_for(lambda: server.streams_completed == 1)
    assert server.stream_requests == 1
    assert server.streams_closed_early == 0
    assert server.bodies[0]["stream_options"] == {"include_usage": True}


async def test_streamed_completion_without_usage(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    server.pieces = 5
    stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]

    assert len(chunks) == 1 + 5 + 1
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ECHO
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "usage" not in chunks[0].model_fields_set


async def test_fail_after_cuts_the_stream(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    server.fail_after = 2
    stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    contents: list[str | None] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        await collect_contents(stream, contents)

    assert contents == ["", "Echo: ", "hello "]
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    assert server.streams_aborted == 1
    assert server.streams_closed_early == 0
    assert server.streams_completed == 0

    server.fail_after = None
    completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == ECHO


async def test_status_error(server: FakeOpenAIServer, client: openai.AsyncOpenAI) -> None:
    server.status_error = 429
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "requests"

    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)

    server.status_error = 500
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    assert server.requests == 3
    assert server.stream_requests == 1
    assert len(server.bodies) == 3


async def test_unknown_path_is_not_found(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.models.list()
    assert server.requests == 1
    assert server.bodies == []


async def test_client_closing_early_is_counted(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    server.chunk_delay = 0.05
    server.pieces = 20
    stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    async for _chunk in stream:
        break
    await stream.close()

    await server.wait_for(lambda: server.streams_closed_early == 1, timeout=2.0)
    assert server.streams_completed == 0
    assert server.streams_aborted == 0


async def test_reset_clears_counters_and_controls(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    server.status_error = 503
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    server.reset()
    assert (server.requests, server.stream_requests, server.bodies) == (0, 0, [])
    completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == ECHO
    assert server.requests == 1
