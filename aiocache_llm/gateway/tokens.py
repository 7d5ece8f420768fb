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
    """Estimate a request's total tokens: prompt text / 4 + its completion allowance.

    The prompt part counts the characters of every message's text content (plus a
    few tokens of framing per message); the completion part is the request's
    ``max_completion_tokens`` or ``max_tokens`` when set, else
    :data:`DEFAULT_COMPLETION_TOKENS`. Always >= 1. O(size of the messages).
    """
    request = as_request(query)
    characters = 0
    messages = request.get("messages")
    framing = 0
    if isinstance(messages, list):
        for message in messages:
            framing += 4
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                characters += len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        characters += len(part["text"])
    prompt = -(-characters // CHARS_PER_TOKEN) + framing
    return max(1, prompt + completion_allowance(request))


def reported_tokens(answer: Any) -> int | None:
    """Return the total tokens an answer reports, or ``None`` if it reports none.

    Understands ``LLMResponse``/SDK objects (``answer.usage.total_tokens``) and
    JSON answers (``answer["usage"]["total_tokens"]``).
    """
    usage = answer.get("usage") if isinstance(answer, Mapping) else getattr(answer, "usage", None)
    if usage is None:
        return None
    total = (
        usage.get("total_tokens")
        if isinstance(usage, Mapping)
        else getattr(usage, "total_tokens", None)
    )
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    return None


class StreamUsage:
    """Follows a stream chunk by chunk to tell how many tokens it used; O(1) per chunk.

    OpenAI-style streams report ``usage.total_tokens`` on their last chunk (with
    ``stream_options={"include_usage": True}``); Anthropic-style streams report
    ``input_tokens`` in ``message_start`` (under ``message.usage``) and the running
    ``output_tokens`` in ``message_delta``; the last report of each kind wins. When a
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
            self._input = _count(_field(usage, "input_tokens")) or self._input
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
    """The completion part of :func:`estimate_tokens`: ``max_tokens`` or the default."""
    request = as_request(query)
    completion = request.get("max_completion_tokens") or request.get("max_tokens")
    if not isinstance(completion, int) or isinstance(completion, bool) or completion <= 0:
        return DEFAULT_COMPLETION_TOKENS
    return completion


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
