"""``WordLlamaEmbedder``: a fast static embedder whose weights ship in the ``wordllama`` wheel."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aiocache_llm.core.errors import InvalidInputError
from aiocache_llm.embedders._support import (
    EmbedderUnavailableError,
    check_text,
    check_texts,
    import_optional,
    unit_rows,
)

__all__ = ["WordLlamaEmbedder"]

_SHIPPED_DIMENSION = 256  # the wheel holds l2_supercat_256.safetensors and nothing larger
_DIMENSIONS = (64, 128, 256)  # 64 and 128 are Matryoshka truncations of the 256-d weights


class WordLlamaEmbedder:
    """WordLlama (``l2_supercat``): token embeddings averaged into a sentence vector.

    A static model: each token has one learned vector (distilled from a large LLM's
    input embeddings) and a text is the mean of its tokens' vectors, normalised to unit
    length. No neural network runs at query time, so a short question costs tens of
    microseconds and the model needs about 16 MB of RAM. It knows synonyms and topics
    far better than :class:`~aiocache_llm.embedders.HashingEmbedder`, but as a bag of
    tokens it is blind to word order and weak on negation: pair it with a verifier
    (``SemanticGuard``) before serving hits.

    Loading: the weights and tokenizer ship inside the ``wordllama`` wheel
    (``pip install 'aiocache_llm[embed]'``) and are loaded from the package folder with
    downloads disabled, so building this never touches the network (wordllama's own
    default lookup looks in a folder that its wheel does not create and then tries to
    download). ``dimension`` may be 256 (the shipped weights), or 128 or 64 (their
    Matryoshka truncation: smaller vectors, a little less accurate).

    Thread safety: a call only reads the weight matrix and runs the thread-safe
    ``tokenizers`` encoder, so one instance may be called from many threads at once
    (the semantic caches call ``embed_fn`` in a worker thread by default; at this cost,
    ``embed_in_thread=False`` is usually better).

    Raises :class:`EmbedderUnavailableError` (an ``ImportError``) when ``wordllama`` is
    not installed, ``InvalidInputError`` for an unsupported dimension and, per call,
    for a non-``str`` or blank text.
    """

    __slots__ = ("_dimension", "_model")

    def __init__(self, dimension: int = _SHIPPED_DIMENSION) -> None:
        if dimension not in _DIMENSIONS:
            raise InvalidInputError(f"dimension must be one of {_DIMENSIONS}, got {dimension!r}")
        package = import_optional("wordllama", embedder="WordLlamaEmbedder")
        folder = Path(package.__file__ or "").parent
        try:
            self._model: Any = package.WordLlama.load(
                config="l2_supercat",
                dim=_SHIPPED_DIMENSION,
                trunc_dim=None if dimension == _SHIPPED_DIMENSION else dimension,
                cache_dir=folder,
                disable_download=True,
            )
        except FileNotFoundError as exc:
            raise EmbedderUnavailableError(
                f"the wordllama package in {folder} lacks its bundled weights or tokenizer: "
                "reinstall it (pip install --force-reinstall 'aiocache_llm[embed]')"
            ) from exc
        self._dimension = dimension

    def __repr__(self) -> str:
        return f"WordLlamaEmbedder(dimension={self._dimension})"

    @property
    def dimension(self) -> int:
        """The length of every vector this embedder returns."""
        return self._dimension

    @property
    def model_id(self) -> str:
        """Names the vectors' space (for ``CachedEmbedder`` keys): model and dimension."""
        return f"wordllama-l2_supercat-{self._dimension}"

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        """The unit-length float32 embedding of ``text``."""
        vector: npt.NDArray[np.float32] = self._embed([check_text(text)])[0]
        return vector

    def embed_many(self, texts: Iterable[str]) -> npt.NDArray[np.float32]:
        """Embed several texts at once: one ``(len(texts), dimension)`` float32 array.

        Row ``i`` equals ``self(texts[i])`` up to float rounding; faster per text than
        separate calls for more than a handful of texts.
        """
        checked = check_texts(texts)
        if not checked:
            return np.empty((0, self._dimension), dtype=np.float32)
        return self._embed(checked)

    def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return unit_rows(self._model.embed(texts, norm=False), self._dimension)
