"""``InferenceGateway``: answer from a cache, call the provider only on a miss."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, cast

from pydantic import BaseModel

from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.backends.promotion import (
    PromotingSemanticCache,
    SemanticHit,
    SupportsPromotionConflict,
)
from aiocache_llm.backends.verification import ProbingSemanticCache
from aiocache_llm.coalescing.fleet import FleetCoalescer, lease_key_of
from aiocache_llm.coalescing.fleet_stream import FleetStreams
from aiocache_llm.coalescing.single_flight import SingleFlight
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.core.deadline import deadline
from aiocache_llm.core.errors import (
    InvalidInputError,
    InvalidInputTypeError,
    ProviderTimeoutError,
    RateLimitExceeded,
)
from aiocache_llm.core.guard import BackendGuard, BreakerState
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.query import Normalizer, Query, QueryKeys
from aiocache_llm.core.recorded import RecordedStream
from aiocache_llm.core.validation import (
    check_bool,
    check_callable,
    check_id,
    check_optional_positive_number,
    check_positive_int,
    check_positive_number,
)
from aiocache_llm.gateway.budget import TokenBudget
from aiocache_llm.gateway.node_guards import NodeGuards, RoutedGuard, lease_route
from aiocache_llm.gateway.request import MissRequest
from aiocache_llm.gateway.shadow import DEFAULT_SHADOW_LOG_SIZE, ShadowLog
from aiocache_llm.gateway.stats import GatewayStats, LatencyWindow
from aiocache_llm.gateway.streaming import (
    ChunkStream,
    StreamCall,
    StreamFlights,
    streaming_request,
    wants_stream,
)
from aiocache_llm.gateway.tokens import estimate_tokens as default_estimate_tokens
from aiocache_llm.gateway.warm import WarmReport, resolve_all
from aiocache_llm.protocols import (
    AsyncExactCache,
    AsyncFailurePolicyRateLimiter,
    AsyncFleetExactCache,
    AsyncRateLimiter,
    AsyncSemanticCache,
    AsyncSignatureKeyedCache,
    StreamingProvider,
    SupportsInlineCompletion,
    SupportsNodeRouting,
    SupportsValueCodec,
)
from aiocache_llm.semantic.shadow import ShadowRecord

__all__ = ["SEMANTIC_MODES", "InferenceGateway", "SemanticMode"]

SemanticMode = Literal["serve", "shadow", "off"]
SEMANTIC_MODES: tuple[SemanticMode, ...] = ("serve", "shadow", "off")

logger = logging.getLogger("aiocache_llm.gateway")

ProviderCall = Callable[[], Awaitable[Any]]

DEFAULT_MAX_STREAM_BYTES = 8 * 1024 * 1024
"""Encoded chunks one stream in flight may hold before it is passed through unstored."""

_UNAVAILABLE = object()
# a coalesced caller refused by another user's budget retries this often, then leads alone
_FOREIGN_REFUSAL_RETRIES = 3


def _provider_function(provider: Any) -> Callable[[Query], Awaitable[Any]] | None:
    if provider is None:
        return None
    complete = getattr(provider, "complete", None)
    if complete is not None and callable(complete):
        return complete  # type: ignore[no-any-return]
    if callable(provider):
        return provider  # type: ignore[no-any-return]
    raise InvalidInputTypeError(
        "provider must be an async callable query -> answer, or have an async complete(query)"
    )


def _provider_stream_function(provider: Any) -> Callable[[Query], Any] | None:
    """The provider's ``stream(query)`` method, or None (then the callable is used)."""
    if isinstance(provider, StreamingProvider) and callable(provider.stream):
        return provider.stream
    return None


def _completes_inline(cache: object) -> bool:
    """Whether ``cache`` promises that its coroutines never suspend (only ``True`` counts)."""
    return isinstance(cache, SupportsInlineCompletion) and cache.completes_inline is True


class InferenceGateway(AsyncResource):
    """The one call an application makes: ``answer = await gateway.resolve(query)``.

    Order of a resolve: exact cache -> (coalesced from here) semantic cache ->
    rate limit -> provider -> store in both caches. Concurrent identical misses make
    one provider call in this process (:class:`SingleFlight`) and, when the exact
    cache lives in a shared Redis (:class:`AsyncFleetExactCache`, e.g.
    :class:`RedisExactCache`), one across the fleet (a lease in Redis, see
    :class:`FleetCoalescer`). Provider errors are never cached; they reach every
    caller coalesced on the failed call.

    What the gateway does with a component depends on its capabilities (see
    :mod:`aiocache_llm.protocols`), never on its class, so a wrapper that forwards a
    capability's members keeps it: an :class:`AsyncSignatureKeyedCache` is read and
    written by a digest computed once per request; a cache that
    :class:`SupportsInlineCompletion` runs without deadline or breaker; a
    :class:`SupportsValueCodec` cache's codec decodes streamed chunks.

    A failing cache, limiter or lease backend never fails a resolve: each runs behind
    a :class:`BackendGuard` (``backend_timeout`` per operation, a circuit breaker
    that skips a dead backend for ``breaker_reset_after`` seconds after
    ``breaker_threshold`` consecutive failures), is counted in ``backend_errors``
    and logged once per state change, and the provider answers. When the exact cache
    can say which node serves a key (:class:`SupportsNodeRouting`: a Redis Cluster
    primary), the exact cache and the fleet leases get one breaker per node (see
    :mod:`aiocache_llm.gateway.node_guards`): a dead primary opens only its own, and
    keys on healthy primaries keep their hits. :meth:`breaker_states` lists them.

    Rate limiting (with ``rate_limiter``) charges only provider calls, to the user of
    the caller that makes the call: ``estimate_tokens(query)`` before, reconciled with
    the usage the answer reports afterwards: a limiter with reservations
    (:class:`AsyncReservingRateLimiter`) gives back only this call's unused tokens,
    and usage beyond the reservation is always recorded
    (:class:`AsyncUsageRecordingRateLimiter`) as a debt the user's next calls wait
    out. ``rate_limit_timeout`` is how long a call may wait for budget (0 = refuse
    at once with :class:`RateLimitExceeded`, None = wait as long as it takes).
    ``on_limiter_error`` says what to do when a limiter call fails (raises anything
    but :class:`RateLimitExceeded`, or overruns the gateway's deadline):
    ``"allow"`` (fail open, the default) or ``"deny"`` (fail closed). A limiter
    with its own outage policy (:class:`AsyncFailurePolicyRateLimiter`, e.g.
    :class:`RedisRateLimiter`) applies its ``failure_mode`` first and raises only
    with ``failure_mode="raise"``: build it so to let ``on_limiter_error`` decide
    (and count its failures in this gateway's ``backend_errors``); with "open" or
    "closed" it answers an outage itself and counts it in its own
    ``stats().backend_errors``. ``on_limiter_error="deny"`` with a fail-open limiter
    would never deny, so it is refused. The gateway's deadline for such a limiter is
    extended by the limiter's ``operation_timeout``, so that on a frozen Redis the
    limiter's policy, not the deadline, decides.

    With no cache given, a private :class:`MemoryExactCache` is used (closed with
    the gateway, keyed with ``normalize``); caches passed in belong to the caller and
    are not closed. ``normalize`` with a supplied :class:`AsyncSignatureKeyedCache`
    (both built-in exact caches) raises :class:`InvalidInputError` (that cache keys
    queries with its own hook); with another cache it keys only the coalescing.

    A semantic hit is promoted into the exact cache (``promote_semantic_hits``) only
    through a semantic cache with the :class:`PromotingSemanticCache` capability, and
    only into an exact cache it can reach: the copy lives no longer than the original
    and is deleted with it (see :mod:`aiocache_llm.backends.promotion`).

    ``semantic_mode`` says what the semantic cache is for: ``"serve"`` (the default:
    read, served, filled), ``"shadow"`` (filled, and read by ``probe`` for every
    request that reaches it, but never served: the provider answers, and what the
    cache would have served is recorded as a :class:`ShadowRecord`, see
    :mod:`aiocache_llm.gateway.shadow`) or ``"off"`` (neither read nor written).
    Shadow records go to a log of the newest ``shadow_log_size`` records
    (:meth:`shadow_records`) and to ``on_shadow(record)``, called outside the
    request path. A shadow lookup costs what a semantic miss costs (an embedding and
    a search, under ``semantic_timeout``); shadow mode needs a semantic cache with
    ``probe`` (both built-in ones).
    """

    def __init__(
        self,
        provider: Any,
        exact_cache: AsyncExactCache | None = None,
        semantic_cache: AsyncSemanticCache | None = None,
        rate_limiter: AsyncRateLimiter | None = None,
        *,
        ttl_seconds: float | None = None,
        provider_timeout: float | None = None,
        backend_timeout: float = 0.5,
        semantic_timeout: float = 5.0,
        breaker_threshold: int = 3,
        breaker_reset_after: float = 5.0,
        estimate_tokens: Callable[[Query], int] = default_estimate_tokens,
        rate_limit_timeout: float | None = 0.0,
        on_limiter_error: Literal["allow", "deny"] = "allow",
        promote_semantic_hits: bool = True,
        fleet_coalescing: bool = True,
        lease_seconds: float = 10.0,
        fleet_max_wait: float = 60.0,
        normalize: Normalizer | None = None,
        anonymous_user: str = "anonymous",
        stream_idle_timeout: float | None = None,
        max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
        finish_abandoned_streams: bool = False,
        semantic_mode: SemanticMode = "serve",
        on_shadow: Callable[[ShadowRecord], Any] | None = None,
        shadow_log_size: int = DEFAULT_SHADOW_LOG_SIZE,
    ) -> None:
        if semantic_mode not in SEMANTIC_MODES:
            raise InvalidInputError(
                f"semantic_mode must be one of {', '.join(SEMANTIC_MODES)}, got {semantic_mode!r}"
            )
        if semantic_mode == "shadow" and not isinstance(semantic_cache, ProbingSemanticCache):
            raise InvalidInputError(
                "semantic_mode='shadow' needs a semantic_cache with probe() "
                "(MemorySemanticCache, RedisSemanticCache)"
            )
        self._semantic_mode: SemanticMode = semantic_mode
        self._shadow = ShadowLog(shadow_log_size, on_shadow)
        self._provider = _provider_function(provider)
        self._provider_stream = _provider_stream_function(provider)
        stream_idle_timeout = check_optional_positive_number(
            "stream_idle_timeout", stream_idle_timeout
        )
        max_stream_bytes = check_positive_int("max_stream_bytes", max_stream_bytes)
        finish_abandoned_streams = check_bool("finish_abandoned_streams", finish_abandoned_streams)
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        self._provider_timeout = check_optional_positive_number(
            "provider_timeout", provider_timeout
        )
        backend_timeout = check_positive_number("backend_timeout", backend_timeout)
        semantic_timeout = check_positive_number("semantic_timeout", semantic_timeout)
        check_positive_int("breaker_threshold", breaker_threshold)
        check_positive_number("breaker_reset_after", breaker_reset_after)
        check_callable("estimate_tokens", estimate_tokens)
        if rate_limit_timeout is not None and rate_limit_timeout != 0:
            check_positive_number("rate_limit_timeout", rate_limit_timeout)
        if on_limiter_error not in ("allow", "deny"):
            raise InvalidInputError(
                f"on_limiter_error must be 'allow' or 'deny', got {on_limiter_error!r}"
            )
        deny_when_limiter_down = on_limiter_error == "deny"
        if (
            deny_when_limiter_down
            and isinstance(rate_limiter, AsyncFailurePolicyRateLimiter)
            and rate_limiter.failure_mode == "open"
        ):
            raise InvalidInputError(
                f"on_limiter_error='deny' never applies to a {type(rate_limiter).__name__} "
                "with failure_mode='open' (it grants when its backend is down): build the "
                "limiter with failure_mode='closed' or 'raise'"
            )
        self._promote = bool(promote_semantic_hits)
        self._anonymous = check_id("anonymous_user", anonymous_user)

        for name, value, protocol in (
            ("exact_cache", exact_cache, AsyncExactCache),
            ("semantic_cache", semantic_cache, AsyncSemanticCache),
            ("rate_limiter", rate_limiter, AsyncRateLimiter),
        ):
            if value is not None and not isinstance(value, protocol):
                raise InvalidInputTypeError(
                    f"{name} must implement {protocol.__name__}, got {type(value).__name__}"
                )

        def guard(name: str, timeout: float | None) -> BackendGuard:
            return BackendGuard(
                name,
                timeout=timeout,
                failure_threshold=breaker_threshold,
                reset_after=breaker_reset_after,
            )

        self._owns_exact = exact_cache is None
        if normalize is not None and isinstance(exact_cache, AsyncSignatureKeyedCache):
            # the cache keys queries with its own hook, and so do its get/invalidate
            # calls made outside the gateway: a second hook here would split the keys
            raise InvalidInputError(
                f"normalize= cannot apply to a supplied {type(exact_cache).__name__}: the "
                "exact cache keys queries with its own hook; pass normalize= to the cache"
            )
        self._exact: AsyncExactCache = (
            MemoryExactCache(normalize=normalize) if exact_cache is None else exact_cache
        )
        # a signature-keyed cache takes a digest computed once; others get the query
        self._keyed: AsyncSignatureKeyedCache | None = (
            self._exact if isinstance(self._exact, AsyncSignatureKeyedCache) else None
        )
        if self._keyed is not None:
            self._signature: Callable[[Query], str] = self._keyed.signature
        else:
            self._signature = QueryKeys(normalize).digest
        # a cache that never suspends does no I/O: no deadline, no breaker on the
        # hottest path. Otherwise one breaker per node when the cache can say which
        # node serves a key (a Redis Cluster primary): a dead node trips only its keys
        routing = self._exact if isinstance(self._exact, SupportsNodeRouting) else None
        self._exact_prefix = "" if routing is None else routing.key_prefix
        self._exact_guards: NodeGuards | None = (
            None
            if _completes_inline(self._exact)
            else NodeGuards(
                "exact cache",
                lambda name: guard(name, backend_timeout),
                None if routing is None else routing.node_of,
            )
        )
        self._exact_guard = None if self._exact_guards is None else self._exact_guards.fallback
        # "off": the gateway never touches the semantic cache
        self._semantic = None if semantic_mode == "off" else semantic_cache
        # promotions need a semantic cache that tells its hits' lifetimes (a capability,
        # not a class): a copy must never outlive its original
        self._promoter: PromotingSemanticCache | None = (
            self._semantic
            if self._promote and isinstance(self._semantic, PromotingSemanticCache)
            else None
        )
        conflict = (
            self._promoter.promotion_conflict(self._keyed)
            if self._keyed is not None and isinstance(self._promoter, SupportsPromotionConflict)
            else None
        )
        if conflict is not None:
            raise InvalidInputError(f"{conflict}, or pass promote_semantic_hits=False")
        self._semantic_guard = guard("semantic cache", semantic_timeout)
        limiter_timeout: float | None = backend_timeout
        if rate_limit_timeout is None:
            limiter_timeout = None
        elif rate_limit_timeout:
            limiter_timeout = rate_limit_timeout + backend_timeout
        if (
            limiter_timeout is not None
            and isinstance(rate_limiter, AsyncFailurePolicyRateLimiter)
            and rate_limiter.failure_mode != "raise"
        ):
            # it bounds its own round trips and answers by its policy: ours is a backstop
            limiter_timeout += rate_limiter.operation_timeout or 0.0
        self._limiter_guard = guard("rate limiter", limiter_timeout)
        self._limiter = rate_limiter
        self._budget = (
            None
            if rate_limiter is None
            else TokenBudget(
                rate_limiter,
                self._limiter_guard,
                estimate_tokens=estimate_tokens,
                wait=rate_limit_timeout,
                deny_when_down=deny_when_limiter_down,
            )
        )
        self._fleet: FleetCoalescer | None = None
        # the leases' own guard, when the exact cache has none (counted in stats too)
        self._lease_guard: BackendGuard | None = None
        self._lease_guards: NodeGuards | None = None
        fleet_streams = None
        codec = self._exact.codec if isinstance(self._exact, SupportsValueCodec) else None
        # a wrapper may forward a codec-like object of its own: only a real one is used
        stream_codec = codec if isinstance(codec, ValueCodec) else ValueCodec()
        if fleet_coalescing and isinstance(self._exact, AsyncFleetExactCache):
            shared = self._exact
            # leases always wait on Redis: they share the cache's guards (one per node
            # when the cache names nodes: a lease's node is that of its key), or get
            # their own if the cache claims never to suspend
            lease_guards = self._exact_guards
            if lease_guards is None:
                lease_guards = self._lease_guards = NodeGuards(
                    "fleet leases",
                    lambda name: guard(name, backend_timeout),
                    None if routing is None else routing.node_of,
                )
                self._lease_guard = lease_guards.fallback
            prefix = shared.key_prefix
            lease_guard: BackendGuard = RoutedGuard(
                lease_guards, lambda digest: lease_key_of(prefix, digest)
            )
            self._fleet = FleetCoalescer(
                shared.client,
                shared.key_prefix,
                guard=lease_guard,
                lease_seconds=lease_seconds,
                max_wait_seconds=fleet_max_wait,
                codec=stream_codec,  # waiters decode an answer sent inline
            )
            fleet_streams = FleetStreams(
                shared.client,
                shared.key_prefix,
                codec=stream_codec,
                guard=lease_guard,
                lease_seconds=lease_seconds,
                max_wait_seconds=fleet_max_wait,
            )
        self._streams = StreamFlights(
            self,
            codec=stream_codec,
            max_bytes=max_stream_bytes,
            idle_timeout=stream_idle_timeout,
            finish_abandoned=finish_abandoned_streams,
            fleet=fleet_streams,
        )
        self._fleet_streams = fleet_streams
        # an ended stream may still be storing and publishing to the fleet on close
        self._close_timeout = backend_timeout * 4
        self._flight: SingleFlight[Any] = SingleFlight()
        self._latency = LatencyWindow()
        self._requests = 0
        self._exact_hits = 0
        self._semantic_hits = 0
        self._misses = 0
        self._coalesced = 0
        self._provider_calls = 0
        self._provider_errors = 0

    def __repr__(self) -> str:
        parts = [f"exact={self._exact!r}"]
        if self._semantic is not None:
            parts.append(f"semantic={self._semantic!r}")
        if self._limiter is not None:
            parts.append(f"limiter={self._limiter!r}")
        parts.append(f"fleet={'on' if self._fleet else 'off'}")
        parts.append(f"requests={self._requests}, provider_calls={self._provider_calls}")
        return f"InferenceGateway({', '.join(parts)})"

    async def resolve(
        self,
        query: Query,
        user_id: str | None = None,
        *,
        no_cache: bool = False,
        no_store: bool = False,
        ttl_seconds: float | None = None,
    ) -> Any:
        """Return the answer to ``query``, from a cache or, on a miss, from the provider.

        ``user_id`` selects the rate-limit budget (None = ``anonymous_user``).
        Cache control for this request: ``no_cache`` skips both cache reads (a fresh
        answer, still stored unless ``no_store``), ``no_store`` keeps the answer out
        of the caches, ``ttl_seconds`` overrides the stored entries' lifetime.

        A query with a truthy ``stream`` field gets a :class:`ChunkStream` (see
        :meth:`stream`), returned once its first chunk is there, so that errors
        before any chunk raise here, as from an SDK's ``create(stream=True)``.

        Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` for a bad
        query or argument (before any I/O), :class:`RateLimitExceeded` when the
        user's budget refuses, :class:`ProviderTimeoutError` past ``provider_timeout``,
        and whatever the provider raised. Cancelling a caller never cancels the
        provider call other callers wait for.
        """
        provider = self._provider
        if provider is None:
            raise InvalidInputTypeError(
                "this gateway has no provider: use resolve_with(query, call)"
            )
        if wants_stream(query):
            stream = self.stream(
                query, user_id, no_cache=no_cache, no_store=no_store, ttl_seconds=ttl_seconds
            )
            try:
                return await stream.start()
            except BaseException:
                await stream.aclose()  # nobody will read it: leave the shared stream now
                raise
        return await self.resolve_with(
            query,
            lambda: provider(query),
            user_id,
            no_cache=no_cache,
            no_store=no_store,
            ttl_seconds=ttl_seconds,
        )

    def stream(
        self,
        query: Query,
        user_id: str | None = None,
        *,
        no_cache: bool = False,
        no_store: bool = False,
        ttl_seconds: float | None = None,
    ) -> ChunkStream:
        """Return the streamed answer to ``query``: an async iterator of its chunks.

        Use as ``async for chunk in gateway.stream(query): ...``. Nothing starts until
        the first chunk is asked for; the query is keyed now, so bad input raises here.
        A cached stream is replayed (same chunks, same order, same types, fresh copies);
        otherwise the answer is shared live with every concurrent identical stream
        (a late joiner first gets the chunks so far), and across processes with an
        :class:`AsyncFleetExactCache` (:class:`RedisExactCache`). The provider streams
        through its ``stream(query)`` method when it has one; otherwise it is called
        with the query (a mapping gets ``"stream": True``) and must return an async
        iterable of chunks, or an awaitable of one, such as an SDK's stream. A stream
        that ends normally is stored (one entry); a failed, abandoned or oversized one
        is not.

        Errors come out of the iteration: :class:`RateLimitExceeded`,
        :class:`ProviderTimeoutError` (no first chunk within ``provider_timeout``, or
        a gap longer than ``stream_idle_timeout``), whatever the provider raised (after
        the chunks it sent), :class:`RemoteProviderError` when it failed in another
        process, :class:`StreamInterruptedError` (see :class:`ChunkStream`).
        Rate limiting reserves the estimate before the provider stream starts and
        settles with the usage the stream reports (or an estimate from its text).
        """
        provider, provider_stream = self._provider, self._provider_stream
        if provider is None:
            raise InvalidInputTypeError(
                "this gateway has no provider: use stream_with(query, call)"
            )
        if provider_stream is not None:
            call: StreamCall = lambda: provider_stream(query)  # noqa: E731
        else:
            request = streaming_request(query)
            call = lambda: provider(request)  # noqa: E731
        return self.stream_with(
            query, call, user_id, no_cache=no_cache, no_store=no_store, ttl_seconds=ttl_seconds
        )

    def stream_with(
        self,
        query: Query,
        call: StreamCall,
        user_id: str | None = None,
        *,
        no_cache: bool = False,
        no_store: bool = False,
        ttl_seconds: float | None = None,
    ) -> ChunkStream:
        """:meth:`stream`, calling ``call()`` for the provider's stream on a miss.

        ``query`` is only the key; ``call()`` returns an async iterable of chunks (or
        an awaitable of one). This is what ``@cached_completion`` runs on for async
        generator functions.
        """
        self._check_open()
        user, ttl = self._request_options(user_id, ttl_seconds)
        return self._streams.open(query, call, user, no_cache=no_cache, no_store=no_store, ttl=ttl)

    def _request_options(
        self, user_id: str | None, ttl_seconds: float | None
    ) -> tuple[str, float | None]:
        ttl = self._ttl
        if ttl_seconds is not None:
            ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        user = self._anonymous if user_id is None else check_id("user_id", user_id)
        return user, ttl

    async def resolve_with(
        self,
        query: Query,
        call: ProviderCall,
        user_id: str | None = None,
        *,
        no_cache: bool = False,
        no_store: bool = False,
        ttl_seconds: float | None = None,
    ) -> Any:
        """:meth:`resolve`, calling ``call()`` instead of the provider on a miss.

        ``query`` is only the key: ``call`` must produce its answer. This is what
        ``@cached_completion`` runs on; use it for a per-request provider.
        """
        self._check_open()
        started = time.perf_counter()
        digest = self._signature(query)
        user, ttl = self._request_options(user_id, ttl_seconds)
        self._requests += 1
        try:
            read = False
            if not no_cache:
                value = await self._exact_get(query, digest, _UNAVAILABLE)
                if value is not None and value is not _UNAVAILABLE:
                    if type(value) is not RecordedStream:
                        self._exact_hits += 1
                        return value
                    value = None  # a streamed answer is never a plain request's answer
                read = value is None
            request = MissRequest(query, digest, call, user, ttl, no_store=no_store, read=read)
            return await self._coalesced_fill(request)
        finally:
            self._latency.add(time.perf_counter() - started)

    async def _coalesced_fill(self, request: MissRequest) -> Any:
        flight_key = (request.digest, request.read, request.no_store)
        for _ in range(_FOREIGN_REFUSAL_RETRIES):
            led = False

            async def fill() -> Any:
                nonlocal led
                led = True
                return await self._fill(request)

            try:
                value = await self._flight.run(flight_key, fill)
            except RateLimitExceeded as exc:
                # the call we joined was refused by its leader's budget, not ours
                if led or exc.user_id == request.user:
                    raise
                continue
            if not led:
                self._coalesced += 1
            return value
        return await self._fill(request)

    async def _fill(self, request: MissRequest) -> Any:
        """What one flight does: semantic lookup, then (fleet-coalesced) provider call."""
        query, digest = request.query, request.digest
        if self._semantic_mode == "shadow" and request.read:
            await self._shadow_probe(query)
        elif self._semantic is not None and request.read:
            value, hit = await self._semantic_lookup(query)
            if value is not None and type(value) is not RecordedStream:
                self._semantic_hits += 1
                if not request.no_store:
                    await self._promote_hit(hit, digest, request.ttl)
                return value

        async def compute() -> Any:
            self._misses += 1
            return await self._call_and_store(request)

        if self._fleet is not None and request.read and not request.no_store:
            with lease_route(digest):  # the lease's calls go to its node's breaker
                return await self._fleet.run(
                    digest, lambda: self._plain_get(query, digest), compute
                )
        if request.read:
            # a flight for this key may have stored its answer between our miss and now
            value = await self._plain_get(query, digest)
            if value is not None:
                self._exact_hits += 1
                return value
        return await compute()

    async def _call_and_store(self, request: MissRequest) -> Any:
        budget = self._budget
        hold = await budget.reserve(request.query, request.user) if budget is not None else None
        self._provider_calls += 1
        try:
            value = await self._invoke(request.call)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._provider_errors += 1
            if budget is not None:
                await budget.settle(hold, 0)  # nothing was used: this call's grant goes back
            raise
        if budget is not None:
            await budget.reconcile(hold, value)
        if not request.no_store and value is not None:
            await self._exact_put(request.query, request.digest, value, request.ttl)
            semantic = self._semantic
            if semantic is not None:
                await self._semantic_guard.call(
                    lambda: semantic.put(request.query, value, ttl_seconds=request.ttl), None
                )
        return value

    async def _invoke(self, call: ProviderCall) -> Any:
        pending = call()
        if not inspect.isawaitable(pending):
            raise InvalidInputTypeError(
                "the provider must be async: it returned "
                f"{type(pending).__name__}, not an awaitable"
            )
        if self._provider_timeout is None:
            value = await pending
        else:
            try:
                with deadline(self._provider_timeout):
                    value = await pending
            except TimeoutError as exc:
                raise ProviderTimeoutError(
                    f"the provider did not answer within {self._provider_timeout} s"
                ) from exc
        if hasattr(value, "__aiter__") and not isinstance(value, BaseModel):
            # one-shot: shared by coalesced callers, only the first would read it
            raise InvalidInputTypeError(
                "the provider returned a stream for a request that does not stream: use "
                'gateway.stream(query), a query with "stream": True, or '
                "@cached_completion(stream=True)"
            )
        return value

    # -- cache access: every failure is absorbed by a guard --------------------------

    async def _exact_get(self, query: Query, digest: str, unavailable: Any = None) -> Any:
        """The exact cache's value, None on a miss, ``unavailable`` if it could not answer."""
        exact, keyed, guard = self._exact, self._keyed, self._exact_guard_of(digest)
        if guard is None:
            if keyed is not None:
                return await keyed.get_by_signature(digest)
            return await exact.get(query)
        if keyed is not None:
            return await guard.call(lambda: keyed.get_by_signature(digest), unavailable)
        return await guard.call(lambda: exact.get(query), unavailable)

    async def _plain_get(self, query: Query, digest: str) -> Any:
        value = await self._exact_get(query, digest)
        return None if type(value) is RecordedStream else value

    async def _semantic_lookup(self, query: Query) -> tuple[Any, SemanticHit | None]:
        """The semantic cache's answer (None: a miss or a failure) and, when the cache
        can tell which entry answered and how long it has left, that hit."""
        semantic = self._semantic
        assert semantic is not None
        if isinstance(semantic, PromotingSemanticCache):
            hit = await self._semantic_guard.call(lambda: semantic.lookup(query), None)
            return (None, None) if hit is None else (hit.value, hit)
        return await self._semantic_guard.call(lambda: semantic.get(query), None), None

    async def _shadow_probe(self, query: Query) -> None:
        """Record what the semantic cache would serve for ``query`` (shadow mode).

        The probe runs under the semantic cache's guard: a failure is counted in
        ``backend_errors`` like any semantic lookup's and records nothing.
        """
        # checked at construction: a shadow gateway's semantic cache can probe
        semantic = cast(ProbingSemanticCache, self._semantic)
        probe = await self._semantic_guard.call(lambda: semantic.probe(query), None)
        if probe is not None:
            self._shadow.add(probe)

    @property
    def semantic_mode(self) -> SemanticMode:
        """``"serve"``, ``"shadow"`` or ``"off"`` (see the class docstring)."""
        return self._semantic_mode

    def shadow_records(self, *, clear: bool = False) -> list[ShadowRecord]:
        """The newest shadow records kept (at most ``shadow_log_size``), oldest first.

        A copy; ``clear=True`` also empties the log. Label them
        (``record.labelled(True)``) and pass them to
        :func:`~aiocache_llm.semantic.calibrate_threshold`.
        """
        return self._shadow.records(clear=clear)

    async def _promote_hit(self, hit: SemanticHit | None, digest: str, ttl: float | None) -> None:
        """Copy a semantic hit into the exact cache under the request's own key.

        The semantic cache does it (:meth:`PromotingSemanticCache.promote`): the copy
        lives ``ttl`` (None: the exact cache's default) but never longer than the
        original has left, and is deleted with the original. Nothing is promoted
        without ``promote_semantic_hits``, from a semantic cache that cannot tell its
        hits' lifetimes, or into an exact cache the original cannot reach.
        """
        promoter, keyed = self._promoter, self._keyed
        if promoter is None or hit is None or keyed is None:
            return
        await self._semantic_guard.call(
            lambda: promoter.promote(hit, keyed, digest, ttl_seconds=ttl), None
        )

    def _exact_guard_of(self, digest: str) -> BackendGuard | None:
        """The exact cache's guard for ``digest``: that of the node serving its key."""
        guards = self._exact_guards
        if guards is None:
            return None
        return guards.for_key(f"{self._exact_prefix}:{digest}")

    def breaker_states(self) -> dict[str, BreakerState]:
        """Every circuit breaker of this gateway and its state now, by guard name.

        The exact cache and fleet leases have one breaker per cluster node that served
        a key so far (named ``"exact cache on host:port"``), besides the global one
        (``"exact cache"``: keys whose node is unknown, a single server, an in-process
        cache). ``stats()`` sums the counters of all of them.
        """
        return {guard.name: guard.state for guard in self._guards()}

    def _guards(self) -> list[BackendGuard]:
        guards = [self._semantic_guard, self._limiter_guard]
        for group in (self._exact_guards, self._lease_guards):
            if group is not None:
                guards.extend(group.all())
        return guards

    async def _exact_put(self, query: Query, digest: str, value: Any, ttl: float | None) -> None:
        exact, keyed = self._exact, self._keyed

        async def put() -> None:
            if keyed is not None:
                await keyed.put_by_signature(digest, value, ttl_seconds=ttl)
            else:
                await exact.put(query, value, ttl_seconds=ttl)

        guard = self._exact_guard_of(digest)
        if guard is not None:
            await guard.call(put, None)
            return
        try:
            await put()
        except InvalidInputError as exc:
            # an answer the cache cannot hold is still an answer: serve it, uncached
            logger.warning("exact cache refused an answer: %s", type(exc).__name__)

    # -- warm-up, stats, lifecycle ---------------------------------------------------

    async def warm(
        self, queries: Iterable[Query], *, concurrency: int = 8, user_id: str | None = None
    ) -> WarmReport:
        """Resolve every query (provider only on a miss), ``concurrency`` at a time.

        A query with a truthy ``stream`` is streamed to its end, so its recording is
        stored too.

        Never stops on a failure: each failed query and its exception is reported.
        Memory use is O(concurrency + failures), whatever the number of queries.
        """
        self._check_open()
        check_positive_int("concurrency", concurrency)
        calls_before = self._provider_calls
        answered, failed = await resolve_all(
            lambda query: self._warm_one(query, user_id), queries, concurrency
        )
        return WarmReport(ok=answered, computed=self._provider_calls - calls_before, failed=failed)

    async def _warm_one(self, query: Query, user_id: str | None) -> None:
        answer = await self.resolve(query, user_id)
        if isinstance(answer, ChunkStream):
            async with answer:  # a stream is stored once it has been read to its end
                async for _ in answer:
                    pass

    @property
    def exact_cache(self) -> AsyncExactCache:
        """The exact cache this gateway reads and fills."""
        return self._exact

    def stats(self) -> GatewayStats:
        """Return a frozen snapshot of this gateway's counters and latency percentiles."""
        guards = self._guards()
        p50, p90, p99 = self._latency.percentiles_ms(0.5, 0.9, 0.99)
        return GatewayStats(
            requests=self._requests,
            exact_hits=self._exact_hits,
            semantic_hits=self._semantic_hits,
            misses=self._misses,
            coalesced=self._coalesced,
            fleet_hits=(self._fleet.waited if self._fleet is not None else 0)
            + (self._fleet_streams.followed if self._fleet_streams is not None else 0),
            provider_calls=self._provider_calls,
            provider_errors=self._provider_errors,
            rate_limited=self._budget.refused if self._budget is not None else 0,
            backend_errors=sum(g.errors for g in guards),
            backend_skipped=sum(g.skipped for g in guards),
            in_flight=len(self._flight) + len(self._streams),
            stream_requests=self._streams.requests,
            stream_hits=self._streams.hits,
            streams_shared=self._streams.shared,
            chunks_replayed=self._streams.replayed,
            streams_abandoned=self._streams.abandoned,
            shadow_lookups=self._shadow.lookups,
            shadow_would_hit=self._shadow.would_hit,
            shadow_refused=self._shadow.refused,
            shadow_callback_errors=self._shadow.callback_errors,
            latency_p50_ms=p50,
            latency_p90_ms=p90,
            latency_p99_ms=p99,
        )

    async def _release(self) -> None:
        await self._shadow.aclose()
        await self._streams.aclose(self._close_timeout)
        if self._fleet is not None:
            await self._fleet.aclose()
        if self._owns_exact:
            await self._exact.aclose()
