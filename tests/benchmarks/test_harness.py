"""The benchmark harness runs end to end in --quick mode (no timing is asserted here)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import Measurement, Section, Target

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("aiocache", "cashews", "limits", "matplotlib", "psutil")


def test_section_renders_ratios_against_its_baseline() -> None:
    section = Section("t", "d")
    section.add_table(
        "c", [Measurement("ours", [1.0, 2.0, 3.0], "us"), Measurement("base", [4.0], "us")], "base"
    )
    section.targets.append(Target("ours/base", 0.5, 0.6))
    text = section.render()
    assert "| ours | 2 us | 1-3 | 0.50x |" in text
    assert "| base | 4 us | 4-4 | 1.00x |" in text
    assert "| ours/base | 0.5x | <= 0.6x | met |" in text
    assert not Target("x", 2.0, 3.0, at_most=False).met


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_writes_the_report_and_the_chart(tmp_path: Path) -> None:
    missing = [name for name in PEERS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"benchmark peers not installed (pip install -e '.[bench]'): {missing}")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is needed to run the benchmarks")
    report, chart = tmp_path / "RESULTS.md", tmp_path / "headline.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(report),
         "--chart", str(chart)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    for title in ("1. Exact hit, in memory", "2. Exact hit, Redis", "3. Rate limiter",
                  "4. Semantic lookup", "5. Stampede", "6. Memory", "7. Streaming"):  # fmt: skip
        assert title in text
    assert "Targets met:" in text
    assert "aiocache SimpleMemoryCache.get" in text
    assert "limits moving window" in text
    assert chart.stat().st_size > 1000
