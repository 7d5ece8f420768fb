"""Configuration values for the rate limiter and the chat memory.

Both are frozen and validated on construction with the shared validator, so a bad
setting fails where it is written, not at first use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import (
    check_finite_number,
    check_optional_positive_number,
    check_positive_int,
)

__all__ = ["DEFAULT_ROLES", "ChatMemoryConfig", "RateLimitConfig"]

DEFAULT_ROLES: frozenset[str] = frozenset({"system", "developer", "user", "assistant", "tool"})
"""Message roles a chat memory accepts unless configured otherwise."""


@dataclass(frozen=True)
class RateLimitConfig:
    """A sliding-window token budget per user.

    In any interval of ``window_seconds`` seconds, no user is granted more than
    ``max_tokens_per_minute`` tokens in total (the name matches the default 60 s
    window; with another window it is the budget of that window).
    """

    max_tokens_per_minute: int
    window_seconds: float = 60.0

    def __post_init__(self) -> None:
        check_positive_int("max_tokens_per_minute", self.max_tokens_per_minute)
        window = check_finite_number("window_seconds", self.window_seconds)
        if window < 0.001:
            raise InvalidInputError(f"window_seconds must be >= 0.001, got {self.window_seconds}")
        object.__setattr__(self, "window_seconds", window)

    @property
    def budget(self) -> int:
        """Tokens a user may be granted within one window."""
        return self.max_tokens_per_minute


@dataclass(frozen=True)
class ChatMemoryConfig:
    """A bounded history per conversation.

    A turn is a message and its reply: the newest ``2 * max_turns`` messages are kept.
    ``ttl_seconds`` (sub-second values allowed) is refreshed by every append; ``None``
    keeps conversations until cleared. ``roles`` lists the accepted message roles.
    """

    max_turns: int = 20
    ttl_seconds: float | None = None
    roles: frozenset[str] = field(default=DEFAULT_ROLES)

    def __post_init__(self) -> None:
        check_positive_int("max_turns", self.max_turns)
        ttl = check_optional_positive_number("ttl_seconds", self.ttl_seconds)
        if ttl is not None and ttl < 0.001:
            raise InvalidInputError(f"ttl_seconds must be >= 0.001 or None, got {self.ttl_seconds}")
        object.__setattr__(self, "ttl_seconds", ttl)
        given: object = self.roles
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise InvalidInputTypeError(
                f"roles must be a collection of str, got {type(given).__name__}"
            )
        roles = frozenset(given)  # once: a generator can be iterated only once
        if not all(isinstance(role, str) and role for role in roles):
            raise InvalidInputTypeError("roles must be a collection of non-empty str")
        if not roles:
            raise InvalidInputError("roles must not be empty")
        object.__setattr__(self, "roles", roles)

    @property
    def max_messages(self) -> int:
        """How many messages a conversation keeps: ``2 * max_turns``."""
        return 2 * self.max_turns
