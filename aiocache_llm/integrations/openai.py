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
- :class:`OpenAIEmbedder` is an async ``str -> float32 vector`` over
  ``embeddings.create`` (concurrent calls batched into one request), for a semantic
  cache's ``embed_fn``; put a :class:`~aiocache_llm.CachedEmbedder` in front of it so
  that no text is embedded twice.

Per-request cache control is the one extra keyword ``cache=`` (see
:class:`CacheOptions`), removed before the SDK call; every other argument reaches the
SDK unchanged. Entries are filed under a *namespace* that defaults to the client's
``base_url``, ``organization`` and ``project`` (never its API key), so clients of
different endpoints, organizations or projects never share answers unless they are
given the same ``namespace=``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.core.errors import AiocacheLLMError, InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.query import IGNORED_FIELDS, Query, as_request
from aiocache_llm.core.validation import check_bool, check_id, check_positive_int
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
    "OpenAIEmbedder",
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

        An answer that did not come from this call's own HTTP response (a cache hit, or
        a share of a concurrent identical call) is equal to the stored one: same ``id``
        and ``created``, and ``_request_id`` (the SDK's id of the HTTP response) is
        ``None``. With ``wrap_openai(..., fresh_hit_ids=True)`` it gets a new ``id``
        (``chatcmpl-`` and 29 letters and digits) and ``created`` (now, in whole
        seconds); the chunks of one replayed stream share one new id and time. An
        answer from this call's own response is always returned as the SDK gave it.

        Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` for bad cache
        options or a request that cannot be keyed (before any I/O),
        :class:`RateLimitExceeded`, :class:`ProviderTimeoutError`, and whatever the SDK
        raises (``openai.APIStatusError`` and so on; never cached). Cancelling the call
        never cancels the SDK call other callers share.
        """
        owner = self._owner
        answer: ChatCompletion | ChunkStream = await create_through(
            owner.gateway,
            owner.client.chat.completions.create,
            kwargs,
            _cache_options(cache),
            key_query=owner.key_query,
            unset_types=_UNSET_TYPES,
            refresher=_new_refresher if owner.fresh_hit_ids else None,
            response_fields=("_request_id",),
        )
        return answer


_UNSET_TYPES = (openai.NotGiven, openai.Omit)


def _new_refresher() -> Callable[[Any], Any]:
    """A refresher with a new id in the SDK's style (``chatcmpl-`` and 29 letters and digits)."""
    return _refresher(new_id("chatcmpl-", 29))


def _refresher(completion_id: str) -> Callable[[Any], Any]:
    """A copy of a ``ChatCompletion``/``ChatCompletionChunk`` with ``completion_id`` and
    the current ``created`` time (the same for every chunk given to one refresher)."""
    created = int(time.time())

    def refresh(answer: Any) -> Any:
        if isinstance(answer, (ChatCompletion, ChatCompletionChunk)):
            return answer.model_copy(update={"id": completion_id, "created": created})
        return answer

    return refresh


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
        *,
        fresh_hit_ids: bool = False,
    ) -> None:
        super().__init__(client, gateway, namespace, owned_cache, fresh_hit_ids=fresh_hit_ids)
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
    client: openai.AsyncOpenAI,
    *,
    namespace: str | None = None,
    fresh_hit_ids: bool = False,
    **gateway_options: Any,
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

    ``fresh_hit_ids=True`` gives every answer that did not come from its own HTTP
    response (a hit, a shared call) a new ``id`` and ``created``, for applications whose
    downstream rejects repeated ids; by default a hit is equal to what was stored.

    Raises :class:`InvalidInputTypeError` for a client that is not an ``AsyncOpenAI``
    and :class:`InvalidInputError` for a bad namespace or option (as the gateway does).
    """
    _check_client(client)
    namespace = check_namespace(namespace, lambda: default_namespace(client))
    fresh = check_bool("fresh_hit_ids", fresh_hit_ids)
    provider = OpenAIProvider(client)
    gateway, owned = gateway_for("wrap_openai", provider, provider.value_types, gateway_options)
    return CachedOpenAI(client, gateway, namespace, owned, fresh_hit_ids=fresh)


class OpenAIEmbedder:
    """An async ``str -> float32 vector`` over ``AsyncOpenAI.embeddings.create``.

    ``await embedder(text)`` returns the embedding of ``text`` (numpy float32, as the
    API gives it: OpenAI's are unit length); use it as a semantic cache's ``embed_fn``,
    behind a :class:`~aiocache_llm.CachedEmbedder` so that no text is embedded twice::

        embed = CachedEmbedder(OpenAIEmbedder(client, model="text-embedding-3-small"))
        semantic = MemorySemanticCache(embed_fn=embed)

    Calls made in the same event-loop turn (concurrent lookups, a ``gather``) are sent
    as one ``embeddings.create(input=[...])`` request of at most ``max_batch`` distinct
    texts (the API accepts 2048). ``dimensions`` is passed to the API when given
    (``text-embedding-3`` models can shorten their vectors); ``create_options`` are
    further keyword arguments of every ``embeddings.create`` call (``timeout``,
    ``extra_headers``, ...). The vectors are requested base64-encoded (a quarter of
    the JSON size) and decoded without a float round trip.

    :attr:`model_id` names the endpoint, model and dimensions, never the API key:
    :class:`~aiocache_llm.CachedEmbedder` files the vectors under it.

    Raises :class:`InvalidInputTypeError` for a non-``str`` text or a client without
    an async ``embeddings.create``, :class:`InvalidInputError` for an empty text
    (before any I/O), whatever the SDK raises (``openai.APIStatusError`` and so on:
    every caller of that batch gets it), and :class:`AiocacheLLMError` for a response
    that does not hold one vector per text. Cancelling a call stops that caller
    waiting; the request goes on for the rest of its batch. The client stays the
    caller's to close.
    """

    __slots__ = ("_client", "_dimensions", "_max_batch", "_model", "_options", "_pending", "_sent")

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        model: str,
        dimensions: int | None = None,
        max_batch: int = 2048,
        **create_options: Any,
    ) -> None:
        sdk: object = client
        if isinstance(sdk, openai.OpenAI):
            raise InvalidInputTypeError(
                "client is the synchronous openai.OpenAI: OpenAIEmbedder needs an "
                "openai.AsyncOpenAI"
            )
        if not callable(getattr(getattr(client, "embeddings", None), "create", None)):
            raise InvalidInputTypeError(
                "client must be an openai.AsyncOpenAI (an object with an async "
                f"embeddings.create), got {type(client).__name__}"
            )
        for name in ("input", "model", "dimensions", "encoding_format"):
            if name in create_options:
                raise InvalidInputError(f"OpenAIEmbedder sets {name} itself: drop {name}=")
        self._client = client
        self._model = check_id("model", model)
        self._dimensions = (
            None if dimensions is None else check_positive_int("dimensions", dimensions)
        )
        self._max_batch = check_positive_int("max_batch", max_batch, at_most=2048)
        self._options = create_options
        self._pending: list[tuple[str, asyncio.Future[npt.NDArray[np.float32]]]] = []
        self._sent: set[asyncio.Task[None]] = set()  # strong references to running requests

    def __repr__(self) -> str:
        return f"OpenAIEmbedder(model={self._model!r}, dimensions={self._dimensions})"

    @property
    def model_id(self) -> str:
        """``openai:<base_url>:<model>:<dimensions>`` (no credentials): what the vectors are."""
        dimensions = "default" if self._dimensions is None else str(self._dimensions)
        return f"openai:{endpoint(self._client)}:{self._model}:{dimensions}"

    async def __call__(self, text: str) -> npt.NDArray[np.float32]:
        """Return the embedding of ``text`` (see the class docstring for batching and errors)."""
        if type(text) is not str:
            raise InvalidInputTypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise InvalidInputError("text to embed must not be empty (the API refuses it)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[npt.NDArray[np.float32]] = loop.create_future()
        if not self._pending:
            # every call made before the loop's next turn joins this batch
            loop.call_soon(self._flush)
        self._pending.append((text, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        batch: dict[str, list[asyncio.Future[npt.NDArray[np.float32]]]] = {}
        for text, future in pending:
            if len(batch) == self._max_batch and text not in batch:
                self._send(batch)
                batch = {}
            batch.setdefault(text, []).append(future)
        if batch:
            self._send(batch)

    def _send(self, batch: dict[str, list[asyncio.Future[npt.NDArray[np.float32]]]]) -> None:
        task = asyncio.ensure_future(self._request(batch))
        self._sent.add(task)
        task.add_done_callback(self._sent.discard)

    async def _request(
        self, batch: dict[str, list[asyncio.Future[npt.NDArray[np.float32]]]]
    ) -> None:
        texts = [text for text, futures in batch.items() if not all(f.done() for f in futures)]
        if not texts:
            return  # every caller gave up before the request was sent
        options: dict[str, Any] = dict(self._options)
        if self._dimensions is not None:
            options["dimensions"] = self._dimensions
        create: Any = self._client.embeddings.create
        try:
            response = await create(
                input=texts, model=self._model, encoding_format="base64", **options
            )
            vectors = _embedding_vectors(response, len(texts))
        except Exception as exc:
            for text in texts:
                for future in batch[text]:
                    if not future.done():
                        future.set_exception(exc)
            return
        except BaseException:
            # cancelled (the loop is shutting down) or interrupted: nobody may wait forever
            for text in texts:
                for future in batch[text]:
                    future.cancel()
            raise
        for text, vector in zip(texts, vectors, strict=True):
            for future in batch[text]:
                if not future.done():
                    future.set_result(vector.copy())


def _embedding_vectors(response: Any, count: int) -> list[npt.NDArray[np.float32]]:
    """The vectors of an embeddings response, in input order (base64 or float lists)."""
    data = getattr(response, "data", None)
    if not isinstance(data, Sequence) or len(data) != count:
        raise AiocacheLLMError(
            f"the embeddings response does not hold {count} embeddings "
            f"(got {len(data) if isinstance(data, Sequence) else type(data).__name__})"
        )
    vectors: list[npt.NDArray[np.float32] | None] = [None] * count
    for item in data:
        index = getattr(item, "index", None)
        raw = getattr(item, "embedding", None)
        if type(index) is not int or not 0 <= index < count or vectors[index] is not None:
            raise AiocacheLLMError("the embeddings response has missing or repeated indexes")
        try:
            if isinstance(raw, str):
                vector = np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
            else:
                vector = np.asarray(raw, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise AiocacheLLMError(
                f"the embeddings response holds a malformed vector: {exc}"
            ) from exc
        if vector.ndim != 1 or vector.size == 0:
            raise AiocacheLLMError("the embeddings response holds an empty or malformed vector")
        vectors[index] = vector
    return [vector for vector in vectors if vector is not None]
