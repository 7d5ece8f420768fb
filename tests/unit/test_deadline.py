"""deadline(): a timeout of our own must never swallow or fake anyone else's cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from aiocache_llm.core.deadline import Watchdog, deadline

pytestmark = pytest.mark.looptime


async def test_a_body_within_the_deadline_returns_normally() -> None:
    with deadline(1.0):
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)  # the timer was disarmed: nothing fires later


async def test_an_overrun_raises_timeout_error_at_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), deadline(1.0):
        await asyncio.sleep(10)
    assert loop.time() - started == pytest.approx(1.0)
    if sys.version_info >= (3, 11):
        current = asyncio.current_task()
        assert current is not None
        assert current.cancelling() == 0, "our cancellation was withdrawn"


async def test_an_outside_cancellation_propagates_as_cancellation() -> None:
    async def body() -> None:
        with deadline(10.0):
            await asyncio.sleep(100)

    task = asyncio.ensure_future(body())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outside_cancellation_racing_the_deadline_stays_a_cancellation() -> None:
    async def body() -> None:
        with deadline(1.0):
            await asyncio.sleep(100)

    task = asyncio.ensure_future(body())
    loop = asyncio.get_running_loop()
    # both land in the same loop iteration: ours from the timer, theirs from here
    loop.call_later(1.0, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nested_deadlines_each_raise_their_own_timeout() -> None:
    inner_timed_out = False

    async def nested() -> None:
        nonlocal inner_timed_out
        with deadline(5.0):
            try:
                with deadline(1.0):
                    await asyncio.sleep(10)
            except TimeoutError:
                inner_timed_out = True
            await asyncio.sleep(10)  # the outer one fires here

    with pytest.raises(TimeoutError):
        await nested()
    assert inner_timed_out


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
async def test_an_enclosing_asyncio_timeout_keeps_working() -> None:
    async def enclosed() -> None:
        async with asyncio.timeout(1.0):
            with deadline(5.0):
                await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        await enclosed()


async def test_a_body_that_swallows_our_cancellation_does_not_leave_it_pending() -> None:
    # a body that insists on finishing
    with deadline(1.0), contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(10)
    await asyncio.sleep(0.1)  # no stray cancellation hits us here


# Watchdog: many concurrent deadlines, one armed timer


async def _watched(watchdog: Watchdog, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with watchdog.watch():
        await asyncio.sleep(seconds)
    return loop.time() - started


async def test_each_watched_call_times_out_on_its_own_clock() -> None:
    watchdog = Watchdog(1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def late(delay: float, seconds: float) -> float | str:
        await asyncio.sleep(delay)
        try:
            return await _watched(watchdog, seconds)
        except TimeoutError:
            return f"timed out at {loop.time() - started:.2f}"

    results = await asyncio.gather(late(0.0, 5), late(0.3, 0.5), late(0.6, 5), late(0.9, 0.2))
    assert results == [
        "timed out at 1.00",
        pytest.approx(0.5),
        "timed out at 1.60",
        pytest.approx(0.2),
    ]


async def test_a_finished_call_is_never_cancelled_by_a_later_check() -> None:
    watchdog = Watchdog(1.0)
    assert await _watched(watchdog, 0.9) == pytest.approx(0.9)
    await asyncio.sleep(2)  # the armed timer fires with nothing overdue: no stray cancel


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the one-timer path is 3.11+")
async def test_the_timer_is_armed_once_for_many_calls() -> None:
    watchdog = Watchdog(10.0)
    await asyncio.gather(*(_watched(watchdog, 0.1 * i) for i in range(50)))
    first_timer = watchdog._timer
    assert first_timer is not None
    for _ in range(20):
        await _watched(watchdog, 0.01)
    assert watchdog._timer is first_timer, "calls do not re-arm the timer"
    assert not watchdog._watches


async def test_an_outside_cancellation_of_a_watched_call_stays_a_cancellation() -> None:
    watchdog = Watchdog(10.0)
    task = asyncio.ensure_future(_watched(watchdog, 100))
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
