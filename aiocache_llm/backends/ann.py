"""Optional approximate nearest-neighbour search for large scopes (the ``aiocache_llm[ann]`` extra).

Brute force, one ``matrix @ q``, costs O(n*d): about 7 ms per lookup at 100k rows
of 384 floats. An :class:`AnnIndex` keeps an HNSW graph (``usearch``) over the rows
of one :class:`~aiocache_llm.backends.vectors.VectorIndex` and proposes a few dozen
candidate rows in well under a millisecond. The vector index then recomputes their
exact cosine from its own stored vectors, so whatever a lookup returns is scored,
thresholded and expiry-checked exactly as by brute force; what an approximate
search can do is miss the best row (recall below 1), and then answer with the best
candidate it found, or miss.

The graph is an index *of* the vector index, never the truth: every write goes to
the vector index at once and reaches the graph later, in batches, in a worker
thread (a *catch-up*). Rows written since the last catch-up (*pending*) are scored
exactly at every lookup, so a put is visible to the very next ``get``. Removed and
replaced vectors stay in the graph until the next catch-up removes them; a
proposal whose label no longer names a live vector is dropped. While a catch-up
runs in its thread the graph is not searched (usearch must not be read while it is
written): lookups fall back to brute force, which is exact.

Importing this module does not import ``usearch``; :func:`resolve_ann` (called by a
cache's constructor) raises :class:`ImportError` naming the extra when it is absent.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread
import numpy as np
import numpy.typing as npt

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import check_positive_int

__all__ = ["AnnConfig", "AnnIndex", "AnnSetting", "resolve_ann", "usearch_available"]

logger = logging.getLogger("aiocache_llm.ann")

CATCH_UP_BATCH = 4096
"""Vectors added to the graph per worker-thread call; the loop gathers each batch in ~1 ms."""

_EXTRA_HINT = "pip install 'aiocache_llm[ann]'"


@dataclass(frozen=True)
class AnnConfig:
    """When and how a ``MemorySemanticCache`` searches large scopes approximately.

    * ``min_rows``: a scope gets a graph from this many rows on (and drops it below
      half as many); smaller scopes are searched exactly, which is fast enough.
    * ``candidates``: rows the graph proposes per lookup; their exact cosine is
      recomputed and the best that reaches the threshold is the answer.
    * ``connectivity``: edges per node (HNSW's M): more means better recall, more
      memory and slower catch-ups.
    * ``expansion_add`` / ``expansion_search``: search depth while adding a vector
      (efConstruction) and per lookup (ef, raised to ``candidates`` if lower): more
      means better recall and slower calls.
    * ``catch_up_at``: vectors written (or removed) since the last catch-up that
      start the next one; until then they are scored exactly at every lookup.
    * ``threads``: threads a catch-up uses (0 = one per core). One leaves the other
      cores to the application; more build a large graph faster.
    * ``dtype``: how the graph stores its copy of the vectors: ``"i8"`` (a byte per
      dimension), ``"f16"`` or ``"f32"``. Smaller is faster (a graph search is
      bound by memory latency) and, as the candidates are rescored from the float32
      rows anyway, costs little recall.

    Memory at the defaults: about 0.85 KiB per 384-d row for the graph, on top of
    the 1.5 KiB the vector index holds (``"f32"``: about 2.9 KiB).
    """

    min_rows: int = 20_000
    candidates: int = 32
    connectivity: int = 16
    expansion_add: int = 64
    expansion_search: int = 64
    catch_up_at: int = 256
    threads: int = 1
    dtype: Literal["i8", "f16", "f32"] = "i8"

    def __post_init__(self) -> None:
        for name in (
            "min_rows",
            "candidates",
            "connectivity",
            "expansion_add",
            "expansion_search",
            "catch_up_at",
        ):
            check_positive_int(name, getattr(self, name))
        if type(self.threads) is not int:
            raise InvalidInputTypeError(
                f"threads must be an int, got {type(self.threads).__name__}"
            )
        if self.threads < 0:
            raise InvalidInputError(f"threads must be >= 0, got {self.threads}")
        if self.dtype not in ("i8", "f16", "f32"):
            raise InvalidInputError(f"dtype must be 'i8', 'f16' or 'f32', got {self.dtype!r}")


AnnSetting = Literal["auto"] | AnnConfig | None
"""What a cache's ``ann=`` accepts: ``None`` (exact search only), ``"auto"`` or an AnnConfig."""


def resolve_ann(ann: object) -> AnnConfig | None:
    """Return the :class:`AnnConfig` a cache's ``ann=`` argument asks for, or ``None``.

    ``None`` means exact search only; ``"auto"`` means ``AnnConfig()``. Raises
    :class:`InvalidInputTypeError`/:class:`InvalidInputError` for anything else and
    :class:`ImportError` (naming the extra) when ANN is asked for without ``usearch``.
    """
    if ann is None:
        return None
    if isinstance(ann, str):
        if ann != "auto":
            raise InvalidInputError(f"ann must be None, 'auto' or an AnnConfig, got {ann!r}")
        config = AnnConfig()
    elif isinstance(ann, AnnConfig):
        config = ann
    else:
        raise InvalidInputTypeError(
            f"ann must be None, 'auto' or an AnnConfig, got {type(ann).__name__}"
        )
    _usearch_index_class()
    return config


def usearch_available() -> bool:
    """Whether the ``ann`` extra (usearch) can be imported."""
    try:
        _usearch_index_class()
    except ImportError:
        return False
    return True


def _usearch_index_class() -> Any:
    try:
        module = importlib.import_module("usearch.index")
    except ImportError as exc:
        raise ImportError(
            f"ann= needs the usearch package (the 'ann' extra): {_EXTRA_HINT}"
        ) from exc
    return module.Index


Gather = Callable[[npt.NDArray[np.intp]], npt.NDArray[np.float32]]
"""Returns a copy of the vectors in the given rows of the vector index."""


class AnnIndex:
    """The HNSW graph of one vector index, kept in step with it by catch-ups.

    Every vector gets a fresh integer *label* when it is written, so a replaced
    vector's old label can never be mistaken for the new one; an array maps each
    label to the row of the vector index that holds it (-1 once it is dead), so a
    lookup turns the graph's answer into rows with one numpy gather. The hooks
    (``upserted``, ``moved``, ``removed``) are O(1) and run on the loop; the graph
    is only read on the loop (:meth:`propose`) and only written in a worker thread
    by the catch-up task, never both at once. Not thread-safe otherwise.

    When dead vectors outnumber live ones in the graph (or labels run far ahead of
    the rows), a catch-up relabels every row and builds a fresh graph. A catch-up
    that fails (which usearch should never do) disables the graph: the error is
    logged once and the vector index searches exactly from then on.
    """

    __slots__ = (
        "_busy",
        "_config",
        "_dimension",
        "_graph",
        "_graph_rows",
        "_label_rows",
        "_labels",
        "_next_label",
        "_pending",
        "_stale",
        "_stopped",
        "_task",
    )

    def __init__(self, config: AnnConfig, dimension: int, entry_ids: Iterable[str]) -> None:
        self._config = config
        self._dimension = dimension
        self._graph: Any = None  # a usearch Index once the first batch is in
        self._graph_rows = 0  # labels the graph holds, removed ones included
        self._labels: dict[str, int] = {}  # entry -> label of its current vector
        self._label_rows = np.full(1024, -1, dtype=np.intp)  # label -> row, -1 = dead
        self._next_label = 0
        self._pending: dict[str, None] = {}  # entries whose current vector is not in the graph
        self._stale: list[int] = []  # labels in the graph (or on their way) of dead vectors
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a worker thread is writing the graph
        self._stopped = False  # closed, or a catch-up failed: exact search only
        for row, entry_id in enumerate(entry_ids):
            self.upserted(entry_id, row)

    def __repr__(self) -> str:
        return (
            f"AnnIndex(rows={len(self._labels)}, in_graph={self._graph_rows}, "
            f"pending={len(self._pending)}, stale={len(self._stale)}, busy={self._busy})"
        )

    @property
    def usable(self) -> bool:
        """Whether a lookup may search the graph now: built, not being written, caught up enough."""
        return (
            self._graph is not None
            and not self._busy
            and not self._stopped
            and len(self._pending) <= 4 * self._config.catch_up_at
        )

    @property
    def behind(self) -> bool:
        """Whether enough has changed since the last catch-up to start the next one."""
        if self._stopped:
            return False
        if self._graph is None:
            return bool(self._pending)
        return max(len(self._pending), len(self._stale)) >= self._config.catch_up_at

    def upserted(self, entry_id: str, row: int) -> None:
        """Record that ``entry_id`` (in ``row``) got a new vector, pending until a catch-up."""
        self._forget(entry_id)
        label = self._next_label
        self._next_label += 1
        if label == self._label_rows.shape[0]:
            grown = np.full(2 * label, -1, dtype=np.intp)
            grown[:label] = self._label_rows
            self._label_rows = grown
        self._label_rows[label] = row
        self._labels[entry_id] = label
        self._pending[entry_id] = None

    def moved(self, entry_id: str, row: int) -> None:
        """Record that the vector of ``entry_id`` now lives in ``row``."""
        self._label_rows[self._labels[entry_id]] = row

    def removed(self, entry_id: str) -> None:
        """Record that ``entry_id`` is gone; the graph drops its vector at the next catch-up."""
        self._forget(entry_id)

    def _forget(self, entry_id: str) -> None:
        label = self._labels.pop(entry_id, None)
        if label is None:
            return
        self._label_rows[label] = -1
        if entry_id in self._pending:
            del self._pending[entry_id]  # its vector never reached the graph
        else:
            self._stale.append(label)  # in the graph, or in a batch on its way there

    def propose(self, query: npt.NDArray[np.float32], count: int) -> npt.NDArray[np.intp]:
        """Rows to score exactly: the graph's nearest ``count`` live ones, then the pending ones.

        Only while :attr:`usable`; a graph search (about O(log n) hops) plus O(pending).
        """
        matches = self._graph.search(query, max(count, self._config.candidates), threads=1)
        rows: npt.NDArray[np.intp] = self._label_rows[matches.keys.astype(np.intp)]
        rows = rows[rows >= 0]
        if self._pending:
            labels = [self._labels[entry_id] for entry_id in self._pending]
            rows = np.concatenate((rows, self._label_rows[labels]))
        return rows

    def _forget_other_loops(self) -> None:
        # a catch-up started by an event loop that has ended will never finish here
        if self._task is not None and self._task.get_loop() is not asyncio.get_running_loop():
            self._task = None

    def start(self, gather: Gather) -> None:
        """Start a catch-up in the background if one is due and none runs."""
        self._forget_other_loops()
        if self.behind and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._catch_up(gather))

    async def wait(self, gather: Gather) -> None:
        """Catch up now (everything written so far reaches the graph) and wait for it.

        Cancelling the caller does not cancel the catch-up.
        """
        self._forget_other_loops()
        while not self._stopped and (self._pending or self._stale):
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._catch_up(gather))
            # wait() rather than shield(): a catch-up cancelled by close() is no error here
            await asyncio.wait({self._task})

    def close(self) -> None:
        """Stop for good; a batch already in a worker thread finishes into a discarded graph."""
        self._stopped = True
        self._graph = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _catch_up(self, gather: Gather) -> None:
        try:
            while not self._stopped and (self._pending or self._stale):
                live = len(self._labels)
                slack = self._config.catch_up_at
                if self._graph_rows > 2 * live + slack or self._next_label > 4 * live + slack:
                    self._restart()  # mostly dead vectors: a fresh graph is smaller and better
                entries = _take(self._pending, CATCH_UP_BATCH)
                labels = np.fromiter(map(self._labels.__getitem__, entries), np.intp, len(entries))
                vectors = gather(self._label_rows[labels])
                stale = np.array(self._stale, dtype=np.uint64)
                self._stale.clear()
                self._busy = True
                try:
                    graph = self._graph if self._graph is not None else self._new_graph()
                    await anyio.to_thread.run_sync(
                        _write,
                        graph,
                        labels.astype(np.uint64),
                        vectors,
                        stale,
                        self._config,
                        abandon_on_cancel=True,
                    )
                finally:
                    self._busy = False
                self._graph = graph
                self._graph_rows += len(entries)
        except asyncio.CancelledError:
            raise
        except Exception:
            # the graph may be half-written: never search it again; exact search stays
            logger.exception("ANN catch-up failed; this scope is searched exactly from now on")
            self._stopped = True
            self._graph = None
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _restart(self) -> None:
        """Relabel every row from 0 and mark it pending: the next batches build a fresh graph."""
        rows = self._label_rows[list(self._labels.values())]
        entries = list(self._labels)
        self._graph = None
        self._graph_rows = 0
        self._stale.clear()
        self._labels = {entry_id: label for label, entry_id in enumerate(entries)}
        self._label_rows = np.full(max(1024, 2 * len(entries)), -1, dtype=np.intp)
        self._label_rows[: len(entries)] = rows
        self._next_label = len(entries)
        self._pending = dict.fromkeys(entries)

    def _new_graph(self) -> Any:
        index_class = _usearch_index_class()
        return index_class(
            ndim=self._dimension,
            metric="ip",  # unit vectors: inner product is the cosine
            dtype=self._config.dtype,
            connectivity=self._config.connectivity,
            expansion_add=self._config.expansion_add,
            expansion_search=max(self._config.expansion_search, self._config.candidates),
        )


def _take(pending: dict[str, None], count: int) -> list[str]:
    """Remove and return up to ``count`` entries from ``pending``, oldest first."""
    taken = list(itertools.islice(pending, count))
    for entry_id in taken:
        del pending[entry_id]
    return taken


def _write(
    graph: Any,
    labels: npt.NDArray[np.uint64],
    vectors: npt.NDArray[np.float32],
    stale: npt.NDArray[np.uint64],
    config: AnnConfig,
) -> None:
    """Apply one catch-up batch to ``graph`` (in a worker thread)."""
    if stale.size:
        graph.remove(stale)
    if labels.size:
        graph.add(labels, vectors, threads=config.threads)
