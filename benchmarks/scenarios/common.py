"""What every scenario shares: the request they all key on, and the run's settings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["QUERY", "Context", "user_key", "value_of_size"]

QUERY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a concise assistant for a travel agency."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ],
    "temperature": 0.0,
    "max_tokens": 256,
}


def user_key(query: dict[str, Any]) -> str:
    """How a user of a generic cache keys a chat request: sorted JSON, SHA-256."""
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()


def value_of_size(size: int) -> str:
    """A text answer of exactly ``size`` bytes."""
    sentence = "Paris is the capital and most populous city of France. "
    return (sentence * (size // len(sentence) + 1))[:size]


@dataclass
class Context:
    """Settings of one benchmark run."""

    quick: bool
    redis_url: str
    redis_host: str
    redis_port: int

    @property
    def repeats(self) -> int:
        return 5 if self.quick else 11

    def ops(self, full: int) -> int:
        """Operations per repeat: a tenth of ``full`` in quick mode."""
        return max(10, full // 10) if self.quick else full
