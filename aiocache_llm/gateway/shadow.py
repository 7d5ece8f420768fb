"""The gateway's shadow mode: semantic lookups measured, recorded, never served.

``InferenceGateway(..., semantic_mode="shadow")`` asks its semantic cache, for every
request that reaches it, what it would serve (the cache's ``probe``, see
:class:`~aiocache_llm.backends.verification.SemanticProbe`), and answers from the
provider anyway. Each probe becomes a :class:`~aiocache_llm.semantic.ShadowRecord`
kept by :class:`ShadowLog`:

* in a bounded in-memory log (the newest ``shadow_log_size`` records; O(1) per record);
* and/or handed to ``on_shadow(record)``, called *after* the request path, in a later
  turn of the event loop (``loop.call_soon``), so it never delays an answer. A
  coroutine function is run as a task. A callback that raises is counted in
  ``shadow_callback_errors`` and logged once (without any text); it never fails a
  request. A sync callback runs on the event loop: it must not block (do I/O in an
  async one).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiocache_llm.backends.verification import SemanticProbe
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import check_callable
from aiocache_llm.semantic.shadow import ShadowRecord

__all__ = ["DEFAULT_SHADOW_LOG_SIZE", "ShadowLog"]

logger = logging.getLogger("aiocache_llm.gateway")

DEFAULT_SHADOW_LOG_SIZE = 1000
"""Shadow records a gateway keeps in memory by default (the newest)."""


class ShadowLog:
    """The records of one gateway's shadow lookups and their counters."""

    __slots__ = (
        "_callback",
        "_clock",
        "_logged",
        "_records",
        "_tasks",
        "callback_errors",
        "lookups",
        "refused",
        "would_hit",
    )

    def __init__(
        self,
        size: object,
        on_shadow: Callable[[ShadowRecord], Any] | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if type(size) is not int:
            raise InvalidInputTypeError(
                f"shadow_log_size must be an int, got {type(size).__name__}"
            )
        if size < 0:
            raise InvalidInputError(f"shadow_log_size must be >= 0 (0: keep none), got {size}")
        self._callback = None if on_shadow is None else check_callable("on_shadow", on_shadow)
        self._records: deque[ShadowRecord] = deque(maxlen=size)
        self._clock = clock
        self._tasks: set[asyncio.Task[Any]] = set()
        self._logged = False
        self.lookups = 0
        self.would_hit = 0
        self.refused = 0
        self.callback_errors = 0

    def add(self, probe: SemanticProbe) -> None:
        """Record one probe; never blocks, never raises (the callback runs later)."""
        record = ShadowRecord.from_probe(probe, self._clock())
        self.lookups += 1
        self.would_hit += record.would_hit
        self.refused += record.verified is False
        if self._records.maxlen:
            self._records.append(record)
        if self._callback is not None:
            asyncio.get_running_loop().call_soon(self._deliver, record)

    def records(self, *, clear: bool = False) -> list[ShadowRecord]:
        """The records kept, oldest first (a copy); ``clear=True`` also empties the log."""
        kept = list(self._records)
        if clear:
            self._records.clear()
        return kept

    def _deliver(self, record: ShadowRecord) -> None:
        assert self._callback is not None
        try:
            result = self._callback(record)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._finished)
        except Exception as exc:
            self._failed(exc)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed(task.exception())

    def _failed(self, exc: BaseException | None) -> None:
        self.callback_errors += 1
        if not self._logged:
            self._logged = True
            logger.warning(
                "on_shadow raised %s: shadow records it fails on are dropped (logged once)",
                type(exc).__name__,
            )

    async def aclose(self) -> None:
        """Cancel the callbacks still running and wait for them."""
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
