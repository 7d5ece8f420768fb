"""Streams shared by real processes on the real Redis: one provider stream, dead producers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisTarget
from tests.support.workers import run_together, start_worker

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]

WORKER = Path(__file__).with_name("stream_worker.py")
PROCESSES = 3
CONCURRENCY = 20
FULL = [f"c{i} " for i in range(20)]


async def test_processes_share_one_provider_stream(real_redis: RedisTarget) -> None:
    workers = [
        await start_worker(WORKER, real_redis.url, real_redis.prefix, CONCURRENCY, "normal")
        for _ in range(PROCESSES)
    ]
    reports = await run_together(workers, ready_timeout=15, run_timeout=40)
    consumers = [c for report in reports for c in report["consumers"]]
    assert len(consumers) == PROCESSES * CONCURRENCY
    assert all(c["chunks"] == FULL and c["error"] is None for c in consumers)
    assert int(await real_redis.client.get(f"{real_redis.prefix}:provider-streams")) == 1
    assert sum(r["stats"]["fleet_hits"] for r in reports) == PROCESSES - 1


async def kill_first_streamer(target: RedisTarget, signal_key: str, after: float) -> int:
    """SIGKILL the process that holds the fleet's first stream once it sets ``signal_key``."""
    for _ in range(300):
        if await target.client.exists(f"{target.prefix}:{signal_key}"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"{signal_key} never appeared")
    await asyncio.sleep(after)  # let the other processes follow it first
    pid = int(await target.client.get(f"{target.prefix}:first-streamer"))
    os.kill(pid, signal.SIGKILL)
    return pid


async def run_with_a_kill(
    target: RedisTarget, mode: str, signal_key: str
) -> tuple[list[dict[str, Any]], int]:
    workers = [
        await start_worker(WORKER, target.url, target.prefix, CONCURRENCY, mode)
        for _ in range(PROCESSES)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert await asyncio.wait_for(worker.stdout.readline(), 15) == b"ready\n"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        killed = await kill_first_streamer(target, signal_key, after=0.3)
        outputs = await asyncio.wait_for(
            asyncio.gather(*(worker.communicate() for worker in workers)), 40
        )
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    reports = []
    for worker, (stdout, _) in zip(workers, outputs, strict=True):
        if worker.pid == killed:
            assert worker.returncode == -signal.SIGKILL
            continue
        assert worker.returncode == 0
        reports.append(json.loads(stdout))
    assert len(reports) == PROCESSES - 1
    return reports, killed


async def test_a_producer_killed_before_its_first_chunk_is_taken_over(
    real_redis: RedisTarget,
) -> None:
    reports, _ = await run_with_a_kill(real_redis, "hang-first", "first-streamer")
    consumers = [c for report in reports for c in report["consumers"]]
    assert all(c["chunks"] == FULL and c["error"] is None for c in consumers)
    # the killed stream, then one stream for everyone left
    assert int(await real_redis.client.get(f"{real_redis.prefix}:provider-streams")) == 2


async def test_a_producer_killed_mid_stream_interrupts_only_consumers_with_partial_text(
    real_redis: RedisTarget,
) -> None:
    reports, _ = await run_with_a_kill(real_redis, "die-mid", "stalled")
    first = [c for report in reports for c in report["consumers"] if c["wave"] == 1]
    second = [c for report in reports for c in report["consumers"] if c["wave"] == 2]
    # what they received is true and never spliced with another stream's chunks
    assert all(c["error"] == "StreamInterruptedError" for c in first)
    assert all(c["chunks"] == FULL[:5] for c in first)
    # consumers that had received nothing get the whole answer from a new stream
    failed = [(len(c["chunks"]), c["error"], c["cause"]) for c in second if c["chunks"] != FULL]
    assert failed == []
    assert int(await real_redis.client.get(f"{real_redis.prefix}:provider-streams")) == 2
