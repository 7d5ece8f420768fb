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

The gateway decides what it can do with a component by these capabilities, never by
its class, so a wrapper (tracing, metrics, a custom backend) that forwards the
members of a capability keeps what the capability gives:

- :class:`AsyncSignatureKeyedCache`: a request is keyed once and read and written by
  that digest (both exact caches);
- :class:`SupportsInlineCompletion`: no deadline or breaker around a cache that
  never suspends (the memory exact cache);
- :class:`SupportsValueCodec`: streamed chunks of declared model types decode (both
  exact caches);
- :class:`AsyncFleetExactCache`: misses and streams are coalesced across the fleet
  (the Redis exact cache);
- :class:`AsyncBudgetedRateLimiter`: a refusal says when it would fit (both limiters);
- :class:`AsyncFailurePolicyRateLimiter`: the limiter's own outage policy decides
  (the Redis limiter);
- :class:`StreamingProvider`: streams go through ``provider.stream(query)``.

A runtime check only sees that the members exist: a wrapper should forward a
capability's members only when the object it wraps has them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from aiocache_llm.core.query import Query
from aiocache_llm.core.stats import CacheStats, ChatMemoryStats, RateLimiterStats

if TYPE_CHECKING:  # annotations only: the backends import this module
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from aiocache_llm.backends.rate_limits import FailureMode
    from aiocache_llm.core.codec import ValueCodec
    from aiocache_llm.core.config import RateLimitConfig

__all__ = [
    "AsyncBudgetedRateLimiter",
    "AsyncChatMemory",
    "AsyncExactCache",
    "AsyncFailurePolicyRateLimiter",
    "AsyncFleetExactCache",
    "AsyncMessageChatMemory",
    "AsyncRateLimiter",
    "AsyncReservingRateLimiter",
    "AsyncSemanticCache",
    "AsyncSignatureKeyedCache",
    "AsyncUsageRecordingRateLimiter",
    "Reservation",
    "StreamingProvider",
    "SupportsInlineCompletion",
    "SupportsNodeRouting",
    "SupportsValueCodec",
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
class AsyncSignatureKeyedCache(AsyncExactCache, Protocol):
    """An exact cache whose entries are named by a digest a caller may compute once.

    ``signature(query)`` is the digest the cache files ``query`` under, its own
    ``normalize`` hook applied; ``get_by_signature(d)``/``put_by_signature(d, ...)``
    answer exactly as ``get(q)``/``put(q, ...)`` do for ``d == signature(q)``. The
    gateway computes the digest once per request and uses it for the lookup, the
    coalescing key and the store; since the cache's hook decides the key, the
    gateway refuses a ``normalize=`` of its own with such a cache. Both built-in
    exact caches have it.
    """

    def signature(self, query: Query) -> str:
        """Return the digest this cache files ``query`` under; raises for bad input."""
        ...

    async def get_by_signature(self, digest: str) -> Any | None:
        """:meth:`get` for a digest computed with :meth:`signature`."""
        ...

    async def put_by_signature(
        self, digest: str, value: Any, *, ttl_seconds: float | None = None
    ) -> None:
        """:meth:`put` for a digest computed with :meth:`signature`."""
        ...


@runtime_checkable
class SupportsInlineCompletion(Protocol):
    """An object that says whether its coroutines ever suspend.

    ``completes_inline is True`` promises that no coroutine of the object ever
    suspends (no I/O, no lock, no ``await`` that yields): each call is over when its
    first step returns. The gateway then calls such an exact cache without a deadline
    or circuit breaker (there is nothing to wait for), so an error it raises, other
    than refusing a value, reaches the caller; the LangChain adapter drives it without
    an event loop. Only ``True`` counts: ``False`` (or no attribute) means "may
    suspend". :class:`MemoryExactCache` has it.
    """

    @property
    def completes_inline(self) -> bool:
        """Whether every coroutine of this object completes without suspending."""
        ...


@runtime_checkable
class SupportsValueCodec(Protocol):
    """An object that stores values with a :class:`~aiocache_llm.core.codec.ValueCodec`.

    The codec knows the model types declared with ``value_types=``; the gateway
    encodes and decodes streamed chunks with the exact cache's codec, so a stream of
    declared models replays as those models. Both built-in exact caches have it; a
    wrapper forwards the wrapped cache's ``codec`` as is.
    """

    @property
    def codec(self) -> ValueCodec:
        """The codec this object stores values with."""
        ...


@runtime_checkable
class AsyncFleetExactCache(AsyncSignatureKeyedCache, SupportsValueCodec, Protocol):
    """An exact cache that lives in a Redis shared by a fleet of processes.

    The gateway coalesces misses across every process using the same entries: a
    lease per digest under ``{key_prefix}:lease:`` on ``client``, waiters woken on a
    channel of that prefix and handed small answers decoded with ``codec``; streams
    are shared live through the same client and prefix. ``client`` must be the
    client the entries are written through and ``key_prefix`` their prefix (entries
    are ``{key_prefix}:{signature}``): processes that coalesce together must agree on
    both, and on the signature. :class:`RedisExactCache` has it.
    """

    @property
    def client(self) -> Redis | RedisCluster:
        """The ``redis.asyncio`` client (or ``RedisCluster``) the entries live on."""
        ...

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this cache writes (``{key_prefix}:...``)."""
        ...


@runtime_checkable
class SupportsNodeRouting(Protocol):
    """A cache that can say which server node holds a key, for per-node fault handling.

    Its entries are ``{key_prefix}:{signature}``. ``node_of(key)`` names the node
    (``host:port`` of a Redis Cluster primary) serving ``key`` now, or None when there
    is no such distinction (one server) or it is not known yet; it does no I/O. The
    gateway keeps one circuit breaker per node named, so a failing node trips only the
    keys it serves (see :mod:`aiocache_llm.gateway.node_guards`). Every Redis backend
    has it (:meth:`RedisBackend.node_of`).
    """

    def node_of(self, key: str | bytes) -> str | None:
        """The node serving ``key`` now, or None; O(1), no I/O."""
        ...

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this cache writes (``{key_prefix}:...``)."""
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
class AsyncBudgetedRateLimiter(AsyncRateLimiter, Protocol):
    """A rate limiter that tells its budget and window (both built-in limiters).

    With it, a refusal from a check that does not wait says when to retry (one
    window) or that the request alone exceeds the budget (never).
    """

    @property
    def config(self) -> RateLimitConfig:
        """The budget per window and the window length."""
        ...


@runtime_checkable
class AsyncFailurePolicyRateLimiter(AsyncRateLimiter, Protocol):
    """A rate limiter that bounds its backend calls and answers outages by its own policy.

    ``failure_mode`` is what it does when its backend cannot answer within
    ``operation_timeout`` seconds (None: no bound of its own): ``"open"`` grants,
    ``"closed"`` refuses, ``"raise"`` raises. The gateway lets that policy decide: it
    refuses ``on_limiter_error="deny"`` with a limiter that fails open, and unless
    the limiter raises, extends its own deadline by ``operation_timeout``.
    :class:`RedisRateLimiter` has it.
    """

    @property
    def failure_mode(self) -> FailureMode:
        """``"open"``, ``"closed"`` or ``"raise"``."""
        ...

    @property
    def operation_timeout(self) -> float | None:
        """Seconds one backend call may take before the policy applies (None: no bound)."""
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


@runtime_checkable
class StreamingProvider(Protocol):
    """A provider with its own streaming call (the SDK adapters have one).

    ``stream(query)`` returns an async iterable of chunks, or an awaitable of one.
    The gateway streams through it; a provider without it is called with the query
    (``"stream": True`` set) and must return such an iterable.
    """

    def stream(self, query: Query) -> Any:
        """Start the streamed answer to ``query``."""
        ...
