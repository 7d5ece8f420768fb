"""Worker processes for the multi-process tests: this checkout on their path, started together.

A worker script prints ``ready`` once connected, waits for ``go`` on stdin, does its
work and prints one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_together", "start_worker"]

REPO_ROOT = Path(__file__).resolve().parents[2]


async def start_worker(script: Path, *args: object) -> asyncio.subprocess.Process:
    """Start ``python script args...``, importing this checkout's package over any installed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *map(str, args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )


async def run_together(
    workers: Sequence[asyncio.subprocess.Process], *, ready_timeout: float, run_timeout: float
) -> list[Any]:
    """Release the workers at once when all are ready; return their JSON outputs, in order.

    Every worker must exit with status 0; any still running on the way out is killed.
    """
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), ready_timeout)
            assert line == b"ready\n"
        for worker in workers:  # every worker is connected: start them together
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        outputs = await asyncio.wait_for(
            asyncio.gather(*(worker.communicate() for worker in workers)), run_timeout
        )
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    assert [worker.returncode for worker in workers] == [0] * len(workers)
    return [json.loads(stdout) for stdout, _ in outputs]
