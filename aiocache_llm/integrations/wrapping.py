"""What the SDK wrappers (``wrap_openai``, ``wrap_anthropic``) share: the per-request
``cache=`` options, how request arguments become key data, how a cache learns the
SDK's types, the namespace check, the gateway built for a wrapper, the wrapper's
base class and the fresh ids given to answers that did not come from their own call
(``fresh_hit_ids=True``). Imports no SDK."""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypedDict, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import check_bool
from aiocache_llm.gateway.gateway import InferenceGateway
from aiocache_llm.gateway.streaming import ChunkStream

__all__ = [
    "CACHE_OPTION_NAMES",
    "CacheOptions",
    "CallTracker",
    "RefreshedStream",
    "WrappedClient",
    "cache_options",
    "check_namespace",
    "endpoint",
    "gateway_for",
    "is_one_shot",
    "key_value",
    "new_id",
    "register_types",
]

CACHE_OPTION_NAMES = frozenset({"no_cache", "no_store", "ttl_seconds", "user_id"})


class CacheOptions(TypedDict, total=False):
    """The ``cache=`` argument of a wrapped SDK's ``create``; every key optional.

    - ``no_cache``: skip the cache reads (a fresh answer, still stored unless ``no_store``);
    - ``no_store``: keep this answer out of the caches;
    - ``ttl_seconds``: the lifetime of the entry this request stores;
    - ``user_id``: whose rate-limit budget pays for a provider call (default: the
      gateway's ``anonymous_user``).
    """

    no_cache: bool
    no_store: bool
    ttl_seconds: float | None
    user_id: str | None


def cache_options(value: object) -> CacheOptions:
    """Validate the ``cache=`` argument; raise before any I/O."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInputTypeError(
            f"cache must be a mapping of cache options, got {type(value).__name__}"
        )
    unknown = set(value) - CACHE_OPTION_NAMES
    if unknown:
        raise InvalidInputError(
            f"unknown cache options {sorted(map(str, unknown))}: expected some of "
            f"{sorted(CACHE_OPTION_NAMES)}"
        )
    options: CacheOptions = {}
    if "no_cache" in value:
        options["no_cache"] = check_bool("cache['no_cache']", value["no_cache"])
    if "no_store" in value:
        options["no_store"] = check_bool("cache['no_store']", value["no_store"])
    if "ttl_seconds" in value:
        options["ttl_seconds"] = value["ttl_seconds"]  # checked by the gateway
    if "user_id" in value:
        options["user_id"] = value["user_id"]  # checked by the gateway
    return options


def key_value(value: Any) -> Any:
    """``value`` as JSON data for the key: models as the SDK sends them, tuples as lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, Mapping):
        return {key: key_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [key_value(item) for item in value]
    return value


def is_one_shot(value: object) -> bool:
    """An iterable the SDK accepts (messages, system, tools) that may be read only once."""
    return isinstance(value, Iterable) and not isinstance(
        value, (str, bytes, bytearray, Mapping, list, tuple, BaseModel)
    )


def register_types(cache: object, types: Iterable[type[BaseModel]]) -> None:
    """Teach a cache's codec the SDK types, if it has one that can learn (a capability)."""
    register = getattr(getattr(cache, "codec", None), "register", None)
    if callable(register):
        for cls in types:
            register(cls)


def endpoint(client: object) -> str:
    """The client's ``base_url`` without credentials, query or fragment (a namespace part)."""
    parts = urlsplit(str(getattr(client, "base_url", "") or ""))
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets, or its port would be ambiguous
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    # a user:password@ in the URL is a credential, and a query may carry one too
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def check_namespace(namespace: object, default: Callable[[], str]) -> str:
    """``namespace`` if it is a non-empty ``str``; ``default()`` when it is None."""
    if namespace is None:
        return default()
    if type(namespace) is not str:
        raise InvalidInputTypeError(f"namespace must be a str, got {type(namespace).__name__}")
    if not namespace:
        raise InvalidInputError("namespace must not be empty")
    return namespace


def gateway_for(
    wrapper: str,
    provider: object,
    value_types: Iterable[type[BaseModel]],
    gateway_options: dict[str, Any],
) -> tuple[InferenceGateway, MemoryExactCache | None]:
    """The gateway a wrapper answers through, and the cache it built for it (or None).

    Without ``exact_cache``, a :class:`MemoryExactCache` that knows ``value_types`` is
    built (with ``normalize=`` when given); caches passed in are taught the types when
    they can learn them (:func:`register_types`).
    """
    if "provider" in gateway_options:
        raise InvalidInputError(f"{wrapper} builds the provider from the client: drop provider=")
    types = tuple(value_types)
    owned: MemoryExactCache | None = None
    if gateway_options.get("exact_cache") is None:
        normalize = gateway_options.pop("normalize", None)
        owned = MemoryExactCache(value_types=types, normalize=normalize)
        gateway_options["exact_cache"] = owned
    for name in ("exact_cache", "semantic_cache"):
        register_types(gateway_options.get(name), types)
    return InferenceGateway(provider, **gateway_options), owned


_Wrapped = TypeVar("_Wrapped", bound="WrappedClient")


_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int) -> str:
    """``prefix`` and ``length`` random letters and digits: a response id in the SDK's style."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


class CallTracker:
    """The provider call of one wrapped ``create``; ``called`` tells whether the gateway
    made it, i.e. whether the answer came from this call's own HTTP response (not from
    the cache or another caller's call)."""

    __slots__ = ("_call", "called")

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self.called = False

    def __call__(self) -> Any:
        self.called = True
        return self._call()


class RefreshedStream(ChunkStream):
    """A :class:`ChunkStream` whose chunks pass through ``refresh`` on their way out.

    Used for ``fresh_hit_ids=True``: a replay gets new ids. Every method is the wrapped
    stream's (same errors, cancellation and closing); ``ChunkStream.__init__`` is not
    run, as no state of its own is used.
    """

    __slots__ = ("_inner", "_refresh")

    def __init__(self, inner: ChunkStream, refresh: Callable[[Any], Any]) -> None:
        self._inner = inner
        self._refresh = refresh

    def __repr__(self) -> str:
        return repr(self._inner)

    def __aiter__(self) -> RefreshedStream:
        return self

    async def __anext__(self) -> Any:
        return self._refresh(await self._inner.__anext__())

    async def start(self) -> RefreshedStream:
        await self._inner.start()
        return self

    @property
    def delivered(self) -> int:
        return self._inner.delivered

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> RefreshedStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._inner.aclose()


async def create_through(
    gateway: InferenceGateway,
    create: Callable[..., Any],
    kwargs: dict[str, Any],
    options: CacheOptions,
    *,
    key_query: Callable[[Mapping[str, Any]], dict[str, Any]],
    unset_types: tuple[type, ...],
    refresher: Callable[[], Callable[[Any], Any]] | None,
    response_fields: tuple[str, ...],
) -> Any:
    """One wrapped SDK ``create(**kwargs)``, answered through ``gateway``.

    ``stream=True`` returns the gateway's :class:`ChunkStream` once its first chunk is
    there (errors before it raise here, as from the SDK's own ``create``); otherwise
    the answer. ``refresher`` (``fresh_hit_ids``; None when off) builds the function
    that gives an answer not made by this call's own HTTP response a new id: one per
    call, shared by every chunk of one replay. On such an answer ``response_fields``
    (the SDK's ``_request_id`` and the like, which name one HTTP response) are None.
    Raises :class:`InvalidInputTypeError` for a ``stream`` that is not a bool, before any I/O.
    """
    stream = kwargs.get("stream")
    if not (stream is None or type(stream) is bool or isinstance(stream, unset_types)):
        raise InvalidInputTypeError(f"stream must be a bool, got {type(stream).__name__}")
    # an iterator is read once for the key, so the SDK must get the same items
    kwargs = {name: list(v) if is_one_shot(v) else v for name, v in kwargs.items()}
    query = key_query(kwargs)
    call = CallTracker(lambda: create(**kwargs))
    if stream is True:
        chunks = gateway.stream_with(
            query,
            call,
            options.get("user_id"),
            no_cache=options.get("no_cache", False),
            no_store=options.get("no_store", False),
            ttl_seconds=options.get("ttl_seconds"),
        )
        try:
            await chunks.start()
        except BaseException:
            # cancelled or failed before the caller got it: nobody will read or close
            # it, and an open consumer would keep a shared stream from being abandoned
            await chunks.aclose()
            raise
        if refresher is not None and not call.called:
            # decided at the first chunk, which start() has received
            return RefreshedStream(chunks, refresher())
        return chunks
    answer = await gateway.resolve_with(
        query,
        call,
        options.get("user_id"),
        no_cache=options.get("no_cache", False),
        no_store=options.get("no_store", False),
        ttl_seconds=options.get("ttl_seconds"),
    )
    if refresher is not None and not call.called:
        answer = refresher()(answer)
    for name in response_fields:
        if not call.called or not hasattr(answer, name):
            # a hit or a share of another caller's call: the field names one HTTP
            # response, which this call did not make; None, as on an object the SDK
            # built without one
            setattr(answer, name, None)
    return answer


class WrappedClient:
    """What a wrapper shares: its gateway, its namespace, the cache it built, whether
    answers that did not come from their own call get fresh ids, and every other
    attribute passed through to the SDK client (not cached).

    ``aclose()`` (or leaving ``async with``) closes the gateway and the cache built for
    it (idempotent); the SDK client stays open: it is the caller's.
    """

    __slots__ = ("_cache", "_client", "_fresh_hit_ids", "_gateway", "_namespace")

    def __init__(
        self,
        client: Any,
        gateway: InferenceGateway,
        namespace: str,
        owned: MemoryExactCache | None,
        *,
        fresh_hit_ids: bool = False,
    ) -> None:
        self._client = client
        self._gateway = gateway
        self._namespace = namespace
        self._cache = owned
        self._fresh_hit_ids = fresh_hit_ids

    def __getattr__(self, name: str) -> Any:
        # reached only for names not found on the wrapper: the client's own attributes
        if name.startswith("__") or name in _OWN_SLOTS or name in type(self).__slots__:
            raise AttributeError(name)
        return getattr(self._client, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self._namespace!r}, gateway={self._gateway!r})"

    @property
    def gateway(self) -> InferenceGateway:
        """The gateway the wrapped calls go through (stats, lifecycle).

        Requests made on it directly are keyed without this wrapper's namespace: go
        through the wrapped ``create`` to share this wrapper's entries.
        """
        return self._gateway

    @property
    def namespace(self) -> str:
        """The namespace this wrapper's entries are filed under."""
        return self._namespace

    @property
    def fresh_hit_ids(self) -> bool:
        """Whether answers that did not come from their own call get a new id and time."""
        return self._fresh_hit_ids

    async def aclose(self) -> None:
        """Close the gateway and the cache built for it (idempotent); not the client."""
        await self._gateway.aclose()
        if self._cache is not None:
            await self._cache.aclose()

    async def __aenter__(self: _Wrapped) -> _Wrapped:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_OWN_SLOTS = frozenset(WrappedClient.__slots__)
