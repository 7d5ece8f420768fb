"""Vector plumbing shared by both semantic caches: validation, the embedder call, the index.

* :func:`as_unit_vector` turns whatever an ``embed_fn`` returned into a float32 unit
  vector or raises a clear :class:`InvalidInputError`/:class:`InvalidInputTypeError`.
* :class:`EmbeddingAdapter` calls a sync or async ``embed_fn`` without blocking the
  event loop and keeps every vector of one cache at one dimension.
* :class:`VectorIndex` holds the unit vectors of one scope as rows of a matrix and
  answers "which rows are most similar to q" with one matrix-vector product, or,
  for a large scope of a cache built with ``ann=``, by rescoring the candidates of
  an HNSW graph (:mod:`aiocache_llm.backends.ann`).

Similarities are float32 dot products of unit vectors, clipped to [-1, 1]. Rounding
makes the dot product of a vector with itself land a few ulps away from 1, so a
similarity within :data:`SIMILARITY_TOLERANCE` below a threshold counts as reaching it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import anyio.to_thread
import numpy as np
import numpy.typing as npt

from aiocache_llm.backends.ann import AnnConfig, AnnIndex
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import check_bool, check_callable, check_positive_int

__all__ = [
    "CANDIDATES",
    "OFFLOAD_MIN_FLOATS",
    "SIMILARITY_TOLERANCE",
    "Candidate",
    "EmbedFn",
    "EmbeddingAdapter",
    "FloatMatrix",
    "UnitVector",
    "VectorIndex",
    "as_unit_vector",
    "run_in_thread",
    "unit_rows",
]

UnitVector = npt.NDArray[np.float32]
FloatMatrix = npt.NDArray[np.float32]
EmbedFn = Callable[[str], Sequence[float] | npt.NDArray[Any] | Awaitable[Any]]
"""A sync or async callable ``text -> sequence of floats``."""

SIMILARITY_TOLERANCE = 1e-5
"""How far below a threshold a float32 similarity may round and still count as reaching it."""

OFFLOAD_MIN_FLOATS = 1 << 22
"""Rows x dimension from which a lookup runs in a worker thread (16 MB of float32, ~0.5 ms)."""

CANDIDATES = 4
"""How many best rows a lookup returns, so a stale or vanished best still leaves a hit."""

_INITIAL_CAPACITY = 16
_MIN_SQUARE = 1e-280  # below, a float64 sum of squares may have lost precision to underflow
_NUMERIC_KINDS = frozenset("iuf")
_T = TypeVar("_T")


def as_unit_vector(
    raw: object, dimension: int | None = None, *, what: str = "embedding"
) -> UnitVector:
    """Return ``raw`` (a sequence or 1-D array of real numbers) as a float32 unit vector.

    O(d). Raises :class:`InvalidInputTypeError` when ``raw`` is not numeric (a ``str``,
    ``None``, booleans, complex numbers, mixed objects) and :class:`InvalidInputError`
    when it is empty, not 1-D, ragged, of the wrong dimension, contains NaN or
    infinity, or is all zeros (it has no direction). The norm is computed after
    scaling by the largest magnitude, so huge or tiny finite values never overflow.
    """
    if type(raw) is np.ndarray:
        array: npt.NDArray[Any] = raw
    elif isinstance(raw, (str, bytes, bytearray)) or raw is None:
        raise InvalidInputTypeError(
            f"{what} must be a sequence of numbers, got {type(raw).__name__}"
        )
    else:
        try:
            array = np.asarray(raw)
        except ValueError as exc:  # ragged nested sequences
            raise InvalidInputError(f"{what} must be a flat sequence of numbers: {exc}") from exc
    if (
        array.dtype.kind == "f"
        and array.dtype.itemsize <= 8
        and array.ndim == 1
        and (dimension is None or array.shape[0] == dimension)
    ):
        # The common case, checked at once: the float64 sum of squares lies in this
        # range only if every value is finite and one is non-zero (NaN fails both
        # comparisons); for float32 values it never overflows or underflows. Empty,
        # zero, non-finite and extreme vectors take the full path below.
        values = array.astype(np.float64)
        if array.dtype.itemsize <= 4:
            square = float(values @ values)
        else:
            with np.errstate(over="ignore"):  # huge float64 values: the full path rescales
                square = float(values @ values)
        if _MIN_SQUARE < square < math.inf:
            values *= 1.0 / math.sqrt(square)
            return values.astype(np.float32)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInputTypeError(
            f"{what} must hold real numbers, got {type(raw).__name__} of dtype {array.dtype}"
        )
    if array.ndim != 1:
        raise InvalidInputError(f"{what} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise InvalidInputError(f"{what} is empty")
    if dimension is not None and array.size != dimension:
        raise InvalidInputError(
            f"{what} has dimension {array.size}, expected {dimension} "
            "(every vector of a cache must have the same dimension)"
        )
    values = array.astype(np.float64)
    scale = float(np.maximum(values.max(), -values.min()))  # NaN and inf show up here too
    if not math.isfinite(scale):
        raise InvalidInputError(f"{what} contains NaN or infinite values")
    if scale == 0.0:
        raise InvalidInputError(f"{what} is all zeros and has no direction")
    values /= scale
    values /= math.sqrt(float(values @ values))
    return values.astype(np.float32)


def unit_rows(matrix: FloatMatrix) -> npt.NDArray[np.bool_]:
    """Normalize the rows of ``matrix`` in place; return the mask of usable rows.

    Rows with NaN, infinity or only zeros are unusable (mask False) and left with
    meaningless values. Vectorized, and without any temporary of the matrix's size:
    a snapshot of a large scope may be hundreds of megabytes.
    """
    high = matrix.max(axis=1)  # NaN propagates through max/min, infinity shows as itself
    low = matrix.min(axis=1)
    scale = np.maximum(high, -low)
    usable: npt.NDArray[np.bool_] = np.isfinite(scale) & (scale > 0)
    scale[~usable] = 1
    matrix /= scale[:, None]
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    norms[~usable] = 1
    matrix /= norms[:, None]
    return usable


async def run_in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """Run ``func(*args)`` in a worker thread; on cancellation, stop waiting for it.

    Only used for work that touches no shared state after it returns (numpy on a
    snapshot, a user's embedder), so abandoning the thread is safe.
    """
    return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True)


def _is_async_callable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


class EmbeddingAdapter:
    """Calls a cache's ``embed_fn`` and holds the dimension every vector must have.

    An async ``embed_fn`` is awaited. A sync one runs in a worker thread by default,
    so a real model never blocks the event loop; overlapping calls then run in
    several threads at once, so a model that is not thread-safe needs its own lock.
    ``in_thread=False`` calls it inline, which is cheaper for embedders that take
    microseconds. The dimension is ``dimension=`` if given, else learned from the
    first vector stored.
    """

    __slots__ = ("_dimension", "_embed_fn", "_in_thread", "_is_async")

    def __init__(self, embed_fn: object, *, in_thread: bool, dimension: int | None) -> None:
        self._embed_fn = check_callable("embed_fn", embed_fn)
        self._in_thread = check_bool("embed_in_thread", in_thread)
        self._is_async = _is_async_callable(embed_fn)
        self._dimension = None if dimension is None else check_positive_int("dimension", dimension)

    def __repr__(self) -> str:
        name = getattr(self._embed_fn, "__qualname__", None) or type(self._embed_fn).__name__
        return f"{name}, dimension={self._dimension}"

    @property
    def dimension(self) -> int | None:
        """The dimension of every vector, or ``None`` until the first one is stored."""
        return self._dimension

    async def embed(self, text: str) -> UnitVector:
        """Return the unit embedding of ``text``, checked against the known dimension.

        Exceptions raised by ``embed_fn`` itself propagate unchanged.
        """
        if self._is_async:
            raw = await self._embed_fn(text)
        elif self._in_thread:
            raw = await run_in_thread(self._embed_fn, text)
        else:
            raw = self._embed_fn(text)
        # a sync wrapper (e.g. a partial) around a coroutine; the common array result
        # skips isawaitable's slow ABC check
        if type(raw) is not np.ndarray and inspect.isawaitable(raw):
            raw = await raw
        return as_unit_vector(raw, self._dimension)

    def check(self, vector: UnitVector) -> None:
        """Raise :class:`InvalidInputError` if ``vector`` has another dimension than the known one.

        A vector embedded while the dimension was still unknown is checked again,
        synchronously, right before it is used.
        """
        if self._dimension is not None and vector.shape[0] != self._dimension:
            as_unit_vector(vector, self._dimension)  # raises the standard message

    def adopt(self, vector: UnitVector) -> None:
        """Fix the dimension from a vector that was stored, if it is not known yet."""
        if self._dimension is None:
            self._dimension = int(vector.shape[0])


class Candidate(NamedTuple):
    """An entry of a :class:`VectorIndex` and its cosine similarity to a query."""

    entry_id: str
    similarity: float


def _similarities(
    matrix: FloatMatrix, query: UnitVector, expiry: npt.NDArray[np.float64] | None, now: float
) -> npt.NDArray[np.float32]:
    """``matrix @ query``, with ``-inf`` for the rows whose expiry is ``<= now``."""
    sims: npt.NDArray[np.float32] = matrix @ query
    if expiry is not None:
        sims[expiry <= now] = -np.inf
    return sims


def _top_rows(
    sims: npt.NDArray[np.float32], k: int, floor: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Rows of the ``k`` largest similarities >= ``floor`` and those similarities, best first."""
    n = sims.shape[0]
    if n > k:
        rows = np.argpartition(sims, n - k)[n - k :]
        rows = rows[np.argsort(-sims[rows], kind="stable")]
    else:
        rows = np.argsort(-sims, kind="stable")
    best = sims[rows]
    keep = best >= floor
    return rows[keep], best[keep]


def _search_best(
    matrix: FloatMatrix, query: UnitVector, expiry: npt.NDArray[np.float64] | None, now: float
) -> tuple[npt.NDArray[np.float32], int]:
    """The similarities of every row and the row of the largest (run in a worker thread)."""
    sims = _similarities(matrix, query, expiry, now)
    return sims, int(sims.argmax())


def _search_top(
    matrix: FloatMatrix,
    query: UnitVector,
    expiry: npt.NDArray[np.float64] | None,
    now: float,
    k: int,
    floor: float,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """:func:`_top_rows` of :func:`_similarities` (run in a worker thread)."""
    return _top_rows(_similarities(matrix, query, expiry, now), k, floor)


def _clip(similarity: float) -> float:
    return min(1.0, max(-1.0, similarity))


class VectorIndex:
    """The unit vectors of one scope: a matrix with a parallel id array and expiry array.

    Rows ``0..len-1`` of ``_matrix`` are live; ``_ids[r]`` names row ``r`` and
    ``_expiry[r]`` is its expiry time (``inf`` = never) on whatever clock the owner
    uses. Capacity doubles when full and halves when a quarter full, so ``upsert`` is
    amortized O(d); ``remove`` moves the last row into the hole (swap-remove), O(d).
    A lookup (:meth:`best`) is one vectorized ``matrix @ q`` plus an O(n) ``argmax``
    (or ``argpartition`` for several rows); no Python code runs per entry.

    Not thread-safe: only the event loop mutates it. :meth:`best_async` hands a
    read-only view to a worker thread for large indexes and re-checks the rows it
    picked when it is back on the loop.

    With ``ann=`` (an :class:`~aiocache_llm.backends.ann.AnnConfig`), an index of at
    least ``ann.min_rows`` rows also keeps an :class:`~aiocache_llm.backends.ann.AnnIndex`
    (an HNSW graph) that :meth:`best_async` asks for candidates instead of scoring
    every row (a graph search, about 0.3 ms at 100k rows, on the loop); the
    candidates' similarities, expiry and threshold are still checked exactly here.
    """

    __slots__ = (
        "_ann",
        "_ann_config",
        "_dimension",
        "_expiring",
        "_expiry",
        "_ids",
        "_matrix",
        "_offload",
        "_rows",
    )

    def __init__(
        self,
        dimension: int,
        *,
        offload_min_floats: int | None = None,
        ann: AnnConfig | None = None,
    ) -> None:
        self._dimension = check_positive_int("dimension", dimension)
        self._ann_config = ann
        self._ann: AnnIndex | None = None  # from ann.min_rows rows on
        self._offload = OFFLOAD_MIN_FLOATS if offload_min_floats is None else offload_min_floats
        self._matrix: FloatMatrix = np.empty((_INITIAL_CAPACITY, dimension), dtype=np.float32)
        self._expiry = np.full(_INITIAL_CAPACITY, np.inf)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._expiring = 0  # rows with a finite expiry; 0 lets lookups skip the mask

    @classmethod
    def from_rows(
        cls,
        ids: list[str],
        matrix: FloatMatrix,
        expiry: npt.NDArray[np.float64],
        *,
        offload_min_floats: int | None = None,
    ) -> VectorIndex:
        """Build an index that takes ownership of ``matrix`` (unit rows, float32, writable).

        ``ids`` must be distinct and match the rows; ``expiry`` holds one time per row.
        """
        index = cls(int(matrix.shape[1]), offload_min_floats=offload_min_floats)
        if ids:
            index._matrix = np.ascontiguousarray(matrix, dtype=np.float32)
            index._expiry = np.array(expiry, dtype=np.float64)
            index._ids = list(ids)
            index._rows = {entry_id: row for row, entry_id in enumerate(ids)}
            index._expiring = int(np.isfinite(index._expiry).sum())
        return index

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._rows

    def __repr__(self) -> str:
        return f"VectorIndex(dimension={self._dimension}, size={len(self._ids)})"

    @property
    def dimension(self) -> int:
        return self._dimension

    def vector(self, entry_id: str) -> UnitVector | None:
        """A copy of the stored vector of ``entry_id``, or ``None``."""
        row = self._rows.get(entry_id)
        return None if row is None else self._matrix[row].copy()

    def expiry(self, entry_id: str) -> float | None:
        """The expiry time of ``entry_id`` (``inf`` = never), or ``None`` if absent."""
        row = self._rows.get(entry_id)
        return None if row is None else float(self._expiry[row])

    def upsert(self, entry_id: str, vector: UnitVector, expires_at: float = math.inf) -> None:
        """Store (or replace) the unit ``vector`` of ``entry_id``; amortized O(d)."""
        if vector.shape != (self._dimension,):
            raise InvalidInputError(
                f"vector has shape {vector.shape}, expected ({self._dimension},)"
            )
        row = self._rows.get(entry_id)
        if row is None:
            row = len(self._ids)
            if row == self._matrix.shape[0]:
                self._resize(2 * row)
            self._ids.append(entry_id)
            self._rows[entry_id] = row
        elif math.isfinite(self._expiry[row]):
            self._expiring -= 1
        self._matrix[row] = vector
        self._expiry[row] = expires_at
        if math.isfinite(expires_at):
            self._expiring += 1
        if self._ann is not None:
            self._ann.upserted(entry_id, row)

    def remove(self, entry_id: str) -> bool:
        """Remove ``entry_id``; return whether it was there. O(d): the last row fills the hole."""
        row = self._rows.pop(entry_id, None)
        if row is None:
            return False
        if math.isfinite(self._expiry[row]):
            self._expiring -= 1
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._matrix[row] = self._matrix[last]
            self._expiry[row] = self._expiry[last]
            self._ids[row] = moved
            self._rows[moved] = row
            if self._ann is not None:
                self._ann.moved(moved, row)
        self._ids.pop()
        capacity = self._matrix.shape[0]
        if capacity > _INITIAL_CAPACITY and last <= capacity // 4:
            self._resize(capacity // 2)
        if self._ann is not None:
            self._ann.removed(entry_id)
            if self._ann_config is not None and last < self._ann_config.min_rows // 2:
                self._drop_ann()  # small again: exact search is fast, the graph's memory is not
        return True

    def clear(self) -> None:
        """Remove every row and give the memory back."""
        self._matrix = np.empty((_INITIAL_CAPACITY, self._dimension), dtype=np.float32)
        self._expiry = np.full(_INITIAL_CAPACITY, np.inf)
        self._ids.clear()
        self._rows.clear()
        self._expiring = 0
        self._drop_ann()

    def expired(self, now: float) -> list[str]:
        """Ids of the rows whose expiry is ``<= now``; O(n) vectorized."""
        if not self._expiring:
            return []
        rows = np.flatnonzero(self._expiry[: len(self._ids)] <= now)
        return [self._ids[row] for row in rows]

    def best(
        self,
        query: UnitVector,
        k: int = CANDIDATES,
        now: float = -math.inf,
        threshold: float = -1.0,
    ) -> list[Candidate]:
        """The ``k`` live rows most similar to the unit ``query`` that reach ``threshold``.

        Best first. A row is live while its expiry is ``> now``. One ``matrix @ q``
        (O(n*d), BLAS), then an ``argmax`` for ``k == 1`` or an ``argpartition``
        (O(n)); runs on the caller's thread.
        """
        n = len(self._ids)
        if n == 0:
            return []
        expiry = self._expiry[:n] if self._expiring else None
        sims = _similarities(self._matrix[:n], query, expiry, now)
        floor = threshold - SIMILARITY_TOLERANCE
        if k == 1:
            row = int(sims.argmax())
            similarity = float(sims[row])
            return [Candidate(self._ids[row], _clip(similarity))] if similarity >= floor else []
        rows, best = _top_rows(sims, k, floor)
        return [
            Candidate(self._ids[row], _clip(sim))
            for row, sim in zip(rows.tolist(), best.tolist(), strict=True)
        ]

    async def best_async(
        self,
        query: UnitVector,
        k: int = CANDIDATES,
        now: float = -math.inf,
        threshold: float = -1.0,
    ) -> list[Candidate]:
        """Like :meth:`best`, but a large index is searched in a worker thread.

        From ``len * dimension >= offload_min_floats`` on, the matmul would hold the
        loop for a millisecond or more, so it runs in a thread (numpy releases the
        GIL) on a view of the current rows. The loop may change rows meanwhile, so
        every row the thread picked is checked again on the loop: it must still
        exist, be live, and its own stored vector must still reach the threshold
        (O(d) each). For ``k == 1`` the thread picks the best row with an ``argmax``;
        only when that row fails the check are the next :data:`CANDIDATES` rows of
        the same search taken (in a thread again). For larger ``k`` the thread picks
        at least :data:`CANDIDATES` rows. Never is a wrong row returned.
        """
        n = len(self._ids)
        ann = self._ann_index(n)
        if ann is not None:
            ann.start(self._gather)
            if ann.usable:
                return self._rescore(ann.propose(query, k), query, k, now, threshold)
        if n * self._dimension < self._offload:
            return self.best(query, k, now, threshold)
        floor = threshold - SIMILARITY_TOLERANCE
        expiry = self._expiry[:n] if self._expiring else None
        if k == 1:
            sims, row = await run_in_thread(_search_best, self._matrix[:n], query, expiry, now)
            if not sims[row] >= floor:  # no row reached the threshold when the thread looked
                return []
            found = self._recheck([row], query, now, floor)
            if not found:  # the loop changed that row meanwhile: the runners-up may do
                rows, _ = await run_in_thread(_top_rows, sims, CANDIDATES, floor)
                found = self._recheck(rows.tolist(), query, now, floor)[:1]
            return found
        picks = max(k, CANDIDATES)
        rows, _ = await run_in_thread(
            _search_top, self._matrix[:n], query, expiry, now, picks, floor
        )
        return self._recheck(rows.tolist(), query, now, floor)[:k]

    async def catch_up(self) -> None:
        """Bring the ANN graph up to date with every row written so far, and wait for it.

        A no-op without ``ann=`` or below ``ann.min_rows`` rows. Lookups start
        catch-ups in the background by themselves; this is for warming a cache up
        (the first graph of a large scope takes seconds to build) and for tests.
        """
        ann = self._ann_index(len(self._ids))
        if ann is not None:
            await ann.wait(self._gather)

    def _ann_index(self, n: int) -> AnnIndex | None:
        config = self._ann_config
        if self._ann is None and config is not None and n >= config.min_rows:
            self._ann = AnnIndex(config, self._dimension, self._ids)
        return self._ann

    def _drop_ann(self) -> None:
        if self._ann is not None:
            self._ann.close()
            self._ann = None

    def _gather(self, rows: npt.NDArray[np.intp]) -> FloatMatrix:
        return self._matrix[rows]  # fancy indexing: a copy a worker thread may keep

    def _rescore(
        self, rows: npt.NDArray[np.intp], query: UnitVector, k: int, now: float, threshold: float
    ) -> list[Candidate]:
        """The ``k`` best of ``rows`` (live rows) by their exact similarity to ``query``."""
        if not rows.size:
            return []
        expiry = self._expiry[rows] if self._expiring else None
        sims = _similarities(self._matrix[rows], query, expiry, now)
        picks, best = _top_rows(sims, k, threshold - SIMILARITY_TOLERANCE)
        return [
            Candidate(self._ids[row], _clip(sim))
            for row, sim in zip(rows[picks].tolist(), best.tolist(), strict=True)
        ]

    def _recheck(
        self, rows: list[int], query: UnitVector, now: float, floor: float
    ) -> list[Candidate]:
        found: list[Candidate] = []
        for row in rows:
            if row >= len(self._ids) or self._expiry[row] <= now:
                continue
            similarity = float(self._matrix[row] @ query)
            if similarity >= floor:
                found.append(Candidate(self._ids[row], _clip(similarity)))
        found.sort(key=lambda candidate: candidate.similarity, reverse=True)
        return found

    def _resize(self, capacity: int) -> None:
        n = len(self._ids)
        matrix = np.empty((capacity, self._dimension), dtype=np.float32)
        matrix[:n] = self._matrix[:n]
        expiry = np.full(capacity, np.inf)
        expiry[:n] = self._expiry[:n]
        # a fresh array, never an in-place resize: a worker thread may still read the old one
        self._matrix = matrix
        self._expiry = expiry
