"""The optional ANN index: configuration, the missing extra, and exactness of what it returns.

Tests that build graphs skip when the ``ann`` extra (usearch) is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import subprocess
import sys
from typing import Any, Literal

import numpy as np
import pytest

from aiocache_llm import InvalidInputError, InvalidInputTypeError, MemorySemanticCache
from aiocache_llm.backends import ann as ann_module
from aiocache_llm.backends.ann import AnnConfig, AnnIndex, resolve_ann
from aiocache_llm.backends.vectors import SIMILARITY_TOLERANCE, VectorIndex, as_unit_vector

needs_usearch = pytest.mark.skipif(
    not ann_module.usearch_available(), reason="the 'ann' extra (usearch) is not installed"
)

# configuration and the extra


def test_ann_settings_resolve_to_a_config() -> None:
    pytest.importorskip("usearch")
    assert resolve_ann(None) is None
    assert resolve_ann("auto") == AnnConfig()
    config = AnnConfig(min_rows=10, candidates=8)
    assert resolve_ann(config) is config


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("hnsw", InvalidInputError, "ann must be None, 'auto' or an AnnConfig"),
        (True, InvalidInputTypeError, "ann must be None, 'auto' or an AnnConfig, got bool"),
        ({"min_rows": 10}, InvalidInputTypeError, "got dict"),
    ],
)
def test_bad_ann_settings_are_refused(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        resolve_ann(value)
    with pytest.raises(error, match=message):
        MemorySemanticCache(lambda text: [1.0], ann=value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_rows": 0}, InvalidInputError, "min_rows must be > 0"),
        ({"candidates": -1}, InvalidInputError, "candidates must be > 0"),
        ({"connectivity": 1.5}, InvalidInputTypeError, "connectivity must be an int"),
        ({"expansion_search": True}, InvalidInputTypeError, "expansion_search must be an int"),
        ({"catch_up_at": 0}, InvalidInputError, "catch_up_at must be > 0"),
        ({"threads": -1}, InvalidInputError, "threads must be >= 0"),
        ({"threads": None}, InvalidInputTypeError, "threads must be an int"),
        ({"dtype": "f64"}, InvalidInputError, "dtype must be 'i8', 'f16' or 'f32'"),
    ],
)
def test_ann_config_validates_its_fields(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        AnnConfig(**kwargs)


def test_asking_for_ann_without_the_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "usearch", None)  # import usearch now raises ImportError
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    assert ann_module.usearch_available() is False
    for setting in ("auto", AnnConfig()):
        with pytest.raises(ImportError, match=r"pip install 'aiocache_llm\[ann\]'"):
            MemorySemanticCache(lambda text: [1.0], ann=setting)
    cache = MemorySemanticCache(lambda text: [1.0])  # exact search needs no extra
    assert "ann=False" in repr(cache)


def test_importing_the_library_does_not_import_usearch() -> None:
    code = "import sys, aiocache_llm; assert 'usearch' not in sys.modules, 'usearch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


# helpers


def unit(rng: np.random.Generator, dimension: int) -> np.ndarray:
    return as_unit_vector(rng.standard_normal(dimension))


def small_config(**kwargs: Any) -> AnnConfig:
    """A graph from 40 rows on, caught up every 8 writes: small tests exercise every path."""
    defaults: dict[str, Any] = {"min_rows": 40, "catch_up_at": 8, "candidates": 8}
    return AnnConfig(**{**defaults, **kwargs})


def exact_best(
    stored: dict[str, tuple[np.ndarray, float]], query: np.ndarray, now: float
) -> tuple[str, float] | None:
    live = [(i, float(v.astype(np.float64) @ query)) for i, (v, x) in stored.items() if x > now]
    return max(live, key=lambda pair: pair[1], default=None)


@pytest.fixture
def proposals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many lookups asked the graph: proves the ANN path (not brute force) answered."""
    calls: list[int] = []
    propose = AnnIndex.propose

    def spy(self: AnnIndex, query: np.ndarray, count: int) -> list[str]:
        found = propose(self, query, count)
        calls.append(len(found))
        return found

    monkeypatch.setattr(AnnIndex, "propose", spy)
    return calls


# exactness of what the graph path returns


@needs_usearch
async def test_graph_lookups_never_return_removed_replaced_or_expired_vectors(
    proposals: list[int],
) -> None:
    rng = np.random.default_rng(5)
    dimension = 8
    index = VectorIndex(dimension, ann=small_config())
    stored: dict[str, tuple[np.ndarray, float]] = {}
    agree = 0
    lookups = 0
    for step in range(1500):
        roll = rng.random()
        entry_id = f"e{int(rng.integers(0, 160))}"
        if roll < 0.6:
            expires_at = math.inf if rng.random() < 0.7 else float(rng.integers(0, 60))
            vector = unit(rng, dimension)
            index.upsert(entry_id, vector, expires_at)
            stored[entry_id] = (vector, expires_at)
        elif roll < 0.9:
            assert index.remove(entry_id) is (stored.pop(entry_id, None) is not None)
        else:
            now = float(rng.integers(0, 60))
            threshold = float(rng.uniform(-0.5, 0.9))
            query = unit(rng, dimension)
            found = await index.best_async(query, 1, now, threshold)
            best = exact_best(stored, query, now)
            for candidate in found:  # whatever is returned is live and scored exactly
                vector, expires_at = stored[candidate.entry_id]
                assert expires_at > now
                exact = float(vector.astype(np.float64) @ query)
                assert candidate.similarity == pytest.approx(exact, abs=1e-5)
                assert candidate.similarity >= threshold - SIMILARITY_TOLERANCE
            if best is not None and best[1] >= threshold:
                lookups += 1
                agree += bool(found) and found[0].entry_id == best[0]
            elif best is None or best[1] < threshold - SIMILARITY_TOLERANCE:
                assert found == []
        if step % 100 == 99:
            await index.catch_up()  # let the graph catch up now and then, as time would
    assert len(proposals) > 50  # most lookups went through the graph
    assert agree >= 0.95 * lookups


@needs_usearch
async def test_writes_are_seen_by_the_next_lookup_before_the_graph_catches_up(
    proposals: list[int],
) -> None:
    rng = np.random.default_rng(9)
    index = VectorIndex(16, ann=small_config(catch_up_at=1000))  # no catch-up on its own
    for i in range(100):
        index.upsert(f"e{i}", unit(rng, 16))
    await index.catch_up()
    target = unit(rng, 16)
    index.upsert("new", target)  # pending: not in the graph yet
    assert [c.entry_id for c in await index.best_async(target, 1)] == ["new"]
    stored = index.vector("e7")
    assert stored is not None
    index.upsert("e7", -stored)  # replaced: the graph still holds the old vector
    found = await index.best_async(stored, 1)
    assert found
    assert found[0].entry_id != "e7"
    index.remove("new")
    assert "new" not in [c.entry_id for c in await index.best_async(target, 4)]
    index.upsert("short-lived", target, expires_at=10.0)
    assert [c.entry_id for c in await index.best_async(target, 1, now=5.0)] == ["short-lived"]
    assert "short-lived" not in [c.entry_id for c in await index.best_async(target, 4, now=10.0)]
    assert len(proposals) == 5
    await index.catch_up()
    assert [c.entry_id for c in await index.best_async(-stored, 1)] == ["e7"]
    assert len(proposals) == 6


@needs_usearch
@pytest.mark.parametrize("dtype", ["i8", "f16", "f32"])
async def test_recall_at_1_against_brute_force_on_random_data(
    dtype: Literal["i8", "f16", "f32"],
) -> None:
    rng = np.random.default_rng(2024)
    dimension, rows, lookups = 32, 5000, 300
    index = VectorIndex(dimension, ann=AnnConfig(min_rows=1000, threads=0, dtype=dtype))
    matrix = rng.standard_normal((rows, dimension)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    for i, vector in enumerate(matrix):
        index.upsert(f"e{i}", vector)
    await index.catch_up()
    queries = rng.standard_normal((lookups, dimension)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    hits = 0
    for query in queries:
        (found,) = await index.best_async(query, 1)
        hits += found.entry_id == f"e{int(np.argmax(matrix @ query))}"
    assert hits / lookups >= 0.95, f"recall@1 {hits / lookups:.3f}"


@needs_usearch
async def test_cache_with_ann_keeps_thresholds_scopes_and_invalidation(
    proposals: list[int],
) -> None:
    rng = np.random.default_rng(11)
    table: dict[str, np.ndarray] = {f"filler {i}": unit(rng, 32) for i in range(60)}
    table["question"] = as_unit_vector([1.0] + [0.0] * 31)
    table["paraphrase"] = as_unit_vector([0.96, 0.28] + [0.0] * 30)
    cache = MemorySemanticCache(
        table.__getitem__, similarity_threshold=0.9, max_size=0, embed_in_thread=False,
        ann=small_config(min_rows=50),
    )  # fmt: skip
    for text in table:
        if text.startswith("filler"):
            await cache.put(text, text)
    await cache.put("question", "answer")
    other_scope = {"model": "other", "messages": [{"role": "user", "content": "paraphrase"}]}
    await cache.put(other_scope, "other model's answer")  # nearer, in another scope
    await cache.build_index()
    assert await cache.get("paraphrase") == "answer"
    assert await cache.get("paraphrase", similarity_threshold=0.97) is None
    assert await cache.invalidate("question") is True
    assert await cache.get("paraphrase") is None
    assert len(proposals) == 3  # the graph answered every semantic lookup
    assert await cache.get(other_scope) == "other model's answer"  # exact repeat
    await cache.aclose()


# the catch-up lifecycle


@needs_usearch
async def test_clearing_or_closing_during_a_catch_up_stops_it_cleanly() -> None:
    rng = np.random.default_rng(3)
    index = VectorIndex(16, ann=small_config())
    for i in range(200):
        index.upsert(f"e{i}", unit(rng, 16))
    query = unit(rng, 16)
    assert len(await index.best_async(query, 1)) == 1  # starts a catch-up in the background
    ann = index._ann
    assert ann is not None
    task = ann._task
    assert task is not None
    index.clear()  # cancels it; the thread's result goes nowhere
    await asyncio.wait({task}, timeout=10)
    assert task.cancelled()
    assert index._ann is None
    assert await index.best_async(query, 1) == []
    await index.catch_up()  # nothing to do, returns at once


@needs_usearch
async def test_a_scope_that_shrinks_drops_its_graph_and_many_removals_rebuild_it() -> None:
    rng = np.random.default_rng(4)
    index = VectorIndex(8, ann=small_config(min_rows=40))
    for i in range(100):
        index.upsert(f"e{i}", unit(rng, 8))
    await index.catch_up()
    ann = index._ann
    assert ann is not None
    for _ in range(3):  # replacements: the graph fills with dead vectors
        for i in range(70):
            index.upsert(f"e{i}", unit(rng, 8))
        await index.catch_up()
    assert ann._graph_rows <= 2 * len(index) + 8  # rebuilt rather than grown without bound
    for i in range(85):
        index.remove(f"e{i}")
    assert index._ann is None  # 15 rows: below half of min_rows
    assert len(await index.best_async(unit(rng, 8), 1)) == 1


@needs_usearch
async def test_a_failing_catch_up_is_logged_once_and_lookups_stay_exact(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("graph exploded")

    monkeypatch.setattr(ann_module, "_write", broken)
    rng = np.random.default_rng(6)
    index = VectorIndex(8, ann=small_config())
    stored = {f"e{i}": unit(rng, 8) for i in range(100)}
    for entry_id, vector in stored.items():
        index.upsert(entry_id, vector)
    with caplog.at_level(logging.ERROR, logger="aiocache_llm.ann"):
        await index.catch_up()
        await index.catch_up()
    assert [r.message for r in caplog.records].count(
        "ANN catch-up failed; this scope is searched exactly from now on"
    ) == 1
    for entry_id, vector in list(stored.items())[:10]:
        assert [c.entry_id for c in await index.best_async(vector, 1)] == [entry_id]


async def test_build_index_is_a_no_op_without_ann() -> None:
    cache = MemorySemanticCache(lambda text: [1.0, 0.0], embed_in_thread=False)
    await cache.put("question", "answer")
    await cache.build_index()
    assert await cache.get("question again") == "answer"
    await cache.aclose()


# the ann and embed extras together


@pytest.mark.parametrize(
    "imports",
    ["import usearch.index; import onnxruntime", "import onnxruntime; import usearch.index"],
)
def test_the_ann_and_embed_extras_import_together_in_either_order(imports: str) -> None:
    # usearch 2.26.2+ with onnxruntime >= 1.24 dies with SIGSEGV when usearch comes first:
    # the pin in pyproject.toml must keep a process that uses both extras alive
    # find_spec, not importorskip: importing both here would kill the test run itself
    for extra in ("usearch", "onnxruntime"):
        if importlib.util.find_spec(extra) is None:
            pytest.skip(f"{extra} is not installed")
    done = subprocess.run(
        [sys.executable, "-c", imports], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{imports!r} exited with {done.returncode}: {done.stderr[-500:]}"
