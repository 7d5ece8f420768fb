"""The Anthropic SDK through the gateway (the ``aiocache_llm[anthropic]`` extra).

::

    from anthropic import AsyncAnthropic
    from aiocache_llm.integrations.anthropic import wrap_anthropic

    client = wrap_anthropic(AsyncAnthropic(), ttl_seconds=3600)
    message = await client.messages.create(model=..., max_tokens=512, messages=[...])
    stream = await client.messages.create(model=..., max_tokens=512, messages=[...], stream=True)
    async for event in stream:  # RawMessageStartEvent, RawContentBlockDeltaEvent, ...
        ...

- :class:`AnthropicProvider` is a gateway provider (``complete``, ``stream``) over an
  ``AsyncAnthropic``, for an :class:`InferenceGateway` built by hand.
- :func:`wrap_anthropic` returns a :class:`CachedAnthropic`: ``messages.create`` answers
  through an :class:`InferenceGateway` (its ``.gateway``) with the SDK's own types, and
  every other attribute is the wrapped client's own (not cached).

Per-request cache control is the one extra keyword ``cache=`` (see
:class:`CacheOptions`), removed before the SDK call; every other argument reaches the
SDK unchanged. Entries are filed under a *namespace* that defaults to the client's
``base_url`` and the workspace, user profile and beta features it sends on every
request (its ``anthropic-workspace-id``, ``anthropic-user-profile-id`` and
``anthropic-beta`` headers), never its API key or auth token, so clients of different
endpoints or workspaces never share answers unless they are given the same
``namespace=``.

Credentials stay out of the logs too: this SDK logs every request's options at DEBUG,
``extra_headers`` included, so the first :class:`AnthropicProvider` (every
:func:`wrap_anthropic` makes one) adds a filter to the ``anthropic._base_client`` logger
that replaces the values of credential headers (``x-api-key``, ``authorization``,
``proxy-authorization``, ``api-key``, ``cookie``) in those records with
``"<redacted>"``. The requests themselves are unchanged.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

from pydantic import BaseModel

from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.query import IGNORED_FIELDS, Query, as_request
from aiocache_llm.core.validation import check_bool
from aiocache_llm.gateway.gateway import InferenceGateway
from aiocache_llm.gateway.streaming import ChunkStream
from aiocache_llm.integrations.wrapping import (
    CacheOptions,
    WrappedClient,
    check_namespace,
    create_through,
    endpoint,
    gateway_for,
    new_id,
)
from aiocache_llm.integrations.wrapping import cache_options as _cache_options
from aiocache_llm.integrations.wrapping import key_value as _key_value

try:
    import anthropic
    from anthropic import AsyncStream
    from anthropic.types import Message, RawMessageStartEvent, RawMessageStreamEvent
except ImportError as exc:
    raise ImportError(
        "aiocache_llm.integrations.anthropic needs the anthropic package: "
        "pip install 'aiocache_llm[anthropic]'"
    ) from exc

__all__ = [
    "HEADERS_FIELD",
    "KEYED_HEADERS",
    "NAMESPACE_FIELD",
    "AnthropicProvider",
    "CacheOptions",
    "CachedAnthropic",
    "anthropic_value_types",
    "default_namespace",
    "wrap_anthropic",
]

NAMESPACE_FIELD = "aiocache_llm_namespace"
"""Added to every request's key by :func:`wrap_anthropic`: the wrapper's namespace."""

KEYED_HEADERS: tuple[str, ...] = (
    "anthropic-beta",
    "anthropic-user-profile-id",
    "anthropic-version",
    "anthropic-workspace-id",
)
"""Request headers (lower case) that change the answer or whose account answers it.

``extra_headers`` is among :data:`IGNORED_FIELDS` (trace ids and the like must not split
the cache), but these headers select beta features, the API version, the workspace or
the user profile: the ones a request's ``extra_headers`` sets are kept in its key under
:data:`HEADERS_FIELD`. None of them is a credential."""

HEADERS_FIELD = "aiocache_llm_headers"
"""Where a request's :data:`KEYED_HEADERS` are kept in its key."""

# the client-level headers that pick the account or change every answer of a client
_SCOPE_HEADERS = ("anthropic-workspace-id", "anthropic-user-profile-id", "anthropic-beta")
_UNSET_TYPES = (anthropic.NotGiven, anthropic.Omit)
_CREDENTIAL_HEADERS = frozenset(
    {"x-api-key", "authorization", "proxy-authorization", "api-key", "cookie"}
)


def anthropic_value_types() -> tuple[type[BaseModel], ...]:
    """The SDK types a cache must know to store Anthropic answers.

    ``Message`` and every concrete class of the installed SDK's ``RawMessageStreamEvent``
    union (``RawMessageStartEvent``, ``RawContentBlockDeltaEvent``, ...), read from the
    union itself so that an SDK that adds an event type is covered.
    """
    types: list[type[BaseModel]] = [Message]
    pending: list[Any] = [RawMessageStreamEvent]
    while pending:  # unwrap Annotated[Union[...], ...] and any nesting of them
        item = pending.pop(0)
        if isinstance(item, type) and issubclass(item, BaseModel):
            if item not in types:
                types.append(item)
        else:
            pending.extend(typing.get_args(item))
    return tuple(types)


def _check_client(client: object) -> None:
    """Raise :class:`InvalidInputTypeError` unless ``client`` looks like an ``AsyncAnthropic``."""
    if isinstance(client, CachedAnthropic):
        raise InvalidInputTypeError(
            "client is already wrapped by wrap_anthropic: pass the AsyncAnthropic client itself"
        )
    if isinstance(client, anthropic.Anthropic):
        raise InvalidInputTypeError(
            "client is the synchronous anthropic.Anthropic: the gateway needs an "
            "anthropic.AsyncAnthropic"
        )
    if not callable(getattr(getattr(client, "messages", None), "create", None)):
        raise InvalidInputTypeError(
            "client must be an anthropic.AsyncAnthropic (an object with an async "
            f"messages.create), got {type(client).__name__}"
        )


def _sdk_request(query: Query) -> dict[str, Any]:
    """The keyword arguments of one SDK call for a gateway query (a mapping or a model)."""
    if isinstance(query, str):
        raise InvalidInputTypeError(
            "an Anthropic query must be a mapping of messages.create arguments "
            "(model, max_tokens, messages, ...), not a str"
        )
    return dict(query) if isinstance(query, Mapping) else as_request(query)


class AnthropicProvider:
    """A gateway provider over an ``anthropic.AsyncAnthropic`` (or a compatible client).

    ``await provider.complete(query)`` is ``await client.messages.create(**query)`` (a
    ``Message``); ``await provider.stream(query)`` is the same call with ``stream=True``
    (the SDK's ``AsyncStream`` of raw stream events), which :class:`InferenceGateway`
    uses for streamed requests. SDK errors propagate unchanged. Register
    :attr:`value_types` with the caches that store its answers.

    Raises :class:`InvalidInputTypeError` for a client without an async
    ``messages.create`` (the synchronous ``anthropic.Anthropic`` included).
    """

    __slots__ = ("_client",)

    def __init__(self, client: anthropic.AsyncAnthropic) -> None:
        _check_client(client)
        _redact_sdk_logs()
        self._client = client

    def __repr__(self) -> str:
        return f"AnthropicProvider({type(self._client).__name__})"

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        """The SDK client this provider calls."""
        return self._client

    @property
    def value_types(self) -> tuple[type[BaseModel], ...]:
        """The SDK types its answers are made of (see :func:`anthropic_value_types`)."""
        return anthropic_value_types()

    async def complete(self, query: Query) -> Message:
        """Return ``await client.messages.create(**query)``.

        Raises :class:`InvalidInputError` for a query asking for a stream (use
        :meth:`stream`), :class:`InvalidInputTypeError` for a ``str`` query, and whatever
        the SDK raises. Cancelling it cancels the HTTP request.
        """
        request = _sdk_request(query)
        if request.get("stream") is True:
            raise InvalidInputError("complete() cannot stream: use stream(query)")
        create: Any = self._client.messages.create
        message: Message = await create(**request)
        return message

    async def stream(self, query: Query) -> AsyncStream[RawMessageStreamEvent]:
        """Return the SDK's raw event stream for ``query`` (``create(**query, stream=True)``).

        The HTTP response is open once this returns: iterate the stream to its end or
        close it (the gateway does both). Raises like :meth:`complete`; errors met
        mid-stream come out of the iteration (``anthropic.APIConnectionError``, or the
        ``APIStatusError`` of an ``error`` event).
        """
        request = {**_sdk_request(query), "stream": True}
        create: Any = self._client.messages.create
        stream: AsyncStream[RawMessageStreamEvent] = await create(**request)
        return stream


class _RedactCredentialHeaders(logging.Filter):
    """Replaces credential header values in the SDK's ``Request options`` debug record.

    This SDK logs each request's options at DEBUG, ``extra_headers`` included, without
    redacting them; ``extra_headers={"x-api-key": ...}`` would put a key in the logs.
    The record's arguments are replaced, never mutated: the SDK still sends the header.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, Mapping):
            headers = args.get("headers")
            if isinstance(headers, Mapping) and any(
                str(name).lower() in _CREDENTIAL_HEADERS for name in headers
            ):
                redacted = {
                    name: "<redacted>" if str(name).lower() in _CREDENTIAL_HEADERS else value
                    for name, value in headers.items()
                }
                record.args = {**args, "headers": redacted}
        return True


_REDACT_CREDENTIAL_HEADERS = _RedactCredentialHeaders()


def _redact_sdk_logs() -> None:
    """Install the redaction on the SDK logger that writes request options (idempotent:
    ``addFilter`` ignores a filter it already has)."""
    logging.getLogger("anthropic._base_client").addFilter(_REDACT_CREDENTIAL_HEADERS)


def _client_headers(client: object) -> dict[str, str]:
    """The client-level headers (lower-case names) it sends on every request, if readable."""
    try:
        headers = getattr(client, "default_headers", None)
    except Exception:  # a look-alike's property may fail: it has no such headers then
        return {}
    if not isinstance(headers, Mapping):
        return {}
    return {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}


def default_namespace(client: object) -> str:
    """The namespace :func:`wrap_anthropic` files a client's entries under by default.

    Built from the client's ``base_url`` (without credentials, query or fragment) and
    the ``anthropic-workspace-id``, ``anthropic-user-profile-id`` and ``anthropic-beta``
    headers it sends on every request (set by ``default_headers`` or a credentials
    profile); never from its API key, auth token or any other header. Clients that
    differ in one of them never share entries.
    """
    url = endpoint(client)
    headers = _client_headers(client)
    identity = [url, *(headers.get(name) for name in _SCOPE_HEADERS)]
    return "anthropic:" + json.dumps(identity, separators=(",", ":"), default=str)


def _keyed_headers(extra_headers: object) -> dict[str, str | None]:
    """The :data:`KEYED_HEADERS` a request's ``extra_headers`` sets (``omit`` ones too,
    as ``None``: removing a client-level workspace header is a change of account)."""
    if not isinstance(extra_headers, Mapping):
        return {}
    keyed: dict[str, str | None] = {}
    for name, value in extra_headers.items():
        lowered = str(name).lower()
        if lowered in KEYED_HEADERS:
            keyed[lowered] = None if isinstance(value, _UNSET_TYPES) else str(value)
    return keyed


class CachedMessages:
    """``wrapped.messages``: :meth:`create` goes through the gateway; every other attribute
    (``stream``, ``parse``, ``count_tokens``, ``batches``, ``with_raw_response``, ...) is
    the client's own, not cached."""

    __slots__ = ("_owner",)

    def __init__(self, owner: CachedAnthropic) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._owner.client.messages, name)

    @overload
    async def create(
        self, *, stream: Literal[True], cache: CacheOptions | None = None, **kwargs: Any
    ) -> ChunkStream: ...

    @overload
    async def create(
        self,
        *,
        stream: Literal[False] | None = None,
        cache: CacheOptions | None = None,
        **kwargs: Any,
    ) -> Message: ...

    @overload
    async def create(
        self, *, stream: bool, cache: CacheOptions | None = None, **kwargs: Any
    ) -> Message | ChunkStream: ...

    async def create(
        self, *, cache: CacheOptions | None = None, **kwargs: Any
    ) -> Message | ChunkStream:
        """``client.messages.create(**kwargs)``, answered through the gateway.

        Returns a ``Message`` (from the cache, a call in flight or the SDK), or, with
        ``stream=True``, a :class:`ChunkStream` of the SDK's raw stream events (the same
        classes, in the same order, as ``AsyncAnthropic.messages.create(stream=True)``
        yields: ``RawMessageStartEvent``, ``RawContentBlockStartEvent``,
        ``RawContentBlockDeltaEvent``, ..., ``RawMessageStopEvent``) that has already
        received its first event (``stream = await create(..., stream=True)``, then
        ``async for event in stream``; ``async with stream`` or ``await stream.aclose()``
        to stop early).

        ``cache`` (see :class:`CacheOptions`) is removed before the SDK call; every other
        argument reaches the SDK unchanged. The key is the request without the fields
        that never change the answer (``IGNORED_FIELDS``: ``timeout``, ``extra_headers``,
        ``extra_query``, ``metadata``, ...) and without arguments left
        ``anthropic.NOT_GIVEN``/``anthropic.omit``, plus the wrapper's namespace and the
        :data:`KEYED_HEADERS` that ``extra_headers`` sets. ``workspace_id`` and
        ``user_profile_id`` are arguments like any other: they are in the key.

        A ``Message`` that did not come from this call's own HTTP response (a hit, or a
        share of a concurrent identical call) is equal to the stored one (same ``id``)
        and has ``_request_id`` and ``_workspace_id`` ``None``; stream events carry
        neither, as the SDK's own. With ``wrap_anthropic(..., fresh_hit_ids=True)`` such
        an answer gets a new ``id`` (``msg_01`` and 22 letters and digits): the
        ``Message``, or the message of a replayed stream's ``message_start`` event. An
        answer from this call's own response is always returned as the SDK gave it.

        Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` for bad cache
        options or a request that cannot be keyed (before any I/O),
        :class:`RateLimitExceeded`, :class:`ProviderTimeoutError`, and whatever the SDK
        raises (``anthropic.APIStatusError`` and so on; never cached). Cancelling the
        call never cancels the SDK call other callers share.
        """
        owner = self._owner
        answer: Message | ChunkStream = await create_through(
            owner.gateway,
            owner.client.messages.create,
            kwargs,
            _cache_options(cache),
            key_query=owner.key_query,
            unset_types=_UNSET_TYPES,
            refresher=_new_refresher if owner.fresh_hit_ids else None,
            response_fields=("_request_id", "_workspace_id"),
        )
        return answer


def _new_refresher() -> Callable[[Any], Any]:
    """A refresher with a new id in the SDK's style (``msg_01`` and 22 letters and digits)."""
    return _refresher(new_id("msg_01", 22))


def _refresher(message_id: str) -> Callable[[Any], Any]:
    """A copy of a ``Message`` (or of a ``message_start`` event's message) with ``message_id``;
    other stream events carry no id and pass unchanged."""

    def refresh(answer: Any) -> Any:
        if isinstance(answer, Message):
            return answer.model_copy(update={"id": message_id})
        if isinstance(answer, RawMessageStartEvent):
            message = answer.message.model_copy(update={"id": message_id})
            return answer.model_copy(update={"message": message})
        return answer

    return refresh


class CachedAnthropic(WrappedClient):
    """What :func:`wrap_anthropic` returns: an ``AsyncAnthropic`` whose messages are cached.

    ``messages.create`` answers through :attr:`gateway`; any other attribute
    (``models``, ``beta``, ``with_options``, ``api_key``, ...) is the wrapped client's own
    and is not cached. ``aclose()`` (or leaving ``async with``) closes the gateway and
    the cache built for it; the wrapped client stays open: it is the caller's (close it
    with ``await wrapped.client.close()``).
    """

    __slots__ = ("messages",)

    def __init__(
        self,
        client: anthropic.AsyncAnthropic,
        gateway: InferenceGateway,
        namespace: str,
        owned_cache: MemoryExactCache | None,
        *,
        fresh_hit_ids: bool = False,
    ) -> None:
        super().__init__(client, gateway, namespace, owned_cache, fresh_hit_ids=fresh_hit_ids)
        self.messages = CachedMessages(self)

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        """The wrapped SDK client."""
        client: anthropic.AsyncAnthropic = self._client
        return client

    def key_query(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The query that files ``create(**kwargs)`` in the caches (``cache=`` excluded).

        Arguments left ``NOT_GIVEN``/``omit`` are dropped, pydantic models become the
        JSON the SDK sends, the namespace is added and, when ``extra_headers`` sets some
        of the :data:`KEYED_HEADERS`, those. Fields in ``IGNORED_FIELDS`` are kept here
        (the cache's normalizer drops them, a custom ``normalize=`` sees them).
        """
        key: dict[str, Any] = {}
        for name, value in kwargs.items():
            if isinstance(value, _UNSET_TYPES):
                continue
            key[name] = value if name in IGNORED_FIELDS else _key_value(value)
        key[NAMESPACE_FIELD] = self._namespace
        headers = _keyed_headers(kwargs.get("extra_headers"))
        if headers:
            key[HEADERS_FIELD] = headers
        return key


def wrap_anthropic(
    client: anthropic.AsyncAnthropic,
    *,
    namespace: str | None = None,
    fresh_hit_ids: bool = False,
    **gateway_options: Any,
) -> CachedAnthropic:
    """Return ``client`` with its messages answered through an :class:`InferenceGateway`.

    ``gateway_options`` are :class:`InferenceGateway`'s keyword arguments
    (``exact_cache``, ``semantic_cache``, ``rate_limiter``, ``ttl_seconds``, ...); the
    provider is an :class:`AnthropicProvider` over ``client``. Without ``exact_cache``, a
    :class:`MemoryExactCache` is built (with ``normalize=`` when given) that knows the
    SDK types, closed by ``aclose()``. A cache passed in is taught the SDK types when it
    exposes a ``codec`` with ``register(cls)`` (both exact caches of this library do),
    so a :class:`RedisExactCache` needs no ``value_types``; other caches are used as is.

    ``namespace`` (default :func:`default_namespace`: the client's ``base_url`` and its
    workspace, user profile and beta headers, never its API key) is added to every key: give
    several clients the same ``namespace`` to let them share entries.

    ``fresh_hit_ids=True`` gives every answer that did not come from its own HTTP
    response (a hit, a shared call) a new message ``id``, for applications whose
    downstream rejects repeated ids; by default a hit is equal to what was stored.

    Raises :class:`InvalidInputTypeError` for a client that is not an ``AsyncAnthropic``
    and :class:`InvalidInputError` for a bad namespace or option (as the gateway does).
    """
    _check_client(client)
    namespace = check_namespace(namespace, lambda: default_namespace(client))
    fresh = check_bool("fresh_hit_ids", fresh_hit_ids)
    provider = AnthropicProvider(client)
    gateway, owned = gateway_for("wrap_anthropic", provider, provider.value_types, gateway_options)
    return CachedAnthropic(client, gateway, namespace, owned, fresh_hit_ids=fresh)
