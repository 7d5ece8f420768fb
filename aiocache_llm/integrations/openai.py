"""The OpenAI SDK through the gateway (the ``aiocache_llm[openai]`` extra).

::

    from openai import AsyncOpenAI
    from aiocache_llm.integrations.openai import wrap_openai

    client = wrap_openai(AsyncOpenAI(), ttl_seconds=3600)
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=[...])
    stream = await client.chat.completions.create(model=..., messages=[...], stream=True)
    async for chunk in stream:  # ChatCompletionChunk objects
        ...

- :class:`OpenAIProvider` is a gateway provider (``complete``, ``stream``) over an
  ``AsyncOpenAI``, for an :class:`InferenceGateway` built by hand.
- :func:`wrap_openai` returns a :class:`CachedOpenAI`: ``chat.completions.create``
  answers through an :class:`InferenceGateway` (its ``.gateway``) with the SDK's own
  types, and every other attribute is the wrapped client's own (not cached).

Per-request cache control is the one extra keyword ``cache=`` (see
:class:`CacheOptions`), removed before the SDK call; every other argument reaches the
SDK unchanged. Entries are filed under a *namespace* that defaults to the client's
``base_url``, ``organization`` and ``project`` (never its API key), so clients of
different endpoints, organizations or projects never share answers unless they are
given the same ``namespace=``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, overload

from pydantic import BaseModel

from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.query import IGNORED_FIELDS, Query, as_request
from aiocache_llm.gateway.gateway import InferenceGateway
from aiocache_llm.gateway.streaming import ChunkStream
from aiocache_llm.integrations.wrapping import (
    CacheOptions,
    WrappedClient,
    check_namespace,
    endpoint,
    gateway_for,
)
from aiocache_llm.integrations.wrapping import cache_options as _cache_options
from aiocache_llm.integrations.wrapping import is_one_shot as _is_one_shot
from aiocache_llm.integrations.wrapping import key_value as _key_value

try:
    import openai
    from openai import AsyncStream
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError as exc:
    raise ImportError(
        "aiocache_llm.integrations.openai needs the openai package: "
        "pip install 'aiocache_llm[openai]'"
    ) from exc

__all__ = [
    "NAMESPACE_FIELD",
    "STREAM_OPTIONS_FIELD",
    "CacheOptions",
    "CachedOpenAI",
    "OpenAIProvider",
    "default_namespace",
    "openai_value_types",
    "wrap_openai",
]

NAMESPACE_FIELD = "aiocache_llm_namespace"
"""Added to every request's key by :func:`wrap_openai`: the wrapper's namespace."""

STREAM_OPTIONS_FIELD = "aiocache_llm_stream_options"
"""A streamed request's ``stream_options``, kept in its key under this name.

``stream_options`` is among :data:`IGNORED_FIELDS`, but ``include_usage`` changes the
chunks (a last chunk carrying the usage): a stream recorded without it must not answer
a request that asks for it."""


def openai_value_types() -> tuple[type[BaseModel], ...]:
    """The SDK types a cache must know to store OpenAI answers.

    ``ChatCompletion``, ``ChatCompletionChunk`` and, when the installed SDK has it,
    ``ParsedChatCompletion``.
    """
    types: list[type[BaseModel]] = [ChatCompletion, ChatCompletionChunk]
    try:
        from openai.types.chat import ParsedChatCompletion
    except ImportError:  # pragma: no cover - SDKs before structured outputs
        return tuple(types)
    types.append(ParsedChatCompletion)
    return tuple(types)


def _check_client(client: object) -> None:
    """Raise :class:`InvalidInputTypeError` unless ``client`` looks like an ``AsyncOpenAI``."""
    if isinstance(client, CachedOpenAI):
        raise InvalidInputTypeError(
            "client is already wrapped by wrap_openai: pass the AsyncOpenAI client itself"
        )
    if isinstance(client, openai.OpenAI):
        raise InvalidInputTypeError(
            "client is the synchronous openai.OpenAI: the gateway needs an openai.AsyncOpenAI"
        )
    completions = getattr(getattr(client, "chat", None), "completions", None)
    if not callable(getattr(completions, "create", None)):
        raise InvalidInputTypeError(
            "client must be an openai.AsyncOpenAI (an object with an async "
            f"chat.completions.create), got {type(client).__name__}"
        )


def _sdk_request(query: Query) -> dict[str, Any]:
    """The keyword arguments of one SDK call for a gateway query (a mapping or a model)."""
    if isinstance(query, str):
        raise InvalidInputTypeError(
            "an OpenAI query must be a mapping of chat.completions.create arguments "
            "(model, messages, ...), not a str"
        )
    return dict(query) if isinstance(query, Mapping) else as_request(query)


class OpenAIProvider:
    """A gateway provider over an ``openai.AsyncOpenAI`` (or a compatible client).

    ``await provider.complete(query)`` is ``await client.chat.completions.create(**query)``
    (a ``ChatCompletion``); ``await provider.stream(query)`` is the same call with
    ``stream=True`` (the SDK's ``AsyncStream`` of ``ChatCompletionChunk``), which
    :class:`InferenceGateway` uses for streamed requests. SDK errors propagate unchanged.
    Register :attr:`value_types` with the caches that store its answers.

    Raises :class:`InvalidInputTypeError` for a client without an async
    ``chat.completions.create`` (the synchronous ``openai.OpenAI`` included).
    """

    __slots__ = ("_client",)

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        _check_client(client)
        self._client = client

    def __repr__(self) -> str:
        return f"OpenAIProvider({type(self._client).__name__})"

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client this provider calls."""
        return self._client

    @property
    def value_types(self) -> tuple[type[BaseModel], ...]:
        """The SDK types its answers are made of (see :func:`openai_value_types`)."""
        return openai_value_types()

    async def complete(self, query: Query) -> ChatCompletion:
        """Return ``await client.chat.completions.create(**query)``.

        Raises :class:`InvalidInputError` for a query asking for a stream (use
        :meth:`stream`), :class:`InvalidInputTypeError` for a ``str`` query, and whatever
        the SDK raises. Cancelling it cancels the HTTP request.
        """
        request = _sdk_request(query)
        if request.get("stream") is True:
            raise InvalidInputError("complete() cannot stream: use stream(query)")
        create: Any = self._client.chat.completions.create
        completion: ChatCompletion = await create(**request)
        return completion

    async def stream(self, query: Query) -> AsyncStream[ChatCompletionChunk]:
        """Return the SDK's stream for ``query`` (``create(**query, stream=True)``).

        The HTTP response is open once this returns: iterate the stream to its end or
        close it (the gateway does both). Raises like :meth:`complete`, and errors met
        mid-stream come out of the iteration (``openai.APIConnectionError`` and so on).
        """
        request = {**_sdk_request(query), "stream": True}
        create: Any = self._client.chat.completions.create
        stream: AsyncStream[ChatCompletionChunk] = await create(**request)
        return stream


def default_namespace(client: object) -> str:
    """The namespace :func:`wrap_openai` files a client's entries under by default.

    Built from the client's ``base_url`` (without credentials, query or fragment),
    ``organization`` and ``project``; never from its API key or headers. Clients that
    differ in any of the three never share entries.
    """
    url = endpoint(client)
    organization = getattr(client, "organization", None)
    project = getattr(client, "project", None)
    identity = [url, organization, project]
    return "openai:" + json.dumps(identity, separators=(",", ":"), default=str)


class CachedCompletions:
    """``wrapped.chat.completions``: :meth:`create` goes through the gateway; every other
    attribute (``parse``, ``with_raw_response``, ...) is the client's own, not cached."""

    __slots__ = ("_owner",)

    def __init__(self, owner: CachedOpenAI) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._owner.client.chat.completions, name)

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
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self, *, stream: bool, cache: CacheOptions | None = None, **kwargs: Any
    ) -> ChatCompletion | ChunkStream: ...

    async def create(
        self, *, cache: CacheOptions | None = None, **kwargs: Any
    ) -> ChatCompletion | ChunkStream:
        """``client.chat.completions.create(**kwargs)``, answered through the gateway.

        Returns a ``ChatCompletion`` (from the cache, a call in flight or the SDK), or,
        with ``stream=True``, a :class:`ChunkStream` of ``ChatCompletionChunk`` that has
        already received its first chunk (``stream = await create(..., stream=True)``,
        then ``async for chunk in stream``; ``async with stream`` or
        ``await stream.aclose()`` to stop early).

        ``cache`` (see :class:`CacheOptions`) is removed before the SDK call; every other
        argument reaches the SDK unchanged (``stream_options`` included). The key is the
        request without the fields that never change the answer (``IGNORED_FIELDS``:
        ``timeout``, ``extra_headers``, ``extra_query``, ``user``, ...) and without
        arguments left ``openai.NOT_GIVEN``/``openai.omit``, plus the wrapper's namespace;
        a streamed request also keeps its ``stream_options`` in its key.

        Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` for bad cache
        options or a request that cannot be keyed (before any I/O),
        :class:`RateLimitExceeded`, :class:`ProviderTimeoutError`, and whatever the SDK
        raises (``openai.APIStatusError`` and so on; never cached). Cancelling the call
        never cancels the SDK call other callers share.
        """
        options = _cache_options(cache)
        owner = self._owner
        stream = kwargs.get("stream")
        if not (stream is None or type(stream) is bool or isinstance(stream, _UNSET_TYPES)):
            raise InvalidInputTypeError(f"stream must be a bool, got {type(stream).__name__}")
        # an iterator is read once for the key, so the SDK must get the same items
        kwargs = {name: list(v) if _is_one_shot(v) else v for name, v in kwargs.items()}
        key_query = owner.key_query(kwargs)
        create: Any = owner.client.chat.completions.create
        gateway = owner.gateway
        if stream is True:
            chunks = gateway.stream_with(
                key_query,
                lambda: create(**kwargs),
                options.get("user_id"),
                no_cache=options.get("no_cache", False),
                no_store=options.get("no_store", False),
                ttl_seconds=options.get("ttl_seconds"),
            )
            # as the SDK's create(stream=True): errors before the first chunk raise here
            try:
                return await chunks.start()
            except BaseException:
                # cancelled or failed before the caller got it: nobody will read or close
                # it, and an open consumer would keep a shared stream from being abandoned
                await chunks.aclose()
                raise
        completion: ChatCompletion = await gateway.resolve_with(
            key_query,
            lambda: create(**kwargs),
            options.get("user_id"),
            no_cache=options.get("no_cache", False),
            no_store=options.get("no_store", False),
            ttl_seconds=options.get("ttl_seconds"),
        )
        if not hasattr(completion, "_request_id"):
            # a hit: the SDK's public _request_id names one HTTP response, which this
            # answer did not come from; None, as on an object the SDK built without one
            completion._request_id = None
        return completion


_UNSET_TYPES = (openai.NotGiven, openai.Omit)


class CachedChat:
    """``wrapped.chat``: ``completions`` is cached, every other attribute is the client's."""

    __slots__ = ("_owner", "completions")

    def __init__(self, owner: CachedOpenAI) -> None:
        self._owner = owner
        self.completions = CachedCompletions(owner)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._owner.client.chat, name)


class CachedOpenAI(WrappedClient):
    """What :func:`wrap_openai` returns: an ``AsyncOpenAI`` whose chat completions are cached.

    ``chat.completions.create`` answers through :attr:`gateway`; any other attribute
    (``models``, ``embeddings``, ``with_options``, ``api_key``, ...) is the wrapped
    client's own and is not cached. ``aclose()`` (or leaving ``async with``) closes the
    gateway and the cache built for it; the wrapped client stays open: it is the
    caller's (close it with ``await wrapped.client.close()``).
    """

    __slots__ = ("chat",)

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        gateway: InferenceGateway,
        namespace: str,
        owned_cache: MemoryExactCache | None,
    ) -> None:
        super().__init__(client, gateway, namespace, owned_cache)
        self.chat = CachedChat(self)

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The wrapped SDK client."""
        client: openai.AsyncOpenAI = self._client
        return client

    def key_query(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The query that files ``create(**kwargs)`` in the caches (``cache=`` excluded).

        Arguments left ``NOT_GIVEN``/``omit`` are dropped, pydantic models become the
        JSON the SDK sends, the namespace is added and, for a stream, its
        ``stream_options``. Fields in ``IGNORED_FIELDS`` are kept here (the cache's
        normalizer drops them, a custom ``normalize=`` sees them).
        """
        key: dict[str, Any] = {}
        for name, value in kwargs.items():
            if isinstance(value, _UNSET_TYPES):
                continue
            key[name] = value if name in IGNORED_FIELDS else _key_value(value)
        key[NAMESPACE_FIELD] = self._namespace
        stream_options = key.get("stream_options")
        if key.get("stream") is True and stream_options is not None:
            key[STREAM_OPTIONS_FIELD] = _key_value(stream_options)
        return key


def wrap_openai(
    client: openai.AsyncOpenAI, *, namespace: str | None = None, **gateway_options: Any
) -> CachedOpenAI:
    """Return ``client`` with its chat completions answered through an :class:`InferenceGateway`.

    ``gateway_options`` are :class:`InferenceGateway`'s keyword arguments
    (``exact_cache``, ``semantic_cache``, ``rate_limiter``, ``ttl_seconds``, ...); the
    provider is an :class:`OpenAIProvider` over ``client``. Without ``exact_cache``, a
    :class:`MemoryExactCache` is built (with ``normalize=`` when given) that knows the
    SDK types, closed by ``aclose()``. A cache passed in is taught the SDK types when it
    exposes a ``codec`` with ``register(cls)`` (both exact caches of this library do),
    so a :class:`RedisExactCache` needs no ``value_types``; other caches are used as is.

    ``namespace`` (default :func:`default_namespace`: the client's ``base_url``,
    ``organization`` and ``project``, never its API key) is added to every key: give
    several clients the same ``namespace`` to let them share entries.

    Raises :class:`InvalidInputTypeError` for a client that is not an ``AsyncOpenAI``
    and :class:`InvalidInputError` for a bad namespace or option (as the gateway does).
    """
    _check_client(client)
    namespace = check_namespace(namespace, lambda: default_namespace(client))
    provider = OpenAIProvider(client)
    gateway, owned = gateway_for("wrap_openai", provider, provider.value_types, gateway_options)
    return CachedOpenAI(client, gateway, namespace, owned)
