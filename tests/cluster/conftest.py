"""Cluster tests time calls in tenths of a second: keep the garbage collector out of it.

In a full run the test process holds millions of objects (every SDK, model runtime and
suite loaded before); a failover allocates a burst of exceptions and tracebacks, and the
generation-2 collection that follows can stop the event loop for longer than a call's
0.5 s deadline, failing calls to healthy primaries for a reason that has nothing to do
with the cluster. Everything alive before the test is frozen out of collection (an app
that cares does the same after start-up: ``gc.freeze()``), and pauses are reported.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest

_PAUSE_REPORTED_S = 0.05


@pytest.fixture(autouse=True)
def _frozen_heap() -> Iterator[None]:
    started: list[float] = []
    pauses: list[tuple[int, float]] = []

    def timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            took = time.perf_counter() - started.pop()
            if took >= _PAUSE_REPORTED_S:
                pauses.append((info["generation"], took))

    gc.collect()
    gc.freeze()
    gc.callbacks.append(timer)
    try:
        yield
    finally:
        gc.callbacks.remove(timer)
        gc.unfreeze()
        if pauses:
            print(f"garbage-collector pauses over {_PAUSE_REPORTED_S} s: {pauses}")
