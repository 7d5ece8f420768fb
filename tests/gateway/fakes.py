"""Test doubles for the gateway: a counting provider and a cache that fails on demand."""

from __future__ import annotations

import asyncio
from typing import Any

from aiocache_llm import BackendUnavailableError, CacheStats, MemoryExactCache, Query


class CountingProvider:
    """An async LLM stand-in: answers ``answer:<last message>`` after ``latency`` seconds."""

    def __init__(self, latency: float = 0.0, *, fail_with: BaseException | None = None) -> None:
        self.latency = latency
        self.fail_with = fail_with
        self.calls = 0
        self.queries: list[Any] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, query: Any) -> Any:
        self.calls += 1
        self.queries.append(query)
        if self.gate is not None:
            await self.gate.wait()
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.fail_with is not None:
            raise self.fail_with
        return f"answer:{_text(query)}"


def _text(query: Any) -> str:
    if isinstance(query, str):
        return query
    return str(query["messages"][-1]["content"])


class FlakyCache:
    """An AsyncExactCache whose every operation fails while ``down`` is set."""

    def __init__(self) -> None:
        self.inner = MemoryExactCache()
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise BackendUnavailableError("flaky cache is down")

    async def get(self, query: Query) -> Any | None:
        self._check()
        return await self.inner.get(query)

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        self._check()
        await self.inner.put(query, value, ttl_seconds=ttl_seconds)

    async def invalidate(self, query: Query) -> bool:
        self._check()
        return await self.inner.invalidate(query)

    async def clear(self) -> None:
        self._check()
        await self.inner.clear()

    async def stats(self) -> CacheStats:
        return await self.inner.stats()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> FlakyCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class HangingCache(FlakyCache):
    """An AsyncExactCache whose operations never answer while ``down`` is set."""

    def _check(self) -> None:
        self.calls += 1

    async def get(self, query: Query) -> Any | None:
        self.calls += 1
        if self.down:
            await asyncio.Event().wait()
        return await self.inner.get(query)
