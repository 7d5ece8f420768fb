"""Fleet-wide coalescing with real processes on the real Redis (no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisTarget

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
CONCURRENCY = 50


def start_workers(target: RedisTarget, *, hang_first: bool) -> list[subprocess.Popen[str]]:
    assert target.url is not None
    env = {**os.environ, "HANG_FIRST": "1" if hang_first else "0", "PYTHONPATH": str(ROOT)}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.fleet_worker",
                target.url,
                target.prefix,
                str(CONCURRENCY),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]


async def release(target: RedisTarget) -> None:
    # give every worker time to import and block on the start list, then go
    await asyncio.sleep(1.5)
    await target.client.rpush(f"{target.prefix}:start", *["go"] * PROCESSES)


def reports(workers: list[subprocess.Popen[str]], timeout: float = 60) -> list[dict[str, Any]]:
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=timeout)
        if worker.returncode != 0:
            if worker.returncode == -signal.SIGKILL:
                continue
            pytest.fail(f"worker failed ({worker.returncode}): {err}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


async def test_four_processes_of_fifty_concurrent_resolves_make_one_provider_call(
    real_redis: RedisTarget,
) -> None:
    workers = start_workers(real_redis, hang_first=False)
    await release(real_redis)
    results = await asyncio.to_thread(reports, workers)
    calls = int(await real_redis.client.get(f"{real_redis.prefix}:provider-calls") or 0)
    assert calls == 1
    assert len(results) == PROCESSES
    answers = {a for r in results for a in r["answers"]}
    assert len(answers) == 1
    assert sum(len(r["answers"]) for r in results) == PROCESSES * CONCURRENCY
    stats = [r["stats"] for r in results]
    assert sum(s["provider_calls"] for s in stats) == 1
    assert sum(s["fleet_hits"] for s in stats) + sum(s["exact_hits"] for s in stats) == 3


async def test_sigkilled_lease_holder_is_taken_over_by_another_process(
    real_redis: RedisTarget,
) -> None:
    workers = start_workers(real_redis, hang_first=True)
    await release(real_redis)
    first_key = f"{real_redis.prefix}:first-caller"
    for _ in range(200):
        leader = await real_redis.client.get(first_key)
        if leader:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("no process called the provider")
    victim = next(w for w in workers if w.pid == int(leader))
    victim.send_signal(signal.SIGKILL)

    results = await asyncio.to_thread(reports, workers)
    assert len(results) == PROCESSES - 1
    answers = {a for r in results for a in r["answers"]}
    assert len(answers) == 1, answers
    assert answers.pop() != f"answer from pid {leader.decode()}"
    # one call died with its process; exactly one survivor called the provider again
    calls = int(await real_redis.client.get(f"{real_redis.prefix}:provider-calls") or 0)
    assert calls == 2
