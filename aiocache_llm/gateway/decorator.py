"""``@cached_completion``: cache and coalesce an async function by its bound arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from aiocache_llm.core.errors import InvalidInputTypeError
from aiocache_llm.core.query import typed_key
from aiocache_llm.core.validation import check_bool
from aiocache_llm.gateway.gateway import InferenceGateway
from aiocache_llm.gateway.streaming import ChunkStream, stream_key_query
from aiocache_llm.protocols import AsyncExactCache

__all__ = ["CachedFunction", "CachedStreamFunction", "cached_completion"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class CachedFunction(Protocol[P, R_co]):
    """What ``@cached_completion`` returns: call it like the function it wraps."""

    gateway: InferenceGateway
    """The gateway the calls run through (its ``stats()`` tell hits and calls)."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the entry of these arguments; return whether there was one."""
        ...

    def cache_query(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The query these arguments are cached under."""
        ...

    def __get__(self, instance: Any, owner: Any) -> Any: ...


_INSTANCE_PARAMETERS = frozenset({"self", "cls"})


class CachedStreamFunction(Protocol[P, R_co]):
    """What ``@cached_completion`` returns for an async generator function.

    Call it like the function: it returns a :class:`ChunkStream` of what the
    function yields (replayed from the cache, or shared live with concurrent equal
    calls).
    """

    gateway: InferenceGateway

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> ChunkStream: ...

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool: ...

    def cache_query(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def __get__(self, instance: Any, owner: Any) -> Any: ...


class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, AsyncIterator[R]]) -> CachedStreamFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]: ...


def cached_completion(
    cache: AsyncExactCache | None = None,
    *,
    ttl_seconds: float | None = None,
    key: Callable[..., Any] | None = None,
    stream: bool = False,
    **gateway_options: Any,
) -> _Decorator:
    """Cache an ``async def`` by its arguments, with the gateway's coalescing.

    The key is the function's qualified name plus its bound arguments with defaults
    applied, so keyword order and positional-or-keyword spelling never change it:
    ``f(1, b=2)``, ``f(a=1, b=2)`` and ``f(b=2, a=1)`` share one entry. Arguments are
    keyed with their types (:func:`~aiocache_llm.core.query.typed_key`): dataclasses,
    pydantic models, enums, datetimes, UUIDs, tuples, sets and the like carry their
    type name, so ``f(Celsius(100))`` and ``f(Fahrenheit(100))``, or ``f((1, 2))``
    and ``f([1, 2])``, never share an entry. On a method, the first parameter
    (``self``/``cls``) is left out of the key: instances share entries unless ``key``
    says otherwise. ``key(*args, **kwargs)`` replaces the arguments with a value of
    your choice, keyed the same way.

    ``cache`` defaults to a private :class:`MemoryExactCache`; ``ttl_seconds`` is the
    stored entries' lifetime; other keyword arguments (``semantic_cache`` is not
    meaningful here, but ``provider_timeout``, ``backend_timeout`` and the breaker
    settings are) go to the :class:`InferenceGateway` the wrapper runs on, exposed as
    ``wrapper.gateway``. Concurrent calls with equal arguments run the function once.
    ``await wrapper.invalidate(*args, **kwargs)`` drops the entry of those arguments.

    Streams: on an async generator function (``async def`` with ``yield``), a call
    returns a :class:`ChunkStream` of what it yields: a finished run is stored as its
    ordered items and replayed, and concurrent equal calls share one run live (see
    :meth:`InferenceGateway.stream`). ``stream=True`` says that an ``async def``
    returns a stream (an async iterable, such as an SDK's): awaiting a call then
    gives a :class:`ChunkStream` of it, shared and stored the same way. Without it,
    an ``async def`` that returns a stream raises :class:`InvalidInputTypeError`
    rather than hand one single-use stream to several callers.

    Raises :class:`InvalidInputTypeError` at decoration when the function is not
    ``async``, and at call time, before the function runs, when an argument has no
    faithful key (an arbitrary object, a dict with non-``str`` keys: pass ``key=``);
    :class:`InvalidInputError` for NaN or infinite floats and cyclic arguments.
    """
    if key is not None and not callable(key):
        raise InvalidInputTypeError(f"key must be callable, got {type(key).__name__}")
    stream = check_bool("stream", stream)

    def decorate(fn: Callable[P, Any]) -> Any:
        generator = inspect.isasyncgenfunction(fn)
        if not (generator or inspect.iscoroutinefunction(fn)):
            raise InvalidInputTypeError(
                f"@cached_completion needs an async def function, got {fn!r}"
            )
        signature = inspect.signature(fn)
        parameters = list(signature.parameters)
        skip = parameters[0] if parameters and parameters[0] in _INSTANCE_PARAMETERS else None
        name = f"{fn.__module__}.{fn.__qualname__}"
        gateway = InferenceGateway(
            None, exact_cache=cache, ttl_seconds=ttl_seconds, **gateway_options
        )

        def cache_query(*args: Any, **kwargs: Any) -> dict[str, Any]:
            if key is not None:
                return {"function": name, "key": typed_key(key(*args, **kwargs), what=name)}
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidInputTypeError(f"{name}(): {exc}") from exc
            bound.apply_defaults()
            arguments = {k: v for k, v in bound.arguments.items() if k != skip}
            return {"function": name, "arguments": typed_key(arguments, what=f"{name}()")}

        wrapper: Any
        if generator:

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> ChunkStream:
                query = cache_query(*args, **kwargs)
                return gateway.stream_with(query, lambda: fn(*args, **kwargs))

        elif stream:

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> ChunkStream:
                query = cache_query(*args, **kwargs)
                return await gateway.stream_with(query, lambda: fn(*args, **kwargs)).start()

        else:

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                query = cache_query(*args, **kwargs)
                return await gateway.resolve_with(query, lambda: fn(*args, **kwargs))

        async def invalidate(*args: Any, **kwargs: Any) -> bool:
            query = cache_query(*args, **kwargs)
            if generator or stream:
                query = stream_key_query(query)
            return await gateway.exact_cache.invalidate(query)

        wrapper.gateway = gateway
        wrapper.cache_query = cache_query
        wrapper.invalidate = invalidate
        if skip is None:
            return wrapper
        return _CachedMethod(wrapper)

    return decorate


class _CachedMethod:
    """Binds a cached method's ``invalidate`` and ``cache_query`` to the instance too.

    A plain function attribute would stay unbound on ``obj.method.invalidate``; this
    descriptor returns, per access, a ``functools.partial`` of the wrapper (still a
    coroutine function to ``inspect``) carrying bound helpers.
    """

    def __init__(self, wrapper: Any) -> None:
        self._wrapper = wrapper
        functools.update_wrapper(self, wrapper)

    def __get__(self, instance: Any, owner: Any) -> Any:
        if instance is None:
            return self._wrapper
        bound: Any = functools.partial(self._wrapper, instance)
        bound.invalidate = functools.partial(self._wrapper.invalidate, instance)
        bound.cache_query = functools.partial(self._wrapper.cache_query, instance)
        bound.gateway = self._wrapper.gateway
        return bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)
