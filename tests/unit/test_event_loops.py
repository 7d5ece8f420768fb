"""Objects made once (module level) and used from one event loop after another.

Workers that run each job in its own ``asyncio.run``, and test suites with a loop per
test, do exactly this. Each test below failed (hung, or raised a bare RuntimeError)
before the objects rebound their timers, flights and streams to the calling loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiocache_llm import InferenceGateway, SingleFlight, cached_completion
from aiocache_llm.core.guard import BackendGuard

pytestmark = pytest.mark.timeout(30)


def run(coroutine: Any, seconds: float = 5.0) -> Any:
    """``asyncio.run`` with a bound, so that a regression fails instead of hanging."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, seconds)

    return asyncio.run(bounded())


def test_a_guard_deadline_fires_in_a_second_event_loop() -> None:
    guard = BackendGuard("test backend", timeout=0.05)

    async def quick() -> str:
        return "ok"

    async def frozen() -> str:
        await asyncio.sleep(3)
        return "late"

    assert run(guard.call(quick, "fallback")) == "ok"
    started = time.monotonic()
    assert run(guard.call(frozen, "fallback")) == "fallback"
    assert time.monotonic() - started < 1.0  # cut at its deadline, not after 3 s


def test_a_flight_left_pending_by_a_closed_loop_is_not_joined() -> None:
    flight: SingleFlight[str] = SingleFlight()
    gate_loop = asyncio.new_event_loop()

    async def start_and_leave() -> None:
        async def never() -> str:
            await asyncio.Event().wait()
            return "never"

        waiter = asyncio.ensure_future(flight.run("key", never))
        await asyncio.sleep(0)
        waiter.cancel()  # the call stays in flight when this loop stops

    gate_loop.run_until_complete(start_and_leave())
    gate_loop.close()

    async def answer() -> str:
        return "fresh"

    assert run(flight.run("key", answer)) == "fresh"


def test_a_decorated_function_works_in_loop_after_loop() -> None:
    calls = 0

    @cached_completion()
    async def double(x: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 2 * x

    async def burst(x: int) -> list[int]:
        return list(await asyncio.gather(*(double(x) for _ in range(10))))

    assert run(burst(1)) == [2] * 10
    assert run(burst(2)) == [4] * 10
    assert run(burst(1)) == [2] * 10
    assert calls == 2


def test_a_stream_left_in_flight_by_a_closed_loop_is_not_joined() -> None:
    class Provider:
        streams = 0

        async def complete(self, query: Any) -> str:
            return "plain"

        async def stream(self, query: Any) -> AsyncIterator[str]:
            Provider.streams += 1
            yield "a"
            await asyncio.sleep(3600)
            yield "b"

    gateway = InferenceGateway(Provider(), finish_abandoned_streams=True)
    first_loop = asyncio.new_event_loop()

    async def read_one() -> Any:
        stream = gateway.stream("hello")
        return await stream.__anext__(), stream  # keep the consumer: the flight stays

    first, _kept = first_loop.run_until_complete(read_one())
    first_loop.close()
    assert first == "a"

    async def read_two() -> list[str]:
        stream = gateway.stream("hello")
        return [await stream.__anext__()]

    assert run(read_two()) == ["a"]
    assert Provider.streams == 2
    run(gateway.aclose())
