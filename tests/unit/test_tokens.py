"""Token estimates and reported usage for OpenAI, Anthropic and LiteLLM shapes (issue 14).

Requests and answers are the real SDK types where they are installed (``openai``
always, ``anthropic`` when present), else the JSON the providers' API references show.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion

from aiocache_llm.gateway.tokens import (
    DEFAULT_COMPLETION_TOKENS,
    StreamUsage,
    completion_allowance,
    estimate_tokens,
    reported_tokens,
)


def tokens_of(characters: int) -> int:
    return -(-characters // 4)


def anthropic(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": messages, **fields}


HI = [{"role": "user", "content": "hi"}]


# estimate_tokens: what the prompt holds


def test_openai_string_content_is_estimated_as_before() -> None:
    query = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 500}
    assert estimate_tokens(query) == 10 + 4 + 500
    assert estimate_tokens("x" * 40) == 10 + 4 + DEFAULT_COMPLETION_TOKENS


@pytest.mark.parametrize(
    "system",
    [
        "s" * 4000,
        [{"type": "text", "text": "s" * 3000}, {"type": "text", "text": "s" * 1000}],
        [{"type": "text", "text": "s" * 4000, "cache_control": {"type": "ephemeral"}}],
    ],
    ids=["string", "text-blocks", "cached-block"],
)
def test_anthropic_top_level_system_is_counted(system: Any) -> None:
    # issue 14: a 4000-character system prompt was estimated at 105 tokens in all
    assert estimate_tokens(anthropic(HI, system=system)) == tokens_of(4002) + 4 + 100


def test_text_parts_and_text_blocks_are_counted_and_images_are_not() -> None:
    openai_parts = [
        {"type": "text", "text": "a" * 20},
        {"type": "image_url", "image_url": {"url": "https://example.com/" + "p" * 500}},
    ]
    anthropic_blocks = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "A" * 5000}},
        {"type": "text", "text": "b" * 20},
    ]  # fmt: skip
    assert estimate_tokens({"messages": [{"role": "user", "content": openai_parts}]}) == (
        5 + 4 + DEFAULT_COMPLETION_TOKENS
    )
    assert estimate_tokens(anthropic([{"role": "user", "content": anthropic_blocks}])) == (
        5 + 4 + 100
    )


def test_anthropic_tool_use_inputs_and_tool_results_are_counted() -> None:
    tool_input = {"location": "San Francisco, CA", "unit": "celsius"}
    messages = [
        {"role": "user", "content": "What is the weather like in San Francisco?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "I'll check the weather."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
                 "name": "get_weather", "input": tool_input},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                 "content": "15 degrees"},
                {"type": "tool_result", "tool_use_id": "toolu_02",
                 "content": [{"type": "text", "text": "sunny"},
                             {"type": "image", "source": {"type": "url", "url": "u"}}]},
            ],
        },
    ]  # fmt: skip
    characters = (
        len("What is the weather like in San Francisco?")
        + len("I'll check the weather.")
        + len(orjson.dumps(tool_input))
        + len("15 degrees")
        + len("sunny")
    )
    assert estimate_tokens(anthropic(messages)) == tokens_of(characters) + 3 * 4 + 100


def test_openai_tool_calls_and_tool_messages_are_counted() -> None:
    arguments = '{"location": "Paris, France"}'
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": arguments}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "15 degrees"},
    ]  # fmt: skip
    characters = len("Weather in Paris?") + len("get_weather") + len(arguments) + len("15 degrees")
    assert estimate_tokens({"messages": messages, "max_tokens": 50}) == (
        tokens_of(characters) + 3 * 4 + 50
    )


@pytest.mark.parametrize(
    "tools",
    [
        [{"name": "get_weather", "description": "Get the current weather in a given location",
          "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                           "required": ["location"]}}],
        [{"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
    ],
    ids=["anthropic", "openai"],
)  # fmt: skip
def test_tool_definitions_count_as_their_json_size(tools: list[dict[str, Any]]) -> None:
    query = anthropic(HI, tools=tools)
    assert estimate_tokens(query) == tokens_of(2 + len(orjson.dumps(tools))) + 4 + 100


def test_what_json_cannot_hold_adds_nothing_rather_than_failing() -> None:
    odd = {"type": "tool_use", "id": "t", "name": "n", "input": {"ids": {1, 2}}}
    query = anthropic([{"role": "assistant", "content": [odd]}, *HI], tools=[object()])
    assert estimate_tokens(query) == tokens_of(2) + 2 * 4 + 100


@pytest.mark.parametrize(
    ("fields", "allowance"),
    [
        ({"max_completion_tokens": 64, "max_tokens": 500}, 64),
        ({"max_tokens": 500}, 500),
        ({}, DEFAULT_COMPLETION_TOKENS),
        ({"max_tokens": 0}, DEFAULT_COMPLETION_TOKENS),
        ({"max_tokens": True}, DEFAULT_COMPLETION_TOKENS),
        ({"max_tokens": "500"}, DEFAULT_COMPLETION_TOKENS),
    ],
    ids=["max-completion-tokens-first", "max-tokens", "default", "zero", "bool", "str"],
)
def test_completion_allowance(fields: dict[str, Any], allowance: int) -> None:
    query = {"messages": HI, **fields}
    assert completion_allowance(query) == allowance
    assert estimate_tokens(query) == 1 + 4 + allowance


# reported_tokens: what the answer says it used

OPENAI_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Paris."}}],
    "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
}  # fmt: skip

# what litellm's ModelResponse(...).model_dump() gives for any provider's model
LITELLM_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-2", "created": 1, "model": "claude-sonnet-4-5", "object": "chat.completion",
    "system_fingerprint": None,
    "choices": [{"finish_reason": "stop", "index": 0,
                 "message": {"content": "Paris.", "role": "assistant", "tool_calls": None,
                             "function_call": None}}],
    "usage": {"completion_tokens": 10, "prompt_tokens": 2070, "total_tokens": 2080,
              "completion_tokens_details": None,
              "prompt_tokens_details": {"audio_tokens": None, "cached_tokens": 2051},
              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2051},
}  # fmt: skip

# the Messages API reference's example answer
ANTHROPIC_ANSWER: dict[str, Any] = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-5", "content": [{"type": "text", "text": "Paris."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 10},
}  # fmt: skip


def with_usage(answer: dict[str, Any], **usage: Any) -> dict[str, Any]:
    return {**answer, "usage": usage}


def test_openai_answers_report_their_total() -> None:
    assert reported_tokens(OPENAI_ANSWER) == 29
    assert reported_tokens(ChatCompletion.model_validate(OPENAI_ANSWER)) == 29


def test_litellm_answers_report_their_total_not_their_parts_added_again() -> None:
    assert reported_tokens(LITELLM_ANSWER) == 2080


def test_a_total_wins_over_input_and_output() -> None:
    # the OpenAI Responses API reports all three
    usage = {"input_tokens": 30, "output_tokens": 12, "total_tokens": 42}
    assert reported_tokens({"usage": usage}) == 42


def test_anthropic_answers_report_input_plus_output() -> None:
    # issue 14: 108 tokens stayed charged for an answer that reported 22
    assert reported_tokens(ANTHROPIC_ANSWER) == 22


def test_anthropic_prompt_cache_tokens_are_input_too() -> None:
    answer = with_usage(ANTHROPIC_ANSWER, input_tokens=50, output_tokens=503,
                        cache_creation_input_tokens=2051, cache_read_input_tokens=1000)  # fmt: skip
    assert reported_tokens(answer) == 50 + 503 + 2051 + 1000
    absent = with_usage(ANTHROPIC_ANSWER, input_tokens=50, output_tokens=503,
                        cache_creation_input_tokens=None, cache_read_input_tokens=None)  # fmt: skip
    assert reported_tokens(absent) == 553


def test_prompt_and_completion_tokens_without_a_total_are_added() -> None:
    assert reported_tokens({"usage": {"prompt_tokens": 19, "completion_tokens": 10}}) == 29


@pytest.mark.parametrize(
    "answer",
    [
        {"choices": []},
        {"usage": None},
        {"usage": {}},
        {"usage": {"output_tokens": 15}},  # an Anthropic message_delta: no input count
        {"usage": {"total_tokens": -1}},
        {"usage": {"total_tokens": True}},
        {"usage": {"input_tokens": "12", "output_tokens": 10}},
        "a plain string answer",
        None,
    ],
    ids=["no-usage", "usage-none", "empty", "output-only", "negative", "bool", "str-count",
         "str-answer", "none"],
)  # fmt: skip
def test_answers_without_a_usable_count_report_none(answer: Any) -> None:
    assert reported_tokens(answer) is None


def test_usage_objects_are_read_like_dicts() -> None:
    class Answer:
        usage = CompletionUsage(prompt_tokens=1, completion_tokens=2, total_tokens=3)

    assert reported_tokens(Answer()) == 3


# StreamUsage with Anthropic events


def usage_of(chunks: list[Any]) -> StreamUsage:
    usage = StreamUsage()
    for chunk in chunks:
        usage.add(chunk)
    return usage


MESSAGE_START: dict[str, Any] = {
    "type": "message_start",
    "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 25, "output_tokens": 1,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100}},
}  # fmt: skip


def test_anthropic_streams_count_their_cache_tokens() -> None:
    events = [
        MESSAGE_START,
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": "Paris."}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 15}},
    ]  # fmt: skip
    assert usage_of(events).reported == 25 + 100 + 15


def test_a_message_delta_with_cumulative_input_is_the_total() -> None:
    events = [
        MESSAGE_START,
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 15}},
    ]  # fmt: skip
    assert usage_of(events).reported == 140


# the anthropic SDK's own types, when installed


def test_anthropic_sdk_answers_and_events() -> None:
    types = pytest.importorskip("anthropic.types")
    message = types.Message.model_validate(ANTHROPIC_ANSWER)
    assert reported_tokens(message) == 22
    cached = types.Message.model_validate(
        with_usage(ANTHROPIC_ANSWER, input_tokens=50, output_tokens=5, cache_read_input_tokens=1000)
    )
    assert reported_tokens(cached) == 1055
    start = types.RawMessageStartEvent.model_validate(MESSAGE_START)
    delta = types.RawMessageDeltaEvent.model_validate(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 15},
        }
    )
    assert reported_tokens(delta) is None
    assert usage_of([start, delta]).reported == 140
