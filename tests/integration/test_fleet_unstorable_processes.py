"""Fleet coalescing across real processes when the answer cannot be read back from the cache.

The leader's waiters must learn its outcome: the answer itself when it is small, else
"not stored: call the provider yourselves now", which they then do side by side. Before,
each waiter found the cache empty, took the lease and called the provider in turn (4
processes with a 1 s provider took 1, 2, 3 and 4 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisTarget
from tests.support.workers import run_together, start_worker

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]

WORKER = Path(__file__).with_name("unstorable_worker.py")
PROCESSES = 4
SMALL = {"answer": "Paris", "note": "x" * 200}


async def run_fleet(target: RedisTarget, mode: str) -> tuple[list[dict[str, Any]], int, int]:
    workers = [
        await start_worker(WORKER, target.url, target.prefix, mode) for _ in range(PROCESSES)
    ]
    reports = await run_together(workers, ready_timeout=20, run_timeout=40)
    calls = int(await target.client.get(f"{target.prefix}:calls") or 0)
    at_start = [
        int(n) for n in await target.client.lrange(f"{target.prefix}:running-at-start", 0, -1)
    ]
    return reports, calls, max(at_start)


@pytest.mark.parametrize("mode", ["too-large", "tiny-ttl"])
async def test_a_small_answer_the_cache_cannot_keep_reaches_every_process(
    real_redis: RedisTarget, mode: str
) -> None:
    reports, calls, _ = await run_fleet(real_redis, mode)
    assert [report["answer"] for report in reports] == [SMALL] * PROCESSES
    assert calls == 1
    assert sum(report["stats"]["fleet_hits"] for report in reports) == PROCESSES - 1


@pytest.mark.parametrize("mode", ["none", "huge"])
async def test_waiting_processes_call_the_provider_together_when_the_answer_cannot_be_shared(
    real_redis: RedisTarget, mode: str
) -> None:
    reports, calls, peak = await run_fleet(real_redis, mode)
    expected = None if mode == "none" else "y" * 200_000
    assert [report["answer"] for report in reports] == [expected] * PROCESSES
    assert calls == PROCESSES
    # the leader's call, then the three waiters' calls side by side, not one by one
    assert peak == PROCESSES - 1
