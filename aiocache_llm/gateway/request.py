"""``MissRequest``: what one request carries down the gateway's miss path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiocache_llm.core.query import Query

__all__ = ["MissRequest"]


class MissRequest:
    """One request past an exact-cache miss: what it asks, what it is filed under, who pays.

    ``query`` is the request as the caller gave it (the provider and the token
    estimate see it); ``key_query`` is what the caches file it under (the same
    request, or, for a stream, the request marked as streamed) and ``digest`` its
    exact key. ``call`` starts the provider call; ``user`` is whose budget pays;
    ``ttl``, ``no_store`` are the caller's cache control. ``read`` says the exact
    cache was read and missed (False when skipped or down).
    """

    __slots__ = ("call", "digest", "key_query", "no_store", "query", "read", "ttl", "user")

    def __init__(
        self,
        query: Query,
        digest: str,
        call: Callable[[], Any],
        user: str,
        ttl: float | None,
        *,
        no_store: bool,
        read: bool,
        key_query: Query | None = None,
    ) -> None:
        self.query = query
        self.key_query = query if key_query is None else key_query
        self.digest = digest
        self.call = call
        self.user = user
        self.ttl = ttl
        self.no_store = no_store
        self.read = read
