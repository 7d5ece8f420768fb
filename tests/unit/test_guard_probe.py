"""BackendGuard's ``probe``: a half-open breaker asks a quick call, not a long one (issue 10.4)."""

from __future__ import annotations

import asyncio

import pytest

from aiocache_llm import BackendUnavailableError
from aiocache_llm.core.guard import BackendGuard, BreakerState


class Backend:
    """Answers while ``up``; ``wait()`` stands for a call that waits long (for budget)."""

    def __init__(self) -> None:
        self.up = False
        self.gate = asyncio.Event()
        self.probes = 0
        self.calls = 0

    async def probe(self) -> int:
        self.probes += 1
        if not self.up:
            raise BackendUnavailableError("down")
        return 0

    async def quick(self) -> str:
        self.calls += 1
        if not self.up:
            raise BackendUnavailableError("down")
        return "answer"

    async def wait(self) -> str:
        self.calls += 1
        await self.gate.wait()
        return "waited"


@pytest.fixture
def now() -> list[float]:
    return [0.0]


@pytest.fixture
async def opened(now: list[float]) -> tuple[BackendGuard, Backend]:
    """A guard whose breaker opened at 0 and is half open from 1.0 on."""
    guard = BackendGuard(
        "limiter", timeout=5.0, failure_threshold=1, reset_after=1.0, clock=lambda: now[0]
    )
    backend = Backend()
    assert await guard.call(backend.quick, "fallback") == "fallback"
    assert guard.state is BreakerState.OPEN
    now[0] = 1.0
    return guard, backend


async def test_a_probe_closes_the_breaker_before_a_long_call_runs(
    opened: tuple[BackendGuard, Backend],
) -> None:
    guard, backend = opened
    backend.up = True
    long_call = asyncio.create_task(guard.call(backend.wait, "fallback", probe=backend.probe))
    await asyncio.sleep(0)
    assert backend.probes == 1
    assert guard.state is BreakerState.CLOSED
    # while the long call waits, other calls go through instead of being skipped
    assert await guard.call(backend.quick, "fallback") == "answer"
    backend.gate.set()
    assert await long_call == "waited"
    assert (guard.errors, guard.skipped) == (1, 0)


async def test_without_a_probe_the_long_call_is_the_probe_and_others_are_skipped(
    opened: tuple[BackendGuard, Backend],
) -> None:
    guard, backend = opened
    backend.up = True
    long_call = asyncio.create_task(guard.call(backend.wait, "fallback"))
    await asyncio.sleep(0)
    assert guard.state is BreakerState.HALF_OPEN
    assert await guard.call(backend.quick, "fallback") == "fallback"
    assert guard.skipped == 1
    backend.gate.set()
    assert await long_call == "waited"
    assert guard.state is BreakerState.CLOSED


async def test_a_failed_probe_opens_the_breaker_again_without_the_call(
    opened: tuple[BackendGuard, Backend], now: list[float]
) -> None:
    guard, backend = opened
    assert await guard.call(backend.wait, "fallback", probe=backend.probe) == "fallback"
    assert backend.calls == 1  # only the failure that opened it: the long call never ran
    assert guard.state is BreakerState.OPEN
    assert guard.errors == 2
    assert await guard.call(backend.quick, "fallback", probe=backend.probe) == "fallback"
    assert (backend.probes, guard.skipped) == (1, 1)  # skipped until reset_after again
    now[0] = 2.0
    backend.up = True
    assert await guard.call(backend.quick, "fallback", probe=backend.probe) == "answer"
    assert guard.state is BreakerState.CLOSED


async def test_a_closed_breaker_never_asks_the_probe(opened: tuple[BackendGuard, Backend]) -> None:
    guard, backend = opened
    backend.up = True
    assert await guard.call(backend.quick, "fallback") == "answer"  # the call was the probe
    assert await guard.call(backend.quick, "fallback", probe=backend.probe) == "answer"
    assert backend.probes == 0


async def test_a_cancelled_probe_lets_the_next_call_probe(
    opened: tuple[BackendGuard, Backend],
) -> None:
    guard, backend = opened
    stuck = asyncio.Event()

    async def hanging_probe() -> int:
        await stuck.wait()
        return 0

    task = asyncio.create_task(guard.call(backend.wait, "fallback", probe=hanging_probe))
    await asyncio.sleep(0)
    assert guard.state is BreakerState.HALF_OPEN
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.calls == 1
    backend.up = True
    assert await guard.call(backend.quick, "fallback", probe=backend.probe) == "answer"
    assert guard.state is BreakerState.CLOSED
