"""A dependency-free bag-of-words embedder for tests and demos."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import check_positive_int

__all__ = ["HashingEmbedder"]

_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits: punctuation and "_" split words


@lru_cache(maxsize=1 << 16)
def _slot(feature: str, dimension: int) -> tuple[int, float]:
    # blake2b, not hash(): Python salts str hashes per process, and vectors must agree
    # across processes sharing a Redis cache.
    digest = hashlib.blake2b(feature.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % dimension, (1.0 if value >> 63 else -1.0)


class HashingEmbedder:
    """A deterministic bag-of-words embedder for demos and tests: ``text -> float32 vector``.

    The text is lowercased and split into words at anything that is not a letter or
    digit (so case and punctuation do not matter); every word and every character
    trigram of ``<word>`` is hashed with BLAKE2b into one of ``dimension`` slots with a
    +-1 sign, and the counts are normalized to unit length. Word order does not matter
    at all, and a changed, added or dropped word or two moves the vector only a
    little: "What is the capital of France?" and "what's the capital of france"
    score about 0.9, unrelated sentences about 0 to 0.3.

    Good for: examples and tests that need a semantic cache without downloading a
    model; it needs only numpy, costs tens of microseconds per sentence, and gives
    the same vector in every process and on every run.

    Not good for: real semantics. It knows nothing of synonyms ("car" vs
    "automobile"), negation or meaning: "the capital of France" and "the capital of
    Germany" share most words and score about 0.8. Use a real embedding model in
    production.

    The call is synchronous and cheap, so pass ``embed_in_thread=False`` to a cache.
    Raises :class:`InvalidInputTypeError` for a non-``str`` text and
    :class:`InvalidInputError` for text with no letters, digits or symbols at all.
    """

    __slots__ = ("_dimension",)

    def __init__(self, dimension: int = 256) -> None:
        self._dimension = check_positive_int("dimension", dimension)

    def __repr__(self) -> str:
        return f"HashingEmbedder(dimension={self._dimension})"

    @property
    def dimension(self) -> int:
        """The length of every vector this embedder returns."""
        return self._dimension

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        """Return the unit-length embedding of ``text``; O(len(text))."""
        if not isinstance(text, str):
            raise InvalidInputTypeError(f"text must be a str, got {type(text).__name__}")
        lowered = text.lower()
        words = _WORD.findall(lowered)
        if not words:
            # punctuation or emoji only: the text itself is the one feature
            words = lowered.split()
        if not words:
            raise InvalidInputError("text to embed has no words")
        vector = np.zeros(self._dimension, dtype=np.float64)
        for word in words:
            self._add(vector, "w:" + word)
            padded = f"<{word}>"
            for start in range(len(padded) - 2):
                self._add(vector, "t:" + padded[start : start + 3])
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            # every feature cancelled out (possible in tiny dimensions): any fixed direction
            vector[0] = 1.0
            norm = 1.0
        return (vector / norm).astype(np.float32)

    def _add(self, vector: npt.NDArray[np.float64], feature: str) -> None:
        slot, sign = _slot(feature, self._dimension)
        vector[slot] += sign
