"""Public value types: what a provider returns."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["LLMResponse", "Usage"]


class Usage(BaseModel):
    """Token usage reported by a provider for one completion."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class LLMResponse(BaseModel):
    """A provider-neutral chat completion.

    Any provider answer can be cached as-is (a ``str``, a JSON ``dict``/``list`` or a
    pydantic model); this type exists for applications that want one shape across
    providers.
    """

    content: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    usage: Usage | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
