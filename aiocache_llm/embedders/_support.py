"""Shared plumbing of the model-backed embedders: optional imports, input checks, unit vectors."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

import numpy as np
import numpy.typing as npt

from aiocache_llm.core.errors import AiocacheLLMError, InvalidInputError, InvalidInputTypeError

__all__ = [
    "EMBED_EXTRA_HINT",
    "EmbedderUnavailableError",
    "check_text",
    "check_texts",
    "import_optional",
    "unit_rows",
]

EMBED_EXTRA_HINT = "pip install 'aiocache_llm[embed]'"

Vector = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]


class EmbedderUnavailableError(AiocacheLLMError, ImportError):
    """A model-backed embedder was built without its optional package or model file.

    An ``ImportError`` too, so code that already guards optional imports keeps working.
    The message names the missing package and the extra that installs it.
    """


def import_optional(module: str, *, embedder: str) -> ModuleType:
    """Import ``module`` for ``embedder``, or raise :class:`EmbedderUnavailableError`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EmbedderUnavailableError(
            f"{embedder} needs the {module.split('.')[0]!r} package: {EMBED_EXTRA_HINT}"
        ) from exc


def check_text(text: object) -> str:
    """``text`` itself if it is a ``str`` with at least one non-space character."""
    if not isinstance(text, str):
        raise InvalidInputTypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        # a model would pool zero tokens into a NaN (or a meaningless constant) vector
        raise InvalidInputError("text to embed is empty or only whitespace")
    return text


def check_texts(texts: Iterable[str]) -> list[str]:
    """A list of checked texts; a lone ``str`` is refused (it would embed its characters)."""
    if isinstance(texts, str):
        raise InvalidInputTypeError("texts must be an iterable of str, not a single str")
    return [check_text(text) for text in texts]


def unit_rows(matrix: npt.ArrayLike, dimension: int) -> Matrix:
    """``matrix`` as C-contiguous float32 rows of unit length; raises on a bad row.

    Models already normalise, but float16/int8 arithmetic leaves norms a few ULPs off
    and the caches' cosine is a plain dot product, so every row is renormalised here.
    """
    rows = np.array(matrix, dtype=np.float64, copy=True, ndmin=2)
    if rows.ndim != 2 or rows.shape[1] != dimension:
        raise InvalidInputError(f"model returned shape {rows.shape}, expected (n, {dimension})")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0.0):
        raise InvalidInputError("model returned a zero or non-finite vector")
    return np.ascontiguousarray(rows / norms, dtype=np.float32)
