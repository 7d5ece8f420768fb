"""The guard under concurrent failures: what a frozen backend does to calls in flight."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aiocache_llm.core.guard import BackendGuard, BreakerState


async def test_concurrent_failures_log_the_breaker_opening_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = BackendGuard("frozen backend", timeout=0.05, failure_threshold=3, reset_after=60)

    async def hang() -> None:
        await asyncio.sleep(1)

    with caplog.at_level(logging.WARNING, logger="aiocache_llm.guard"):
        await asyncio.gather(*(guard.call(hang, None) for _ in range(10)))
    assert guard.errors == 10
    warnings = [r for r in caplog.records if r.name == "aiocache_llm.guard"]
    assert len(warnings) == 1


async def test_calls_in_flight_when_the_breaker_opens_all_fall_back_and_are_counted() -> None:
    guard = BackendGuard("frozen backend", timeout=0.05, failure_threshold=3, reset_after=60)

    async def hang() -> str:
        await asyncio.sleep(1)
        return "late"

    results = await asyncio.gather(*(guard.call(hang, "fallback") for _ in range(10)))
    assert results == ["fallback"] * 10
    assert (guard.errors, guard.skipped) == (10, 0)
    assert guard.state is BreakerState.OPEN
    assert await guard.call(hang, "skipped") == "skipped"
    assert guard.skipped == 1
