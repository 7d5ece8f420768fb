"""Scenario 4: a semantic lookup over N entries (d = 384) against the numpy brute-force floor."""

from __future__ import annotations

import statistics
import time

import numpy as np

from aiocache_llm import MemorySemanticCache
from benchmarks.harness import Measurement, Section, Target
from benchmarks.scenarios.common import Context

DIMENSION = 384


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    matrix = rng.standard_normal((n, DIMENSION)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


def floor_seconds(matrix: np.ndarray, queries: np.ndarray) -> list[float]:
    """The least any exact lookup costs: one float32 matrix-vector product and argmax."""
    samples = []
    for q in queries:
        started = time.perf_counter()
        int(np.argmax(matrix @ q))
        samples.append(time.perf_counter() - started)
    return samples


async def cache_seconds(cache: MemorySemanticCache, count: int) -> list[float]:
    samples = []
    for i in range(count):
        started = time.perf_counter()
        value = await cache.get(f"query {i}")
        samples.append(time.perf_counter() - started)
        assert value is not None, "threshold -1: every lookup is a hit"
    return samples


async def run(ctx: Context) -> Section:
    rng = np.random.default_rng(0)
    sizes = (1_000, 10_000, 100_000)
    section = Section(
        f"4. Semantic lookup, one scope, d = {DIMENSION}",
        "`MemorySemanticCache.get` with an async embed function returning a precomputed "
        "vector (no model time), threshold -1 so every lookup is a hit that decodes its "
        "value, against the floor: `matrix @ q` + `argmax` on the same float32 matrix. "
        "From N x d >= 2**22 the search runs in a worker thread so the loop is never held.",
    )
    for n in sizes:
        matrix = unit_rows(rng, n)
        lookups = (200 if n >= 100_000 else 500) if ctx.quick else (500 if n >= 100_000 else 2000)
        queries = unit_rows(rng, lookups)
        table = {f"entry {i}": matrix[i] for i in range(n)}
        table.update({f"query {i}": q for i, q in enumerate(queries)})

        async def embed(text: str, table: dict[str, np.ndarray] = table) -> np.ndarray:
            return table[text]

        cache = MemorySemanticCache(embed, similarity_threshold=-1.0, max_size=0)
        for i in range(n):
            await cache.put(f"entry {i}", f"answer {i}")
        floors: list[float] = []
        gets: list[float] = []
        for _ in range(ctx.repeats):
            floors.append(statistics.median(floor_seconds(matrix, queries)) * 1e3)
            gets.append(statistics.median(await cache_seconds(cache, lookups)) * 1e3)
        await cache.aclose()
        rows = [
            Measurement("numpy floor (matrix @ q + argmax)", floors, "ms"),
            Measurement("aiocache_llm MemorySemanticCache.get", gets, "ms"),
        ]
        section.add_table(f"N = {n:,}: median ms per lookup", rows, rows[0].name)
        if n >= 10_000:
            ratio = statistics.median(gets) / statistics.median(floors)
            section.targets.append(Target(f"semantic get / numpy floor, N = {n:,}", ratio, 1.5))
    return section
