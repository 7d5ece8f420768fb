"""The shared vector plumbing: validation, the embedder adapter and the per-scope index."""

from __future__ import annotations

import asyncio
import functools
import math
import random
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiocache_llm import InvalidInputError, InvalidInputTypeError
from aiocache_llm.backends import vectors
from aiocache_llm.backends.vectors import (
    SIMILARITY_TOLERANCE,
    EmbeddingAdapter,
    VectorIndex,
    as_unit_vector,
    unit_rows,
)

# as_unit_vector


@pytest.mark.parametrize(
    "raw",
    [[3, 4], (3.0, 4.0), np.array([3, 4], dtype=np.int8), np.array([3, 4], dtype=np.float16)],
    ids=["int-list", "float-tuple", "int8-array", "float16-array"],
)
def test_numbers_become_a_float32_unit_vector(raw: Any) -> None:
    vector = as_unit_vector(raw, 2)
    assert vector.dtype == np.float32
    assert vector.shape == (2,)
    assert vector.tolist() == pytest.approx([0.6, 0.8])


@pytest.mark.parametrize("magnitude", [1e300, 1e-300, 3e38, 1e-45])
def test_huge_and_tiny_values_normalize_without_overflow(magnitude: float) -> None:
    vector = as_unit_vector([magnitude, magnitude], 2)
    assert vector.tolist() == pytest.approx([math.sqrt(0.5)] * 2)


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        ([1.0, float("nan"), 0.0], InvalidInputError, "NaN or infinite"),
        ([1.0, float("-inf"), 0.0], InvalidInputError, "NaN or infinite"),
        ([0.0, 0.0, 0.0], InvalidInputError, "all zeros"),
        ([], InvalidInputError, "is empty"),
        ([[1.0, 2.0]], InvalidInputError, "must be 1-D"),
        (np.float64(1.0), InvalidInputError, "must be 1-D"),
        ([[1.0], [2.0, 3.0]], InvalidInputError, "flat sequence"),
        ([1.0, 2.0], InvalidInputError, "dimension 2, expected 3"),
        ("1 2 3", InvalidInputTypeError, "sequence of numbers, got str"),
        (b"\x00\x00", InvalidInputTypeError, "sequence of numbers, got bytes"),
        (None, InvalidInputTypeError, "sequence of numbers, got NoneType"),
        (["1", "2", "3"], InvalidInputTypeError, "real numbers"),
        ([True, False, True], InvalidInputTypeError, "real numbers"),
        ([1j, 2, 3], InvalidInputTypeError, "real numbers"),
        ([1.0, None, 2.0], InvalidInputTypeError, "real numbers"),
        ({"a": 1.0}, InvalidInputTypeError, "real numbers"),
    ],
    ids=[
        "nan", "inf", "zero", "empty", "2-d", "scalar", "ragged", "dimension",
        "str", "bytes", "none", "numeric-strings", "bools", "complex", "holes", "dict",
    ],
)  # fmt: skip
def test_bad_embeddings_are_refused_with_a_clear_message(
    raw: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        as_unit_vector(raw, 3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, float("nan"), 0.0], "NaN or infinite"),
        ([float("inf"), 1.0, 0.0], "NaN or infinite"),
        ([0.0, 0.0, 0.0], "all zeros"),
        ([1.0, 2.0], "dimension 2, expected 3"),
    ],
    ids=["nan", "inf", "zero", "dimension"],
)
def test_float_arrays_of_every_width_are_checked(
    dtype: type[np.floating[Any]], values: list[float], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        as_unit_vector(np.array(values, dtype=dtype), 3)


BIG = float(np.float32(1e30))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.floats(-BIG, BIG, allow_nan=False, width=32), min_size=1, max_size=64
    ).filter(any),
    width=st.sampled_from([np.float32, np.float64]),
)
def test_unit_vectors_point_the_same_way_as_the_input(
    values: list[float], width: type[np.floating[Any]]
) -> None:
    raw = np.array(values, dtype=width)
    vector = as_unit_vector(raw, len(values))
    reference = raw.astype(np.float64) / np.linalg.norm(raw.astype(np.float64))
    assert vector.dtype == np.float32
    assert float(np.linalg.norm(vector.astype(np.float64))) == pytest.approx(1.0, abs=1e-6)
    assert vector.astype(np.float64) == pytest.approx(reference, abs=1e-6)


def test_the_message_names_what_is_validated() -> None:
    with pytest.raises(InvalidInputError, match=r"^query vector is empty"):
        as_unit_vector([], what="query vector")


def test_unit_rows_normalizes_good_rows_and_flags_bad_ones() -> None:
    matrix = np.array(
        [[3, 4], [np.nan, 1], [np.inf, 1], [0, 0], [-1e30, 1e30], [1e-40, 0]], dtype=np.float32
    )
    usable = unit_rows(matrix)
    assert usable.tolist() == [True, False, False, False, True, True]
    assert matrix[0].tolist() == pytest.approx([0.6, 0.8])
    assert matrix[4].tolist() == pytest.approx([-math.sqrt(0.5), math.sqrt(0.5)])
    assert matrix[5].tolist() == pytest.approx([1.0, 0.0])


# EmbeddingAdapter


async def test_adapter_awaits_async_embedders_on_the_loop() -> None:
    threads: list[int] = []

    async def embed(text: str) -> list[float]:
        threads.append(threading.get_ident())
        return [1.0, 1.0]

    adapter = EmbeddingAdapter(embed, in_thread=True, dimension=None)
    assert (await adapter.embed("x")).tolist() == pytest.approx([math.sqrt(0.5)] * 2)
    assert threads == [threading.get_ident()]


async def test_adapter_recognizes_objects_and_partials_of_coroutine_functions() -> None:
    class Model:
        async def __call__(self, text: str, scale: float = 1.0) -> list[float]:
            return [scale, 0.0]

    async def embed(text: str, scale: float) -> list[float]:
        return [0.0, scale]

    for fn in (Model(), functools.partial(embed, scale=2.0), lambda text: embed(text, 1.0)):
        adapter = EmbeddingAdapter(fn, in_thread=True, dimension=2)
        assert (await adapter.embed("x")).shape == (2,)


@pytest.mark.parametrize("in_thread", [True, False])
async def test_adapter_runs_sync_embedders_in_a_thread_or_inline(in_thread: bool) -> None:
    threads: list[int] = []

    def embed(text: str) -> list[float]:
        threads.append(threading.get_ident())
        return [1.0, 0.0]

    adapter = EmbeddingAdapter(embed, in_thread=in_thread, dimension=None)
    await adapter.embed("x")
    assert (threads == [threading.get_ident()]) is not in_thread


async def test_a_slow_embedder_in_a_thread_does_not_block_the_loop() -> None:
    release = threading.Event()

    def slow(text: str) -> list[float]:
        release.wait(5)
        return [1.0]

    adapter = EmbeddingAdapter(slow, in_thread=True, dimension=None)
    task = asyncio.ensure_future(adapter.embed("x"))
    await asyncio.sleep(0.01)
    assert not task.done()  # the loop is free while the embedder works
    release.set()
    assert (await task).tolist() == [1.0]


async def test_adapter_learns_the_dimension_from_the_first_vector_stored() -> None:
    table = {"two": [1.0, 0.0], "three": [1.0, 0.0, 0.0]}
    adapter = EmbeddingAdapter(table.__getitem__, in_thread=False, dimension=None)
    three = await adapter.embed("three")
    assert adapter.dimension is None  # embedding alone fixes nothing
    adapter.check(three)
    adapter.adopt(three)
    assert adapter.dimension == 3
    with pytest.raises(InvalidInputError, match="dimension 2, expected 3"):
        await adapter.embed("two")
    with pytest.raises(InvalidInputError, match="dimension 2, expected 3"):
        adapter.check(np.array([1.0, 0.0], dtype=np.float32))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"embed_fn": 42}, InvalidInputTypeError),
        ({"in_thread": 1}, InvalidInputTypeError),
        ({"dimension": 0}, InvalidInputError),
        ({"dimension": 2.0}, InvalidInputTypeError),
    ],
)
def test_adapter_validates_its_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    arguments: dict[str, Any] = {"embed_fn": len, "in_thread": True, "dimension": None, **kwargs}
    embed_fn = arguments.pop("embed_fn")
    with pytest.raises(error):
        EmbeddingAdapter(embed_fn, **arguments)


# VectorIndex


def unit(rng: np.random.Generator, dimension: int) -> np.ndarray:
    return as_unit_vector(rng.standard_normal(dimension))


def brute_force(
    stored: dict[str, tuple[np.ndarray, float]],
    query: np.ndarray,
    k: int,
    now: float,
    threshold: float,
) -> list[tuple[str, float]]:
    """The reference answer: every live entry scored in Python, sorted."""
    scored = [
        (entry_id, float(np.dot(vector.astype(np.float64), query.astype(np.float64))))
        for entry_id, (vector, expires_at) in stored.items()
        if expires_at > now
    ]
    scored = [s for s in scored if s[1] >= threshold - SIMILARITY_TOLERANCE]
    scored.sort(key=lambda s: s[1], reverse=True)
    return scored[:k]


def assert_same_answer(got: list[vectors.Candidate], expected: list[tuple[str, float]]) -> None:
    assert [c.similarity for c in got] == pytest.approx([s for _, s in expected], abs=1e-5)
    # ids may differ only where similarities tie
    for candidate, (entry_id, similarity) in zip(got, expected, strict=True):
        assert candidate.entry_id == entry_id or math.isclose(
            candidate.similarity, similarity, abs_tol=1e-5
        )


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), operations=st.integers(1, 300))
def test_index_matches_brute_force_under_random_upserts_and_removes(
    seed: int, operations: int
) -> None:
    rng = np.random.default_rng(seed)
    dimension = int(rng.integers(1, 9))
    index = VectorIndex(dimension)
    stored: dict[str, tuple[np.ndarray, float]] = {}
    for step in range(operations):
        entry_id = f"e{int(rng.integers(0, 40))}"
        roll = rng.random()
        if roll < 0.55:
            expires_at = math.inf if rng.random() < 0.5 else float(rng.integers(0, 100))
            vector = unit(rng, dimension)
            index.upsert(entry_id, vector, expires_at)
            stored[entry_id] = (vector, expires_at)
        elif roll < 0.9:
            assert index.remove(entry_id) is (stored.pop(entry_id, None) is not None)
        else:
            index.clear()
            stored.clear()
        assert len(index) == len(stored)
        if step % 7 == 0 or step == operations - 1:
            query = unit(rng, dimension)
            now = float(rng.integers(0, 100))
            k = int(rng.integers(1, 6))
            threshold = float(rng.uniform(-1, 1))
            got = index.best(query, k, now, threshold)
            assert_same_answer(got, brute_force(stored, query, k, now, threshold))
    for entry_id, (vector, expires_at) in stored.items():
        assert entry_id in index
        assert index.vector(entry_id) == pytest.approx(vector)
        assert index.expiry(entry_id) == expires_at
    assert sorted(index.expired(50.0)) == sorted(e for e, (_, x) in stored.items() if x <= 50.0)


def test_capacity_grows_and_shrinks_without_losing_rows() -> None:
    rng = np.random.default_rng(7)
    index = VectorIndex(3)
    stored = {f"e{i}": unit(rng, 3) for i in range(1000)}
    for entry_id, vector in stored.items():
        index.upsert(entry_id, vector)
    assert index._matrix.shape[0] >= 1000
    for i in range(990):
        assert index.remove(f"e{i}")
        del stored[f"e{i}"]
    assert index._matrix.shape[0] <= 64  # memory came back
    for entry_id, vector in stored.items():
        assert index.best(vector, 1)[0].entry_id == entry_id


def test_best_orders_filters_by_threshold_and_masks_expired_rows() -> None:
    index = VectorIndex(2)
    index.upsert("exact", as_unit_vector([1, 0]), expires_at=10.0)
    index.upsert("near", as_unit_vector([0.96, 0.28]))
    index.upsert("far", as_unit_vector([0.6, 0.8]))
    index.upsert("opposite", as_unit_vector([-1, 0]))
    query = as_unit_vector([1, 0])
    assert [c.entry_id for c in index.best(query, 10, now=0.0)] == [
        "exact",
        "near",
        "far",
        "opposite",
    ]
    assert [c.entry_id for c in index.best(query, 2, now=0.0)] == ["exact", "near"]
    assert [c.entry_id for c in index.best(query, 10, now=10.0, threshold=0.6)] == ["near", "far"]
    best = index.best(query, 1, now=0.0, threshold=1.0)
    assert best[0].entry_id == "exact"
    assert best[0].similarity == 1.0  # clipped, never 1.0000001
    assert index.best(query, 10, now=0.0, threshold=0.97)[-1].entry_id == "exact"
    assert index.best(query, 10, now=10.0, threshold=0.97) == []
    assert index.best(query, 10, now=0.0, threshold=-1.0)[-1].similarity == -1.0


def test_upsert_refuses_a_vector_of_another_shape() -> None:
    index = VectorIndex(3)
    with pytest.raises(InvalidInputError, match="expected \\(3,\\)"):
        index.upsert("x", as_unit_vector([1, 0]))
    assert len(index) == 0


# best_async: the worker-thread path


async def test_offloaded_lookup_gives_the_same_answer() -> None:
    rng = np.random.default_rng(3)
    small = VectorIndex(16, offload_min_floats=1)
    for i in range(200):
        small.upsert(f"e{i}", unit(rng, 16), expires_at=float(i))
    query = unit(rng, 16)
    expected = small.best(query, 4, now=50.0, threshold=-1.0)
    assert await small.best_async(query, 4, now=50.0, threshold=-1.0) == expected


@pytest.fixture
def mutate_while_searching(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], None]], None]:
    """Make offloaded searches run ``mutation`` after the thread and before the lookup resumes."""

    def install(mutation: Callable[[], None]) -> None:
        original = vectors.run_in_thread

        async def racing(func: Callable[..., Any], *args: Any) -> Any:
            # the thread has searched the rows as they were; the loop changes them
            # before the lookup resumes, so the rows it picked may be stale
            result = await original(func, *args)
            mutation()
            return result

        monkeypatch.setattr(vectors, "run_in_thread", racing)

    return install


def _index_with_best_first(offload: int = 1) -> tuple[VectorIndex, np.ndarray]:
    index = VectorIndex(2, offload_min_floats=offload)
    index.upsert("best", as_unit_vector([1, 0]))
    index.upsert("second", as_unit_vector([0.96, 0.28]))
    index.upsert("unrelated", as_unit_vector([0, 1]))
    return index, as_unit_vector([1, 0])


@pytest.mark.parametrize("k", [1, 4])
async def test_a_row_removed_during_an_offloaded_search_is_never_returned(
    mutate_while_searching: Callable[[Callable[[], None]], None], k: int
) -> None:
    index, query = _index_with_best_first()
    mutate_while_searching(lambda: index.remove("best"))
    found = await index.best_async(query, k, threshold=0.9)
    assert [c.entry_id for c in found] == ["second"]


@pytest.mark.parametrize("k", [1, 4])
async def test_a_row_rewritten_during_an_offloaded_search_is_checked_again(
    mutate_while_searching: Callable[[Callable[[], None]], None], k: int
) -> None:
    index, query = _index_with_best_first()
    mutate_while_searching(lambda: index.upsert("best", as_unit_vector([0, 1])))
    found = await index.best_async(query, k, threshold=0.9)
    assert [c.entry_id for c in found] == ["second"]


@pytest.mark.parametrize("k", [1, 4])
async def test_a_row_expired_during_an_offloaded_search_is_masked(
    mutate_while_searching: Callable[[Callable[[], None]], None], k: int
) -> None:
    index, query = _index_with_best_first()
    mutate_while_searching(lambda: index.upsert("best", as_unit_vector([1, 0]), expires_at=5.0))
    found = await index.best_async(query, k, now=6.0, threshold=0.9)
    assert [c.entry_id for c in found] == ["second"]


@pytest.mark.parametrize("k", [1, 4])
async def test_an_index_cleared_during_an_offloaded_search_returns_nothing(
    mutate_while_searching: Callable[[Callable[[], None]], None], k: int
) -> None:
    index, query = _index_with_best_first()
    mutate_while_searching(index.clear)
    assert await index.best_async(query, k, threshold=0.9) == []


async def test_an_offloaded_best_row_search_runs_one_thread_call_unless_the_row_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index, query = _index_with_best_first()
    calls: list[str] = []
    original = vectors.run_in_thread

    async def spy(func: Callable[..., Any], *args: Any) -> Any:
        calls.append(func.__name__)
        return await original(func, *args)

    monkeypatch.setattr(vectors, "run_in_thread", spy)
    assert [c.entry_id for c in await index.best_async(query, 1, threshold=0.9)] == ["best"]
    assert len(calls) == 1
    assert await index.best_async(query, 1, threshold=1.0 + 1e-3) == []  # a miss: one call too
    assert len(calls) == 2
    assert [c.entry_id for c in await index.best_async(as_unit_vector([0, 1]), 1)] == ["unrelated"]
    assert len(calls) == 3


async def test_small_indexes_are_searched_on_the_loop(
    mutate_while_searching: Callable[[Callable[[], None]], None],
) -> None:
    index, query = _index_with_best_first(offload=1 << 22)
    mutate_while_searching(lambda: pytest.fail("a small index was searched in a thread"))
    assert [c.entry_id for c in await index.best_async(query, 1)] == ["best"]


def test_random_swap_removes_keep_ids_and_rows_paired() -> None:
    rng = random.Random(11)
    index = VectorIndex(4)
    ids = [f"e{i}" for i in range(64)]
    for i, entry_id in enumerate(ids):
        vector = np.zeros(4, dtype=np.float32)
        vector[i % 4] = 1.0 if i < 32 else -1.0
        index.upsert(entry_id, vector)
    rng.shuffle(ids)
    for entry_id in ids[:40]:
        index.remove(entry_id)
    for entry_id in ids[40:]:
        i = int(entry_id[1:])
        stored = index.vector(entry_id)
        assert stored is not None
        assert stored[i % 4] == (1.0 if i < 32 else -1.0)
