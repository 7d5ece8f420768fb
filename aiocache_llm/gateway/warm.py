"""Pre-loading a cache: resolve many queries, bounded concurrency, never stopping on a failure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiocache_llm.core.query import Query

__all__ = ["WarmFailure", "WarmReport", "resolve_all"]


@dataclass(frozen=True)
class WarmFailure:
    """One query :meth:`InferenceGateway.warm` could not answer, and why."""

    query: Query
    error: BaseException


@dataclass(frozen=True)
class WarmReport:
    """What :meth:`InferenceGateway.warm` did: answered, computed by the provider, failed."""

    ok: int
    computed: int
    failed: tuple[WarmFailure, ...] = field(default=())


async def resolve_all(
    resolve: Callable[[Query], Awaitable[Any]], queries: Iterable[Query], concurrency: int
) -> tuple[int, tuple[WarmFailure, ...]]:
    """Resolve every query, ``concurrency`` at a time; return (answered, failures).

    ``concurrency`` workers pull from one iterator, so memory is O(concurrency +
    failures) whatever the number of queries. Cancelling cancels the workers.
    """
    pending = iter(queries)
    failures: list[WarmFailure] = []
    answered = 0

    async def worker() -> None:
        nonlocal answered
        for query in pending:
            try:
                await resolve(query)
            except Exception as exc:
                failures.append(WarmFailure(query, exc))
            else:
                answered += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered, tuple(failures)
