"""Deadlines for ``with`` blocks in a task: raise ``TimeoutError`` when the body overruns.

Every Redis operation behind a guard runs under one, so it must be cheap. Between
two network round trips (caches cold) ``asyncio.timeout`` measured about 10 us per
use and a timer created and cancelled per call about 5-8 us. A :class:`Watchdog`
serves all the calls of one guard with a single armed timer, and :func:`deadline`
is a watchdog for one call. They are plain (synchronous) context managers, entered
with ``with`` around the awaits they bound, like ``anyio.fail_after``: an
``async with`` would cost two coroutines per call for nothing. Both do the bookkeeping
``asyncio.timeout`` does with ``Task.cancelling()`` and ``Task.uncancel()``, so a
cancellation from outside (or from an enclosing timeout) is never mistaken for
theirs and never swallowed. Python 3.10 has no ``uncancel``: there,
``anyio.fail_after`` does the job.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import anyio

__all__ = ["Watchdog", "deadline"]


def deadline(seconds: float) -> AbstractContextManager[Any]:
    """Return a context manager bounding its body to ``seconds``; use as ``with`` in a task.

    At the deadline the body is cancelled and ``TimeoutError`` is raised from the
    ``async with``. A cancellation of the task from elsewhere propagates unchanged.
    """
    return Watchdog(seconds).watch()


class Watchdog:
    """Deadlines of ``timeout`` seconds for any number of calls, with one armed timer.

    All watched calls share the same timeout, so the oldest in flight always expires
    first: one timer, armed for it, covers every call. It is re-armed only when it
    fires (for the next oldest), not per call, so a watched call costs a dict insert
    and delete instead of creating and cancelling a timer. Use ``with
    watchdog.watch():`` inside a task; an overrun raises ``TimeoutError``.
    """

    __slots__ = ("_loop", "_timeout", "_timer", "_watches")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._watches: OrderedDict[object, Any] = OrderedDict()  # oldest first
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the timer is on

    def watch(self) -> AbstractContextManager[Any]:
        """Return the deadline of one call: ``timeout`` seconds from entering it."""
        if sys.version_info >= (3, 11):
            return _Watch(self)
        return anyio.fail_after(self._timeout)

    def _start(self, watch: Any) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # used from another event loop (a second asyncio.run): the old loop's timer
            # would never fire here, and its watches belong to tasks that are gone
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            self._watches.clear()
            self._loop = loop
        self._watches[watch] = watch
        if self._timer is None:
            self._timer = loop.call_at(watch.started + self._timeout, self._expire_overdue)

    def _stop(self, watch: Any) -> None:
        self._watches.pop(watch, None)

    def _expire_overdue(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        horizon = loop.time() - self._timeout
        watches = self._watches
        while watches:
            oldest = next(iter(watches))
            if oldest.started > horizon:
                self._timer = loop.call_at(oldest.started + self._timeout, self._expire_overdue)
                return
            del watches[oldest]
            oldest.expire()


if sys.version_info >= (3, 11):
    # Task.cancelling() and Task.uncancel() are 3.11+

    class _Watch(AbstractContextManager[None]):
        """One call under a :class:`Watchdog`: it cancels the task when told to expire."""

        __slots__ = ("_cancelling", "_expired", "_task", "_watchdog", "started")

        def __init__(self, watchdog: Watchdog) -> None:
            self._watchdog = watchdog
            self._expired = False

        def __enter__(self) -> None:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("a deadline must be used inside a task")
            self._task = task
            # cancellations already requested before we start are not ours to absorb
            self._cancelling = task.cancelling()
            self.started = asyncio.get_running_loop().time()
            self._watchdog._start(self)

        def expire(self) -> None:
            self._expired = True
            self._task.cancel()

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            self._watchdog._stop(self)
            if not self._expired:
                return
            # withdraw our own cancellation; only if no one else's remains is it a timeout
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
