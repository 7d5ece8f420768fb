"""The soak script runs end to end: a few seconds, tiny settings, chaos included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.redis_server import redis_server_binary

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_short_chaotic_soak_reports_and_finds_nothing_unexpected(tmp_path: Path) -> None:
    redis_server_binary()
    figures_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "5", "--report-every", "1",
         "--workers", "8", "--chaos", "--down-seconds", "0.5", "--json", str(figures_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    rows = figures["rows"]
    assert len(rows) == 5
    assert len([line for line in result.stdout.splitlines() if line.startswith("[")]) == 5
    assert "| t (s) | resolves/s |" in result.stdout
    assert "Totals over 5 s" in result.stdout

    assert figures["unexpected"] == {}
    gateway = figures["gateway"]
    assert gateway["requests"] > 100
    assert gateway["exact_hits"] > 0
    events = [event.split(" ", 1)[1] for row in rows for event in row["events"]]
    assert events == ["SIGKILL", "restarted (empty)", "SIGSTOP", "SIGCONT"]
    assert gateway["backend_errors"] + gateway["backend_skipped"] > 0, "the kill was noticed"
    for row in rows:
        resources = row["resources"]
        assert 0 < resources["rss_mib"] < 1024
        assert resources["tasks"] >= 8  # the workers
        assert resources["pool_connections"] > 0
