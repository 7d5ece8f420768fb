"""StreamUsage: what a stream reports it used, or an estimate from its text."""

from __future__ import annotations

from typing import Any

from openai.types.chat import ChatCompletionChunk

from aiocache_llm.gateway.tokens import StreamUsage, estimate_tokens

QUERY = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 500}
PROMPT = estimate_tokens(QUERY) - 500  # 10 tokens of text + 4 of framing


def usage_of(chunks: list[Any]) -> StreamUsage:
    usage = StreamUsage()
    for chunk in chunks:
        usage.add(chunk)
    return usage


def test_text_only_streams_are_estimated_from_prompt_and_text() -> None:
    usage = usage_of(["a" * 7, "b" * 5])  # 12 characters -> 3 tokens
    assert usage.reported is None
    assert usage.tokens(QUERY) == PROMPT + 3


def test_openai_usage_on_the_last_chunk_wins() -> None:
    chunks = [
        ChatCompletionChunk.model_validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "hello"}}]}
        ),
        ChatCompletionChunk.model_validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                      "total_tokens": 11}}
        ),
    ]  # fmt: skip
    assert usage_of(chunks).tokens(QUERY) == 11


def test_anthropic_events_add_input_and_output_tokens() -> None:
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi there"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    ]  # fmt: skip
    assert usage_of(events).reported == 40


def test_delta_text_counts_towards_the_estimate_when_nothing_is_reported() -> None:
    chunks = [
        {"choices": [{"delta": {"content": "x" * 8}}]},
        {"delta": {"text": "y" * 8}},
        {"unrelated": True},
    ]
    assert usage_of(chunks).tokens(QUERY) == PROMPT + 4
