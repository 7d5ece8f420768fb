"""The semantic-quality harness: threshold sweep, operating points and the report's invariants."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.run import main as benchmarks_main
from benchmarks.semantic.evaluate import (
    BOUNDS,
    OperatingPoint,
    best_threshold,
    choose_threshold,
    evaluate,
    load_guard,
    main,
    measure_guard_cost,
    operating_point,
    target_met,
)
from benchmarks.semantic.pairs import DEV, HOLDOUT, TRAP_CATEGORIES, Pair, load_pairs


def _pairs(labels: list[bool]) -> list[Pair]:
    return [
        Pair(f"q{i}", f"c{i}", *(("hit", "paraphrase") if hit else ("trap", "negation")), "math")
        for i, hit in enumerate(labels)
    ]


def test_best_threshold_serves_the_most_hits_under_the_cap() -> None:
    sims = [0.99, 0.95, 0.90, 0.85, 0.80]
    labels = [True, False, True, True, False]
    everyone = [True] * 5
    # zero wrong allowed: only the pair above the first trap can be served
    assert best_threshold(sims, labels, everyone, 0.0) == 0.99
    # one trap of two allowed: everything down to the second trap
    assert best_threshold(sims, labels, everyone, 0.5) == 0.85
    assert best_threshold(sims, labels, everyone, 1.0) == 0.80
    # refusing the first trap lets the threshold go down to it
    assert best_threshold(sims, labels, [True, False, True, True, True], 0.0) == 0.85


def test_best_threshold_serves_nothing_when_the_top_pair_is_a_trap() -> None:
    threshold = best_threshold([0.97, 0.5], [False, True], [True, True], 0.0)
    assert threshold > 0.97
    point = operating_point(_pairs([False, True]), [0.97, 0.5], [True, True], threshold)
    assert point.hit_rate == 0.0
    assert point.wrong_rate == 0.0


def test_equal_similarities_are_served_together() -> None:
    # a hit and a trap tie: serving the hit means serving the trap
    threshold = best_threshold([0.9, 0.9, 0.1], [True, False, True], [True] * 3, 0.0)
    assert threshold > 0.9


def test_the_harness_sweep_agrees_with_calibrate_threshold() -> None:
    if importlib.util.find_spec("aiocache_llm.semantic") is None:
        pytest.skip("aiocache_llm.semantic not available")
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(4, 60))
        labels = [bool(x) for x in rng.integers(0, 2, n)]
        labels[0], labels[1] = True, False
        sims = [float(x) for x in np.round(rng.uniform(-0.5, 0.99, n), 2)]  # ties happen
        accepted = [bool(x) for x in rng.integers(0, 4, n) > 0]
        pairs = _pairs(labels)
        for cap in (0.0, 0.01, 0.05, 0.3):
            ours = best_threshold(sims, labels, accepted, cap)
            theirs = choose_threshold(pairs, sims, accepted, cap)
            ours_point = operating_point(pairs, sims, accepted, ours)
            theirs_point = operating_point(pairs, sims, accepted, theirs)
            assert (ours_point.hits, ours_point.wrong) == (theirs_point.hits, theirs_point.wrong)


def test_operating_point_counts_per_category() -> None:
    pairs = [
        Pair("a", "b", "hit", "paraphrase", "math"),
        Pair("c", "d", "trap", "negation", "math"),
        Pair("e", "f", "trap", "negation", "math"),
        Pair("g", "h", "trap", "scope", "math"),
    ]
    point = operating_point(pairs, [0.9, 0.8, 0.5, 0.95], [True] * 4, 0.7)
    assert (point.hits, point.wrong, point.should_hit, point.traps) == (1, 2, 1, 3)
    assert point.wrong_by_category == {"negation": 0.5, "scope": 1.0}
    assert point.wrong_rate == pytest.approx(2 / 3)


def test_a_small_evaluation_keeps_its_invariants() -> None:
    splits = {"dev": load_pairs(DEV)[:120], "holdout": load_pairs(HOLDOUT)[:60]}
    guard = load_guard()
    runs = evaluate(splits, ["hashing"], guard=guard)
    assert [run.name for run in runs] == ["hashing"]
    (run,) = runs
    assert [r.split for r in run.splits] == ["dev", "holdout", "holdout at dev's threshold"]
    dev, holdout, transferred = run.splits
    for result in run.splits:
        pairs = splits["dev" if result is dev else "holdout"]
        assert result.pairs == len(pairs)
        assert 0.0 <= result.auc <= 1.0
        points = [result.plain]
        if guard is not None:
            assert result.guarded is not None
            points.append(result.guarded)
        for by_cap in points:
            assert set(by_cap) == set(BOUNDS)
            for cap, point in by_cap.items():
                assert 0.0 <= point.hit_rate <= 1.0
                assert 0.0 <= point.wrong_rate <= 1.0
                if not result.transferred:
                    # the chosen threshold keeps the split's own wrong rate under the cap
                    assert point.wrong_rate <= cap + 1e-12
                assert point.traps == sum(not p.should_hit for p in pairs)
                assert set(point.wrong_by_category) <= set(TRAP_CATEGORIES)
                assert all(0.0 <= r <= 1.0 for r in point.wrong_by_category.values())
            if not result.transferred:
                # a looser cap never serves fewer should-hit pairs
                assert by_cap[0.05].hit_rate >= by_cap[0.01].hit_rate
    # the transferred row uses dev's thresholds, on the holdout pairs
    assert transferred.transferred
    assert not holdout.transferred
    for cap in BOUNDS:
        assert transferred.plain[cap].threshold == dev.plain[cap].threshold
        if guard is not None:
            assert transferred.guarded is not None
            assert dev.guarded is not None
            assert transferred.guarded[cap].threshold == dev.guarded[cap].threshold


def test_the_command_writes_the_report(tmp_path: Path) -> None:
    output = tmp_path / "SEMANTIC.md"
    text = main(["--embedders", "hashing", "--limit", "60", "--no-cost", "--output", str(output)])
    assert output.read_text(encoding="utf-8").strip() == text.strip()
    assert "## At most 1.0% wrong answers" in text
    assert "## At most 5.0% wrong answers" in text
    assert "| hashing | dev |" in text
    assert "| hashing | holdout |" in text


def test_python_m_benchmarks_semantic_dispatches_to_the_harness(tmp_path: Path) -> None:
    output = tmp_path / "out.md"
    args = ["--embedders", "hashing", "--limit", "30", "--no-guard", "--output", str(output)]
    benchmarks_main(["semantic", *args])
    text = output.read_text(encoding="utf-8")
    assert "plain cosine only" in text


def test_target_needs_twice_the_hits_and_at_least_ten_percent() -> None:
    def point(hits: int) -> OperatingPoint:
        return OperatingPoint(0.5, hits / 100, 0.0, hits, 0, 100, 100)

    assert target_met(point(3), point(30))
    assert not target_met(point(20), point(30))  # 1.5x
    assert not target_met(point(0), point(5))  # under 10%
    assert target_met(point(0), point(10))


def test_the_guard_cost_benchmark_reports_every_figure() -> None:
    guard = load_guard()
    if guard is None:
        pytest.skip("SemanticGuard is not importable")
    cost = measure_guard_cost(load_pairs(DEV)[:40], guard, rows=500, dimension=32, rounds=2)
    assert cost.guard.best_us > 0
    assert cost.topk.best_us > 0
    assert cost.guard.best_us <= cost.guard.median_us
    assert cost.ratio > 0
    assert cost.get_plain is not None
    assert cost.get_guard is not None
    assert cost.get_ratio is not None
    assert cost.get_ratio > 0


def test_an_embedder_whose_package_is_missing_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wordllama", None)  # ``import wordllama`` now fails
    splits = {"dev": load_pairs(DEV)[:30]}
    runs = evaluate(splits, ["wordllama", "hashing"])
    assert [run.name for run in runs] == ["hashing"]
    assert [r.split for r in runs[0].splits] == ["dev"]  # no holdout: no transferred row
