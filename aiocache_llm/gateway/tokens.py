"""How the gateway counts tokens for the rate limiter: an estimate before, the truth after.

Before a provider call the gateway reserves :func:`estimate_tokens` of the query
(override with ``estimate_tokens=``); afterwards it reads the real total from the
answer's usage (:func:`reported_tokens`) and reconciles: more used than reserved
is recorded, less is given back from this call's own reservation (see
:class:`~aiocache_llm.gateway.budget.TokenBudget`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from aiocache_llm.core.query import as_request

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_COMPLETION_TOKENS",
    "StreamUsage",
    "completion_allowance",
    "estimate_tokens",
    "reported_tokens",
]

CHARS_PER_TOKEN = 4
"""The usual English average for BPE tokenizers; an estimate, not a tokenizer."""

DEFAULT_COMPLETION_TOKENS = 256
"""Completion allowance when the query sets no ``max_tokens``/``max_completion_tokens``."""


def estimate_tokens(query: object) -> int:
    """Estimate a request's total tokens: prompt characters / 4 + its completion allowance.

    Understands OpenAI, Anthropic and LiteLLM requests. The prompt part counts the
    characters of every message's text (string content, OpenAI text parts, Anthropic
    text blocks), of the content of Anthropic ``tool_result`` blocks (a string or text
    blocks), of OpenAI ``tool_calls`` (function names and argument strings) and of the
    top-level ``system`` (Anthropic: a string or a list of text blocks); the bytes of
    the compact JSON of Anthropic ``tool_use`` inputs and of the ``tools`` definitions
    (nothing for what JSON cannot hold); and a few tokens of framing per message.
    Images, audio and files are not counted (their cost depends on the provider). The
    completion part is :func:`completion_allowance`. Always >= 1. O(size of the
    request); raises only what :func:`~aiocache_llm.core.query.as_request` raises.
    """
    request = as_request(query)
    characters = _content_chars(request.get("system")) + _json_chars(request.get("tools"))
    messages = request.get("messages")
    framing = 0
    if isinstance(messages, list):
        for message in messages:
            framing += 4
            if isinstance(message, Mapping):
                characters += _content_chars(message.get("content"))
                characters += _tool_calls_chars(message.get("tool_calls"))
    prompt = -(-characters // CHARS_PER_TOKEN) + framing
    return max(1, prompt + completion_allowance(request))


def reported_tokens(answer: Any) -> int | None:
    """Return the total tokens an answer reports, or ``None`` if it reports none.

    Reads ``answer.usage`` (objects: OpenAI and Anthropic SDK types, LiteLLM's
    ``ModelResponse``, ``LLMResponse``) or ``answer["usage"]`` (their JSON/dict
    forms): its ``total_tokens`` (OpenAI, LiteLLM) when present, else
    ``input_tokens + output_tokens`` plus Anthropic's ``cache_creation_input_tokens``
    and ``cache_read_input_tokens`` when present, else ``prompt_tokens +
    completion_tokens``. Usage without an input count (an Anthropic ``message_delta``'s
    ``output_tokens`` alone) is not a total: ``None``. Counts must be ints >= 0.
    """
    usage = _field(answer, "usage")
    if usage is None:
        return None
    total = _count(_field(usage, "total_tokens"))
    if total is not None:
        return total
    inputs = _input_tokens(usage)
    if inputs is not None:
        return inputs + (_count(_field(usage, "output_tokens")) or 0)
    prompt = _count(_field(usage, "prompt_tokens"))
    if prompt is not None:
        return prompt + (_count(_field(usage, "completion_tokens")) or 0)
    return None


class StreamUsage:
    """Follows a stream chunk by chunk to tell how many tokens it used; O(1) per chunk.

    OpenAI-style streams report ``usage.total_tokens`` on their last chunk (with
    ``stream_options={"include_usage": True}``); Anthropic-style streams report
    ``input_tokens`` (plus the cache token counts) in ``message_start`` (under
    ``message.usage``) and the running ``output_tokens`` in ``message_delta``; the last
    report of each kind wins, and a ``message_delta`` that reports its input too (the
    counts are cumulative) is a total, as :func:`reported_tokens` reads it. When a
    stream reports nothing, :meth:`tokens` estimates: the prompt (as
    :func:`estimate_tokens`) plus the streamed text / :data:`CHARS_PER_TOKEN`.
    """

    __slots__ = ("_characters", "_input", "_output", "_total")

    def __init__(self) -> None:
        self._total: int | None = None
        self._input: int | None = None
        self._output: int | None = None
        self._characters = 0

    def add(self, chunk: Any) -> None:
        """Take one chunk into account."""
        if isinstance(chunk, str):
            self._characters += len(chunk)
            return
        self._characters += len(_chunk_text(chunk))
        reported = reported_tokens(chunk)
        if reported is not None:
            self._total = reported
            return
        usage = _field(chunk, "usage")
        if usage is None:
            usage = _field(_field(chunk, "message"), "usage")
        if usage is not None:
            self._input = _input_tokens(usage) or self._input
            self._output = _count(_field(usage, "output_tokens")) or self._output

    @property
    def reported(self) -> int | None:
        """The total the stream reported, or ``None``."""
        if self._total is not None:
            return self._total
        if self._input is None and self._output is None:
            return None
        return (self._input or 0) + (self._output or 0)

    def tokens(self, query: object) -> int:
        """The tokens used: as reported, else estimated from ``query`` and the text seen."""
        reported = self.reported
        if reported is not None:
            return reported
        prompt = estimate_tokens(query) - completion_allowance(query)
        return max(1, prompt + -(-self._characters // CHARS_PER_TOKEN))


def completion_allowance(query: object) -> int:
    """The completion part of :func:`estimate_tokens`.

    The request's ``max_completion_tokens`` (OpenAI) or ``max_tokens`` (OpenAI,
    Anthropic, which requires it, LiteLLM) when it is a positive int, else
    :data:`DEFAULT_COMPLETION_TOKENS`.
    """
    request = as_request(query)
    completion = request.get("max_completion_tokens") or request.get("max_tokens")
    if not isinstance(completion, int) or isinstance(completion, bool) or completion <= 0:
        return DEFAULT_COMPLETION_TOKENS
    return completion


def _content_chars(content: object) -> int:
    """Characters of a message's content (or a ``system``, or a tool result's content)."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    characters = 0
    for part in content:
        if not isinstance(part, Mapping):
            continue
        text = part.get("text")
        if isinstance(text, str):  # OpenAI text parts, Anthropic text blocks
            characters += len(text)
        elif part.get("type") == "tool_use":
            characters += _json_chars(part.get("input"))
        elif part.get("type") == "tool_result":
            characters += _content_chars(part.get("content"))
    return characters


def _tool_calls_chars(tool_calls: object) -> int:
    """Characters of an OpenAI assistant message's calls: names and argument JSON."""
    if not isinstance(tool_calls, list):
        return 0
    characters = 0
    for call in tool_calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            for field in ("name", "arguments"):
                value = function.get(field)
                characters += len(value) if isinstance(value, str) else 0
    return characters


def _json_chars(value: object) -> int:
    """Size of ``value`` as compact JSON; 0 for nothing or what JSON cannot hold (an
    estimate must not fail a request the provider may well accept)."""
    if value is None:
        return 0
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return 0


def _input_tokens(usage: Any) -> int | None:
    """Every input token an answer's usage reports: Anthropic counts the prompt tokens
    written to and read from its prompt cache apart from ``input_tokens``."""
    inputs = _count(_field(usage, "input_tokens"))
    if inputs is None:
        return None
    for field in ("cache_creation_input_tokens", "cache_read_input_tokens"):
        inputs += _count(_field(usage, field)) or 0
    return inputs


def _chunk_text(chunk: Any) -> str:
    choices = _field(chunk, "choices")
    if isinstance(choices, list):
        return "".join(
            content
            for choice in choices
            if isinstance(content := _field(_field(choice, "delta"), "content"), str)
        )
    text = _field(_field(chunk, "delta"), "text")
    return text if isinstance(text, str) else ""


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
