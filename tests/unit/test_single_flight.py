"""SingleFlight: one execution per key, shared outcomes, cancellation that never spreads."""

from __future__ import annotations

import asyncio

import pytest

from aiocache_llm import SingleFlight


class Work:
    """An awaitable job the test releases by hand, counting how often it started."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.cancelled = False

    async def __call__(self, result: object = "done") -> object:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if isinstance(result, BaseException):
            raise result
        return result


async def test_a_thousand_concurrent_callers_share_one_execution() -> None:
    flight: SingleFlight[object] = SingleFlight()
    work = Work()
    callers = [asyncio.ensure_future(flight.run("k", work)) for _ in range(1000)]
    await asyncio.sleep(0)
    assert len(flight) == 1
    work.release.set()
    results = await asyncio.gather(*callers)
    assert work.started == 1
    assert results == ["done"] * 1000
    stats = flight.stats()
    assert (stats.executions, stats.coalesced, stats.in_flight) == (1, 999, 0)


async def test_distinct_keys_run_separately() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started: list[int] = []

    async def job(key: int) -> int:
        started.append(key)
        await asyncio.sleep(0.01)
        return key * 10

    results = await asyncio.gather(
        *(flight.run(i % 10, lambda i=i: job(i % 10)) for i in range(100))
    )
    assert sorted(started) == list(range(10))
    assert results == [(i % 10) * 10 for i in range(100)]
    assert flight.stats().executions == 10


async def test_an_exception_reaches_every_caller_and_is_not_kept() -> None:
    flight: SingleFlight[object] = SingleFlight()
    work = Work()
    callers = [
        asyncio.ensure_future(flight.run("k", lambda: work(RuntimeError("boom")))) for _ in range(5)
    ]
    await asyncio.sleep(0)
    work.release.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and str(o) == "boom" for o in outcomes)
    assert flight.stats().failures == 1
    # the failure is not cached: the next caller starts a fresh execution
    assert await flight.run("k", lambda: asyncio.sleep(0, "fresh")) == "fresh"
    assert flight.stats().executions == 2


async def test_cancelling_the_first_caller_does_not_cancel_the_work() -> None:
    flight: SingleFlight[object] = SingleFlight()
    work = Work()
    first = asyncio.ensure_future(flight.run("k", work))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(flight.run("k", work))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    assert first.cancelled()
    work.release.set()
    assert await second == "done"
    assert not work.cancelled
    assert work.started == 1


async def test_abandoned_work_keeps_running_by_default() -> None:
    flight: SingleFlight[object] = SingleFlight()
    work = Work()
    only = asyncio.ensure_future(flight.run("k", work))
    await asyncio.sleep(0)
    only.cancel()
    await asyncio.sleep(0)
    assert "k" in flight  # still in flight: a later caller joins it
    late = asyncio.ensure_future(flight.run("k", work))
    await asyncio.sleep(0)
    work.release.set()
    assert await late == "done"
    assert work.started == 1
    assert not work.cancelled


async def test_cancel_abandoned_cancels_when_the_last_waiter_leaves() -> None:
    flight: SingleFlight[object] = SingleFlight(cancel_abandoned=True)
    work = Work()
    callers = [asyncio.ensure_future(flight.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    callers[0].cancel()
    callers[1].cancel()
    await asyncio.sleep(0)
    assert not work.cancelled  # one caller still waits
    callers[2].cancel()
    await asyncio.sleep(0.01)
    assert work.cancelled
    assert len(flight) == 0
    # a caller arriving now starts a new execution instead of joining the dead one
    fresh = Work()
    fresh.release.set()
    assert await flight.run("k", fresh) == "done"


async def test_a_finished_flight_is_never_joined() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0

    async def job() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await flight.run("k", job) == 1
    assert await flight.run("k", job) == 2


async def test_repr_names_the_counters() -> None:
    flight: SingleFlight[object] = SingleFlight()
    await flight.run("k", lambda: asyncio.sleep(0, 1))
    assert "executions=1" in repr(flight)


async def test_unhashable_key_raises_type_error() -> None:
    flight: SingleFlight[object] = SingleFlight()
    with pytest.raises(TypeError):
        await flight.run(["not", "hashable"], lambda: asyncio.sleep(0))
