"""Chat memory holds real tool-calling conversations: appended, trimmed at every possible
point and replayed through the wrapped SDK clients, every history is accepted by the
local servers' request validation (the APIs' tool-message rules), on memory and Redis.
The validation itself is shown to refuse what the APIs refuse."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from aiocache_llm import ChatMemoryConfig, MemoryChatMemory, RedisChatMemory
from aiocache_llm.integrations.anthropic import wrap_anthropic
from aiocache_llm.integrations.openai import wrap_openai
from tests.conftest import BACKENDS, open_redis_target
from tests.support.anthropic_server import FakeAnthropicServer
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(90)

CONV = "conversation-1"
Memory = MemoryChatMemory | RedisChatMemory


@pytest.fixture(params=[b for b in BACKENDS if b.id != "fakeredis"])
async def memory(request: pytest.FixtureRequest) -> AsyncIterator[Memory]:
    config = ChatMemoryConfig(max_turns=2)  # 4 messages: every round is cut somewhere
    if request.param == "memory":
        async with MemoryChatMemory(config) as chat:
            yield chat
        return
    async with (
        open_redis_target("redis") as target,
        RedisChatMemory(client=target.client, key_prefix=target.prefix, config=config) as chat,
    ):
        yield chat


def openai_round(n: int) -> list[list[Any]]:
    """The appends of one round: a question, a tool call with its two results (one
    atomic append), the answer."""
    calls = [
        {
            "id": f"call_{n}{x}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": x})},
        }
        for x in "ab"
    ]
    return [
        [{"role": "user", "content": f"weather {n}?"}],
        [
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": f"call_{n}a", "content": "sunny"},
            {
                "role": "tool",
                "tool_call_id": f"call_{n}b",
                "content": [{"type": "text", "text": "rain"}],
            },
        ],
        [{"role": "assistant", "content": f"answer {n}"}],
    ]


def anthropic_round(n: int) -> list[list[Any]]:
    use = f"toolu_{n}"
    tool_use = {"type": "tool_use", "id": use, "name": "get_weather", "input": {"n": n}}
    return [
        [{"role": "user", "content": f"weather {n}?"}],
        [
            {"role": "assistant", "content": [{"type": "text", "text": "Looking."}, tool_use]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use, "content": "sunny"}],
            },
        ],
        [{"role": "assistant", "content": [{"type": "text", "text": f"answer {n}"}]}],
    ]


async def test_openai_tool_conversations_replay_after_every_trim(memory: Memory) -> None:
    async with FakeOpenAIServer() as server, wrap_openai(server.client()) as client:
        seen_tool_trims = 0
        for n in range(4):
            for step in openai_round(n):
                await memory.append_messages(CONV, step)
                history = await memory.get_history(CONV)
                seen_tool_trims += history[0]["role"] == "assistant"
                question = {"role": "user", "content": f"and now {n}?"}
                completion = await client.chat.completions.create(
                    model="gpt-test", messages=[*history, question]
                )
                assert completion.choices[0].message.content == f"Echo: and now {n}?"
                assert server.bodies[-1]["messages"][:-1] == history  # sent as stored
        assert server.rejected == 0
        assert seen_tool_trims > 0  # some trims had to cut into a tool exchange


async def test_anthropic_tool_conversations_replay_after_every_trim(memory: Memory) -> None:
    async with FakeAnthropicServer() as server, wrap_anthropic(server.client()) as client:
        for n in range(4):
            for step in anthropic_round(n):
                await memory.append_messages(CONV, step)
                history = await memory.get_history(CONV)
                assert not any(
                    block.get("type") == "tool_result"
                    for block in history[0]["content"]
                    if isinstance(history[0]["content"], list)
                )
                question = {"role": "user", "content": f"and now {n}?"}
                message = await client.messages.create(
                    model="claude-test", max_tokens=64, messages=[*history, question]
                )
                assert message.content[0].type == "text"
                assert server.bodies[-1]["messages"][:-1] == history
        assert server.rejected == 0


# -- the validation refuses what the APIs refuse --------------------------------------


async def test_the_openai_server_refuses_broken_tool_histories() -> None:
    [question], exchange, [answer] = openai_round(0)
    broken = {
        "starts with a tool result": [exchange[1], question],
        "a call without its results": [question, exchange[0], answer],
        "a result split from its call": [question, exchange[0], exchange[1], answer, exchange[2]],
        "content null without tool calls": [question, {"role": "assistant", "content": None}],
        "no messages": [],
    }
    async with FakeOpenAIServer() as server:
        client = server.client()
        for name, messages in broken.items():
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model="gpt-test", messages=messages)
            assert caught.value.param == "messages", name
        await client.chat.completions.create(
            model="gpt-test", messages=[question, *exchange, answer]
        )
        assert server.rejected == len(broken)
        server.validate_messages = False
        await client.chat.completions.create(model="gpt-test", messages=[exchange[1], question])


async def test_the_anthropic_server_refuses_broken_tool_histories() -> None:
    [question], [use, result], [answer] = anthropic_round(0)
    broken = {
        "a result without its use": [result, answer, question],
        "a use without its result": [question, use, answer, question],
        "a system role": [{"role": "system", "content": "x"}, question],
        "empty content": [{"role": "user", "content": []}, question],
    }
    async with FakeAnthropicServer() as server:
        client = server.client()
        for name, messages in broken.items():
            with pytest.raises(anthropic.BadRequestError) as caught:
                await client.messages.create(model="claude-test", max_tokens=8, messages=messages)
            assert "invalid_request_error" in str(caught.value), name
        ok = await client.messages.create(
            model="claude-test", max_tokens=8, messages=[question, use, result, answer, question]
        )
        assert ok.content[0].type == "text"
        assert server.rejected == len(broken)
