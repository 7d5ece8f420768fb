"""How the gateway counts tokens for the rate limiter: an estimate before, the truth after.

Before a provider call the gateway reserves :func:`estimate_tokens` of the query
(override with ``estimate_tokens=``); afterwards it reads the real total from the
answer's usage (:func:`reported_tokens`) and reconciles: more used than reserved
is charged, less is refunded when the limiter supports refunds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiocache_llm.core.query import as_request

__all__ = ["CHARS_PER_TOKEN", "DEFAULT_COMPLETION_TOKENS", "estimate_tokens", "reported_tokens"]

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
    completion = request.get("max_completion_tokens") or request.get("max_tokens")
    if not isinstance(completion, int) or isinstance(completion, bool) or completion <= 0:
        completion = DEFAULT_COMPLETION_TOKENS
    return max(1, prompt + completion)


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
