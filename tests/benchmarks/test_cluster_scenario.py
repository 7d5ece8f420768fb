"""The Redis Cluster benchmark scenario is registered and runs end to end (no timing asserted)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import SCENARIOS, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_scenario_is_registered_and_selectable() -> None:
    assert "cluster" in SCENARIOS
    assert parse_args(["--only", "cluster"]).only == ["cluster"]
    module = importlib.import_module("benchmarks.scenarios.cluster")
    assert asyncio.iscoroutinefunction(module.run)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_cluster_run_reports_the_target(tmp_path: Path) -> None:
    if importlib.util.find_spec("limits") is None:
        pytest.skip("benchmark peers not installed (pip install -e '.[bench]')")
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed to start a cluster")
    report, chart = tmp_path / "RESULTS.md", tmp_path / "headline.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "cluster",
         "--output", str(report), "--chart", str(chart)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    assert "8. Redis Cluster" in text
    assert "raw RedisCluster.get (redis-py)" in text
    assert "RedisExactCache.get on a cluster / raw RedisCluster.get" in text
    assert "aiocache_llm RedisRateLimiter, cluster" in text
