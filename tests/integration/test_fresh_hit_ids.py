"""``fresh_hit_ids`` of ``wrap_openai``/``wrap_anthropic``: by default a hit is equal to
what was stored; with the option, every answer that did not come from its own HTTP
response gets a new id (and, for OpenAI, ``created``), stream chunks included. The
SDK's private ``_request_id`` is ``None`` on such answers in both settings."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStartEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from aiocache_llm import InvalidInputTypeError
from aiocache_llm.integrations import anthropic as anthropic_integration
from aiocache_llm.integrations import openai as openai_integration
from aiocache_llm.integrations.anthropic import wrap_anthropic
from aiocache_llm.integrations.openai import wrap_openai
from tests.support.anthropic_server import FakeAnthropicServer
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(60)

OPENAI_QUERY: dict[str, Any] = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "what is the capital of France"}],
}
ANTHROPIC_QUERY: dict[str, Any] = {"max_tokens": 64, **OPENAI_QUERY, "model": "claude-test"}
NOW = 2_000_000_000
CHATCMPL = re.compile(r"^chatcmpl-[A-Za-z0-9]{29}$")
MSG = re.compile(r"^msg_01[A-Za-z0-9]{22}$")


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # the wrapper's clock only: the server keeps the real time, so "created" tells apart
    # what the server sent from what the wrapper wrote
    monkeypatch.setattr(openai_integration, "time", SimpleNamespace(time=lambda: NOW + 0.7))


@pytest.fixture
async def openai_server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
async def anthropic_server() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer() as server:
        yield server


async def read(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def without_ids(completion: ChatCompletion | ChatCompletionChunk) -> dict[str, Any]:
    return completion.model_dump(exclude={"id", "created"})


# -- OpenAI ---------------------------------------------------------------------------


async def test_openai_hits_equal_the_stored_answer_by_default(
    openai_server: FakeOpenAIServer,
) -> None:
    async with wrap_openai(openai_server.client()) as client:
        assert client.fresh_hit_ids is False
        first = await client.chat.completions.create(**OPENAI_QUERY)
        hit = await client.chat.completions.create(**OPENAI_QUERY)
        chunks = await read(await client.chat.completions.create(**OPENAI_QUERY, stream=True))
        replay = await read(await client.chat.completions.create(**OPENAI_QUERY, stream=True))
    assert hit == first
    assert (hit.id, hit.created) == (first.id, first.created)
    assert first._request_id is not None
    assert first._request_id.startswith("req_")  # the server's x-request-id
    assert hit._request_id is None
    assert replay == chunks
    assert openai_server.requests == 2


async def test_openai_hits_get_a_new_id_and_created_time(openai_server: FakeOpenAIServer) -> None:
    async with wrap_openai(openai_server.client(), fresh_hit_ids=True) as client:
        assert client.fresh_hit_ids is True
        first = await client.chat.completions.create(**OPENAI_QUERY)
        hits = [await client.chat.completions.create(**OPENAI_QUERY) for _ in range(2)]
    assert first.created != NOW  # the server's answer, untouched
    for hit in hits:
        assert type(hit) is ChatCompletion
        assert CHATCMPL.match(hit.id)
        assert hit.id != first.id
        assert hit.created == NOW
        assert without_ids(hit) == without_ids(first)
        assert hit._request_id is None
    assert hits[0].id != hits[1].id
    assert openai_server.requests == 1


async def test_openai_replayed_chunks_share_one_new_id(openai_server: FakeOpenAIServer) -> None:
    async with wrap_openai(openai_server.client(), fresh_hit_ids=True) as client:
        chunks = await read(await client.chat.completions.create(**OPENAI_QUERY, stream=True))
        replays = [
            await read(await client.chat.completions.create(**OPENAI_QUERY, stream=True))
            for _ in range(2)
        ]
    assert openai_server.stream_requests == 1
    assert len({chunk.id for chunk in chunks}) == 1
    ids = []
    for replay in replays:
        assert all(type(chunk) is ChatCompletionChunk for chunk in replay)
        assert len({chunk.id for chunk in replay}) == 1
        assert {chunk.created for chunk in replay} == {NOW}
        assert CHATCMPL.match(replay[0].id)
        assert [without_ids(c) for c in replay] == [without_ids(c) for c in chunks]
        ids.append(replay[0].id)
    assert len({chunks[0].id, *ids}) == 3


async def test_openai_a_shared_call_gives_the_joiner_a_new_id(
    openai_server: FakeOpenAIServer,
) -> None:
    async with wrap_openai(openai_server.client(), fresh_hit_ids=True) as client:
        both = await asyncio.gather(
            client.chat.completions.create(**OPENAI_QUERY),
            client.chat.completions.create(**OPENAI_QUERY),
        )
    assert openai_server.requests == 1
    assert both[0].id != both[1].id
    # one made the HTTP call and keeps its response's id and request id; one joined it
    own = [c for c in both if c._request_id is not None]
    joined = [c for c in both if c._request_id is None]
    assert len(own) == 1
    assert len(joined) == 1
    assert joined[0].created == NOW
    assert own[0].created != NOW


async def test_fresh_hit_ids_must_be_a_bool(openai_server: FakeOpenAIServer) -> None:
    with pytest.raises(InvalidInputTypeError):
        wrap_openai(openai_server.client(), fresh_hit_ids="yes")  # type: ignore[arg-type]


# -- Anthropic ------------------------------------------------------------------------


async def test_anthropic_hits_equal_the_stored_answer_by_default(
    anthropic_server: FakeAnthropicServer,
) -> None:
    async with wrap_anthropic(anthropic_server.client()) as client:
        first = await client.messages.create(**ANTHROPIC_QUERY)
        hit = await client.messages.create(**ANTHROPIC_QUERY)
        events = await read(await client.messages.create(**ANTHROPIC_QUERY, stream=True))
        replay = await read(await client.messages.create(**ANTHROPIC_QUERY, stream=True))
    assert hit == first
    assert first._request_id is not None
    assert hit._request_id is None
    assert replay == events


async def test_anthropic_hits_get_a_new_message_id(anthropic_server: FakeAnthropicServer) -> None:
    async with wrap_anthropic(anthropic_server.client(), fresh_hit_ids=True) as client:
        first = await client.messages.create(**ANTHROPIC_QUERY)
        hits = [await client.messages.create(**ANTHROPIC_QUERY) for _ in range(2)]
    for hit in hits:
        assert type(hit) is Message
        assert MSG.match(hit.id)
        assert hit.id != first.id
        assert hit.model_copy(update={"id": first.id}) == first
        assert hit._request_id is None
    assert hits[0].id != hits[1].id
    assert anthropic_server.requests == 1


async def test_anthropic_replays_get_a_new_id_in_message_start(
    anthropic_server: FakeAnthropicServer,
) -> None:
    async with wrap_anthropic(anthropic_server.client(), fresh_hit_ids=True) as client:
        events = await read(await client.messages.create(**ANTHROPIC_QUERY, stream=True))
        replay = await read(await client.messages.create(**ANTHROPIC_QUERY, stream=True))
    assert anthropic_server.stream_requests == 1
    start, replay_start = events[0], replay[0]
    assert isinstance(start, RawMessageStartEvent)
    assert type(replay_start) is RawMessageStartEvent
    assert MSG.match(replay_start.message.id)
    assert replay_start.message.id != start.message.id
    assert replay_start.message.model_copy(update={"id": start.message.id}) == start.message
    assert replay[1:] == events[1:]  # the other events carry no id


def test_the_anthropic_refresher_leaves_other_values_alone() -> None:
    refresh = anthropic_integration._refresher("msg_01x")
    assert refresh("text") == "text"
