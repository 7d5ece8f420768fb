"""Scenario 4: a semantic lookup over N entries (d = 384) against the numpy brute-force floor.

Also, when the ``ann`` extra (usearch) is installed: the approximate (HNSW) lookup at
N = 100k, its p50 latency and its recall@1 against brute force.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from aiocache_llm import MemorySemanticCache
from aiocache_llm.backends.ann import AnnConfig, usearch_available
from benchmarks.harness import Measurement, Section, Target
from benchmarks.scenarios.common import Context

DIMENSION = 384
ANN_ROWS = 100_000
LATENT = 24
"""Dimensions of the latent space the ANN scenario's synthetic embeddings come from."""


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


def structured_rows(rng: np.random.Generator, mixing: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Synthetic sentence embeddings: latent points mixed into d dimensions, plus 10% noise.

    Real embeddings have a low intrinsic dimension (paraphrases are near, topics
    cluster); isotropic random vectors have none, which makes them the worst case
    for any graph index, and no model's output.
    """
    signal = points.astype(np.float32) @ mixing
    signal /= np.linalg.norm(signal, axis=1, keepdims=True)
    noise = rng.standard_normal(signal.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    rows = 0.95 * signal + 0.31 * noise
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float32)


def exact_answers(matrix: np.ndarray, queries: np.ndarray) -> list[int]:
    """The brute-force best row of each query."""
    return [int(i) for chunk in np.array_split(queries, 8) for i in (chunk @ matrix.T).argmax(1)]


async def ann_lookups(section: Section, ctx: Context) -> None:
    """The ANN row: p50 of ``get`` with ``ann=`` at N = 100k and its recall@1 vs brute force."""
    if not usearch_available():
        section.notes.append(
            "ANN lookup skipped: the `ann` extra is not installed "
            "(`pip install 'aiocache_llm[ann]'`)."
        )
        return
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((LATENT, DIMENSION)).astype(np.float32)
    points = rng.standard_normal((ANN_ROWS, LATENT)).astype(np.float32)
    matrix = structured_rows(rng, mixing, points)
    lookups = 300 if ctx.quick else 1000
    sources = rng.integers(0, ANN_ROWS, lookups)
    moved = points[sources] + 0.3 * rng.standard_normal((lookups, LATENT)).astype(np.float32)
    paraphrases = structured_rows(rng, mixing, moved)
    novel = structured_rows(rng, mixing, rng.standard_normal((lookups, LATENT)))
    table = {f"entry {i}": matrix[i] for i in range(ANN_ROWS)}
    table.update({f"paraphrase {i}": q for i, q in enumerate(paraphrases)})
    table.update({f"new {i}": q for i, q in enumerate(novel)})

    async def embed(text: str) -> np.ndarray:
        return table[text]

    config = AnnConfig(threads=0)
    cache = MemorySemanticCache(embed, similarity_threshold=-1.0, max_size=0, ann=config)
    for i in range(ANN_ROWS):
        await cache.put(f"entry {i}", i)
    started = time.perf_counter()
    await cache.build_index()
    build_seconds = time.perf_counter() - started
    found: dict[str, list[int]] = {"paraphrase": [], "new": []}
    gets: list[float] = []
    floors: list[float] = []
    for repeat in range(ctx.repeats):
        samples = []
        for kind in found:
            for i in range(lookups):
                begun = time.perf_counter()
                value = await cache.get(f"{kind} {i}")
                samples.append(time.perf_counter() - begun)
                if repeat == 0:
                    found[kind].append(value)
        gets.append(statistics.median(samples) * 1e3)
        floors.append(statistics.median(floor_seconds(matrix, paraphrases)) * 1e3)
    await cache.aclose()
    recall = {
        kind: float(np.mean(np.array(values) == exact_answers(matrix, queries)))
        for (kind, values), queries in zip(found.items(), (paraphrases, novel), strict=True)
    }
    rows = [
        Measurement("numpy floor (matrix @ q + argmax)", floors, "ms"),
        Measurement("aiocache_llm MemorySemanticCache.get, ann (HNSW)", gets, "ms"),
    ]
    section.add_table(
        f"N = {ANN_ROWS:,}, ANN (HNSW, usearch): median ms per lookup", rows, rows[0].name
    )
    p50 = statistics.median(gets)
    section.targets.append(Target(f"ANN get p50, N = {ANN_ROWS:,}", p50, 1.0, unit=" ms"))
    worst = min(recall, key=recall.__getitem__)
    section.targets.append(
        Target(
            f"ANN recall@1 vs brute force ({worst} queries, the worse set)",
            recall[worst],
            0.95,
            False,
            "",
        )
    )
    section.notes.append(
        f"ANN data: {ANN_ROWS:,} synthetic embeddings (a {LATENT}-dimensional latent point "
        "mixed into 384 dimensions, plus 10% isotropic noise). Queries: paraphrases "
        "(a stored entry's latent point moved a little; cosine ~0.87 to it) and new "
        "questions (fresh latent points; nearest entry ~0.7). recall@1 (the answer is brute "
        f"force's best row): paraphrases {recall['paraphrase']:.3f}, new questions "
        f"{recall['new']:.3f}; p50 over both. Graph build: {build_seconds:.1f} s with "
        f"{config.threads or 'all'} threads (`build_index()`); lookups search exactly until "
        "it is ready. Isotropic random vectors (no structure at all, unlike any model's "
        "output) are the worst case for a graph index: there recall is far lower."
    )


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
    await ann_lookups(section, ctx)
    return section
