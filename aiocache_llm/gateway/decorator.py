"""``@cached_completion``: cache and coalesce an async function by its bound arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from aiocache_llm.core.errors import InvalidInputTypeError
from aiocache_llm.gateway.gateway import InferenceGateway
from aiocache_llm.protocols import AsyncExactCache

__all__ = ["cached_completion"]

P = ParamSpec("P")
R = TypeVar("R")

_INSTANCE_PARAMETERS = frozenset({"self", "cls"})


def cached_completion(
    cache: AsyncExactCache | None = None,
    *,
    ttl_seconds: float | None = None,
    key: Callable[..., Any] | None = None,
    **gateway_options: Any,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Cache an ``async def`` by its arguments, with the gateway's coalescing.

    The key is the function's qualified name plus its bound arguments with defaults
    applied, so keyword order and positional-or-keyword spelling never change it:
    ``f(1, b=2)``, ``f(a=1, b=2)`` and ``f(b=2, a=1)`` share one entry. On a method,
    the first parameter (``self``/``cls``) is left out of the key: instances share
    entries unless ``key`` says otherwise. ``key(*args, **kwargs)`` replaces the
    arguments with any JSON-serializable value of your choice.

    ``cache`` defaults to a private :class:`MemoryExactCache`; ``ttl_seconds`` is the
    stored entries' lifetime; other keyword arguments (``semantic_cache`` is not
    meaningful here, but ``provider_timeout``, ``backend_timeout`` and the breaker
    settings are) go to the :class:`InferenceGateway` the wrapper runs on, exposed as
    ``wrapper.gateway``. Concurrent calls with equal arguments run the function once.
    ``await wrapper.invalidate(*args, **kwargs)`` drops the entry of those arguments.

    Raises :class:`InvalidInputTypeError` at decoration when the function is not
    ``async``, and at call time when the arguments cannot be keyed (not
    JSON-serializable: pass ``key=``).
    """
    if key is not None and not callable(key):
        raise InvalidInputTypeError(f"key must be callable, got {type(key).__name__}")

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(fn):
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
                return {"function": name, "key": key(*args, **kwargs)}
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidInputTypeError(f"{name}(): {exc}") from exc
            bound.apply_defaults()
            arguments = {k: v for k, v in bound.arguments.items() if k != skip}
            return {"function": name, "arguments": arguments}

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            query = cache_query(*args, **kwargs)
            result: R = await gateway.resolve_with(query, lambda: fn(*args, **kwargs))
            return result

        async def invalidate(*args: Any, **kwargs: Any) -> bool:
            return await gateway.exact_cache.invalidate(cache_query(*args, **kwargs))

        wrapper.gateway = gateway  # type: ignore[attr-defined]
        wrapper.cache_query = cache_query  # type: ignore[attr-defined]
        wrapper.invalidate = invalidate  # type: ignore[attr-defined]
        return wrapper

    return decorate
