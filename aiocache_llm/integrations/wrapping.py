"""What the SDK wrappers (``wrap_openai``, ``wrap_anthropic``) share: the per-request
``cache=`` options, how request arguments become key data, and how a cache learns the
SDK's types. Imports no SDK."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import check_bool

__all__ = [
    "CACHE_OPTION_NAMES",
    "CacheOptions",
    "cache_options",
    "endpoint",
    "is_one_shot",
    "key_value",
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
