"""``SingleFlight``: one execution per key at a time, shared by every concurrent caller."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

__all__ = ["SingleFlight", "SingleFlightStats"]

T = TypeVar("T")


class SingleFlightStats(BaseModel):
    """A frozen snapshot of a :class:`SingleFlight`'s counters."""

    model_config = ConfigDict(frozen=True)

    executions: int = 0
    """Calls actually started (one per key per flight)."""
    coalesced: int = 0
    """Callers that joined a call already in flight instead of starting one."""
    failures: int = 0
    """Executions that ended with an exception (shared by all their callers)."""
    in_flight: int = 0
    """Keys with a call running now."""


class _Flight:
    """One call in flight and the futures of the callers waiting for it."""

    __slots__ = ("task", "waiters", "waiting")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.waiters: list[asyncio.Future[Any]] = []
        self.waiting = 0  # waiters not cancelled yet


class SingleFlight(Generic[T]):
    """Runs at most one call per key at a time; concurrent callers share its outcome.

    The first caller of :meth:`run` for a key starts ``fn()`` in a task of its own;
    every caller with the same key that arrives while it runs awaits that task and
    gets the same result or the same exception. Once the call has finished, the next
    caller starts a new one: outcomes, errors included, are never cached here.

    Cancellation: a caller cancelled while waiting (the first one included) just
    stops waiting; the call goes on for the others. With ``cancel_abandoned=False``
    (the default) it is never cancelled by its callers, so a paid provider call
    still completes and can be stored; with ``cancel_abandoned=True`` it is
    cancelled as soon as no caller waits for it any more.

    Cost: O(1) per caller: one dict lookup and one future of its own, resolved by the
    call's completion (no polling, no shield; a waiter's cancellation cancels only
    its own future). Not thread-safe: use it from one event loop at a time; a call
    still in flight in a loop that has ended is forgotten by the next loop's callers.
    """

    def __init__(self, *, cancel_abandoned: bool = False) -> None:
        self._cancel_abandoned = bool(cancel_abandoned)
        self._flights: dict[Hashable, _Flight] = {}
        self._executions = 0
        self._coalesced = 0
        self._failures = 0

    def __repr__(self) -> str:
        return (
            f"SingleFlight(in_flight={len(self._flights)}, executions={self._executions}, "
            f"coalesced={self._coalesced}, cancel_abandoned={self._cancel_abandoned})"
        )

    def __len__(self) -> int:
        """Number of keys with a call in flight."""
        return len(self._flights)

    def __contains__(self, key: Hashable) -> bool:
        flight = self._flights.get(key)
        return flight is not None and not flight.task.done()

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        """Return the outcome of the one call of ``fn`` in flight for ``key``.

        ``fn`` is called only when no call for ``key`` is running. Raises whatever
        that call raised. ``key`` must be hashable.
        """
        flight = self._flights.get(key)
        loop = asyncio.get_running_loop()
        # a flight of another event loop (one that has ended) can never finish here
        if flight is None or flight.task.done() or flight.task.get_loop() is not loop:
            task: asyncio.Task[T] = asyncio.ensure_future(_call(fn))
            new = flight = _Flight(task)
            self._flights[key] = flight
            self._executions += 1
            task.add_done_callback(lambda done: self._finish(key, new))
        else:
            self._coalesced += 1
        waiter: asyncio.Future[T] = loop.create_future()
        flight.waiters.append(waiter)
        flight.waiting += 1
        try:
            return await waiter
        finally:
            if waiter.cancelled():
                flight.waiting -= 1
                if self._cancel_abandoned and flight.waiting == 0 and not flight.task.done():
                    # leave the table now: a caller arriving before the task finishes
                    # cancelling must start a new call, not join a dying one
                    if self._flights.get(key) is flight:
                        del self._flights[key]
                    flight.task.cancel()

    def _finish(self, key: Hashable, flight: _Flight) -> None:
        # A newer flight may already own the key (started after this one was done).
        if self._flights.get(key) is flight:
            del self._flights[key]
        task = flight.task
        if task.cancelled():
            for waiter in flight.waiters:
                waiter.cancel()
            return
        error = task.exception()
        if error is not None:
            self._failures += 1
            for waiter in flight.waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            return
        result = task.result()
        for waiter in flight.waiters:
            if not waiter.done():
                waiter.set_result(result)

    def stats(self) -> SingleFlightStats:
        """Return a frozen snapshot of the counters."""
        return SingleFlightStats(
            executions=self._executions,
            coalesced=self._coalesced,
            failures=self._failures,
            in_flight=len(self._flights),
        )


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
