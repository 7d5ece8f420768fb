"""MemorySemanticCache.get latency against the bare numpy floor, one scope, d=384.

Run: ``python -m benchmarks.semantic_probe`` (or ``python benchmarks/semantic_probe.py``).

For N entries in one scope, each with a random unit vector, it times:

* ``floor``: ``matrix @ q`` and ``argmax`` on a float32 matrix of the same data, the
  least any exact (brute-force) lookup can cost;
* ``get``: ``await cache.get(query)`` with an async ``embed_fn`` returning a
  precomputed vector (so no model time is included), threshold -1 so every lookup
  is a semantic hit that decodes a value;
* ``stall p99``: while 100 ``get`` calls run, another task that only yields
  records the gaps between its turns; their p99 is how long the loop is held per
  lookup. From ``N * d >= 2**22`` the matmul runs in a worker thread, so the loop
  stays free while it runs.

Prints one table row per N: median and p99 in microseconds.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiocache_llm import MemorySemanticCache

DIMENSION = 384
SIZES = (1_000, 10_000, 100_000)
LOOKUPS = {1_000: 2000, 10_000: 1000, 100_000: 200}


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e6, p99 * 1e6


def _unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    matrix = rng.standard_normal((n, DIMENSION)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


def _floor(matrix: np.ndarray, queries: np.ndarray) -> list[float]:
    samples = []
    for q in queries:
        start = time.perf_counter()
        int(np.argmax(matrix @ q))
        samples.append(time.perf_counter() - start)
    return samples


async def _cache_lookups(
    n: int, matrix: np.ndarray, queries: np.ndarray
) -> tuple[list[float], float]:
    table: dict[str, np.ndarray] = {f"entry {i}": matrix[i] for i in range(n)}
    table.update({f"query {i}": q for i, q in enumerate(queries)})

    async def embed(text: str) -> np.ndarray:
        return table[text]

    cache = MemorySemanticCache(embed, similarity_threshold=-1.0, max_size=0)
    for i in range(n):
        await cache.put(f"entry {i}", f"answer {i}")

    samples = []
    for i in range(len(queries)):
        start = time.perf_counter()
        value = await cache.get(f"query {i}")
        samples.append(time.perf_counter() - start)
        assert value is not None

    # a task that only yields measures the gaps between its turns: how long the loop
    # was held by anything else (measured apart from latency, since it competes for CPU)
    gaps: list[float] = []
    running = True

    async def ticker() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.ensure_future(ticker())
    for i in range(min(len(queries), 100)):
        await cache.get(f"query {i}")
        await asyncio.sleep(0)
    running = False
    await tick
    await cache.aclose()
    return samples, _percentiles(gaps)[1]


async def main() -> None:
    rng = np.random.default_rng(0)
    print(f"MemorySemanticCache.get vs numpy floor, one scope, d={DIMENSION} (microseconds)")
    print(
        f"{'N':>8} {'floor p50':>10} {'floor p99':>10} {'get p50':>10} {'get p99':>10} "
        f"{'overhead':>9} {'stall p99':>10}"
    )
    for n in SIZES:
        matrix = _unit_rows(rng, n)
        queries = _unit_rows(rng, LOOKUPS[n])
        floor_p50, floor_p99 = _percentiles(_floor(matrix, queries))
        samples, stall = await _cache_lookups(n, matrix, queries)
        get_p50, get_p99 = _percentiles(samples)
        print(
            f"{n:>8} {floor_p50:>10.0f} {floor_p99:>10.0f} {get_p50:>10.0f} {get_p99:>10.0f} "
            f"{get_p50 / floor_p50:>8.2f}x {stall:>10.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
