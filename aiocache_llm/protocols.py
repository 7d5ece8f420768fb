"""Layer 1: the four storage protocols.

Each has an in-memory twin (one process, no server) and a Redis twin (shared by a
fleet); both pass the same contract suite in ``tests/contract/``. Every method is a
coroutine and every implementation is an async context manager with ``aclose()``.
The protocols are runtime-checkable, so ``isinstance(x, AsyncExactCache)`` works
on any object that has the methods. Two more rate-limiter protocols name optional
capabilities (both limiters have them): :class:`AsyncReservingRateLimiter` (grants
returned as :class:`Reservation` handles, so a call gives back only what it reserved)
and :class:`AsyncUsageRecordingRateLimiter` (tokens used beyond a reservation are
recorded even past the budget). :class:`AsyncMessageChatMemory` is the optional
capability of holding whole chat messages (tool calls and results); both chat memories
have it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from aiocache_llm.core.query import Query
from aiocache_llm.core.stats import CacheStats, ChatMemoryStats, RateLimiterStats

__all__ = [
    "AsyncChatMemory",
    "AsyncMessageChatMemory",
    "AsyncExactCache",
    "AsyncRateLimiter",
    "AsyncReservingRateLimiter",
    "AsyncSemanticCache",
    "AsyncUsageRecordingRateLimiter",
    "Reservation",
]


class _AsyncClosable(Protocol):
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class AsyncExactCache(_AsyncClosable, Protocol):
    """Identical request -> stored answer."""

    async def get(self, query: Query) -> Any | None:
        """Return the stored value (a copy if mutable), or ``None`` on a miss or expiry."""
        ...

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` for ``query``; ``ttl_seconds`` overrides the cache default."""
        ...

    async def invalidate(self, query: Query) -> bool:
        """Remove the entry of ``query``; return whether there was one."""
        ...

    async def clear(self) -> None:
        """Remove every entry of this cache (and nothing else)."""
        ...

    async def stats(self) -> CacheStats:
        """Return a frozen snapshot of the counters."""
        ...


@runtime_checkable
class AsyncSemanticCache(_AsyncClosable, Protocol):
    """Paraphrased request -> stored answer, by cosine similarity of embeddings."""

    async def get(self, query: Query, *, similarity_threshold: float | None = None) -> Any | None:
        """Return the value of the most similar entry in the query's scope, if similar enough."""
        ...

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` under the query's scope and the embedding of its last user message."""
        ...

    async def invalidate(self, query: Query) -> bool:
        """Remove the entry stored for exactly this query; return whether there was one."""
        ...

    async def clear(self) -> None:
        """Remove every entry of this cache (and nothing else)."""
        ...

    async def stats(self) -> CacheStats:
        """Return a frozen snapshot of the counters."""
        ...


@runtime_checkable
class AsyncRateLimiter(_AsyncClosable, Protocol):
    """A sliding-window token budget per user."""

    async def check_and_consume(self, user_id: str, tokens: int = 1) -> bool:
        """Grant ``tokens`` now if they fit in the user's window (atomically); else ``False``."""
        ...

    async def get_remaining(self, user_id: str) -> int:
        """Tokens the user could be granted right now."""
        ...

    async def acquire(self, user_id: str, tokens: int, *, timeout: float | None = None) -> None:
        """Wait until ``tokens`` fit, then grant them; raise ``RateLimitExceeded`` on timeout."""
        ...

    async def reset(self, user_id: str) -> None:
        """Forget everything granted to the user."""
        ...

    async def stats(self) -> RateLimiterStats:
        """Return a frozen snapshot of the counters."""
        ...


@dataclass(frozen=True, eq=False)
class Reservation:
    """Tokens one ``reserve`` call granted to ``user_id``: the handle to give back its unused part.

    ``handle`` is the limiter's own reference to the grant (opaque to callers; ``None``
    when the tokens were granted without being recorded, e.g. by a limiter failing
    open). Two reservations are equal only if they are the same object.
    """

    user_id: str
    tokens: int
    handle: object = None


@runtime_checkable
class AsyncReservingRateLimiter(AsyncRateLimiter, Protocol):
    """A rate limiter whose grants are reservations: a call gives back only its own tokens."""

    async def reserve(
        self, user_id: str, tokens: int, *, timeout: float | None = None
    ) -> Reservation:
        """Grant ``tokens`` like ``acquire`` (``timeout=0``: no waiting); return the handle."""
        ...

    async def release(self, reservation: Reservation, tokens: int | None = None) -> int:
        """Give back up to ``tokens`` (None: all) that ``reservation`` still holds; say how many."""
        ...


@runtime_checkable
class AsyncUsageRecordingRateLimiter(AsyncRateLimiter, Protocol):
    """A rate limiter that records tokens used beyond a reservation, even past the budget."""

    async def record_usage(self, user_id: str, tokens: int) -> None:
        """Count ``tokens`` as used by the user now, whether or not they fit: a debt."""
        ...


@runtime_checkable
class AsyncChatMemory(_AsyncClosable, Protocol):
    """A bounded message history per conversation."""

    async def append(self, conv_id: str, role: str, content: Any) -> None:
        """Append a message, keep the newest ``2 * max_turns``, refresh the TTL; atomically."""
        ...

    async def get_history(self, conv_id: str) -> list[dict[str, Any]]:
        """Return the messages oldest first as ``{"role": ..., "content": ...}``."""
        ...

    async def clear(self, conv_id: str) -> None:
        """Forget the conversation."""
        ...

    async def stats(self) -> ChatMemoryStats:
        """Return a frozen snapshot of the counters."""
        ...


@runtime_checkable
class AsyncMessageChatMemory(AsyncChatMemory, Protocol):
    """A chat memory that holds whole OpenAI/Anthropic messages, tool calls included.

    Both chat memories have it. A trim never leaves a history that begins with a tool
    result or holds results whose assistant tool call was trimmed.
    """

    async def append_message(self, conv_id: str, message: Mapping[str, Any]) -> None:
        """Append one message dict, stored and returned as given; atomically."""
        ...

    async def append_messages(self, conv_id: str, messages: Iterable[Mapping[str, Any]]) -> None:
        """Append message dicts (a tool call and its results) in one atomic step."""
        ...
