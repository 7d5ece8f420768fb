"""``calibrate_threshold``: the similarity threshold that keeps wrong answers under a rate.

Input: labelled examples, each a similarity between a query and a cached question
plus whether serving the cached answer would be right (``should_hit``). Accepted as

* :class:`LabelledPair` (similarity, should_hit, optional texts and verdict);
* ``(similarity, should_hit)`` tuples;
* ``(query_text, candidate_text, should_hit)`` tuples, embedded with ``embed_fn=``;
* :class:`~aiocache_llm.semantic.ShadowRecord` with a ``label`` (see
  :meth:`ShadowRecord.labelled`), or ``(record, should_hit)`` tuples. Records without
  a candidate (the scope was empty) carry no information and are skipped.

At a threshold ``t`` an example is *served* when its similarity is ``>= t`` and its
verdict is not a refusal: ``verify(query_text, candidate_text, similarity)`` when
``verify=`` is given (every example then needs both texts), else the verdict the
example carries (a shadow record's ``verified``; ``None`` counts as accepted). Then

* ``hit_rate`` = served should-hit examples / all should-hit examples;
* ``wrong_rate`` = served should-not-hit examples (traps) / all traps.

The result is the lowest threshold whose wrong rate is ``<= max_wrong_rate`` (so the
highest hit rate under that cap): the similarity of the least similar example it
serves. Examples of equal similarity are served together. When even the most
similar example that can be served is a trap beyond the cap, the threshold serves
no example (``hit_rate == 0``): the smallest float above that similarity. O(n log n).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aiocache_llm.backends.vectors import SIMILARITY_TOLERANCE, as_unit_vector
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.semantic.shadow import ShadowRecord

__all__ = ["Calibration", "CalibrationError", "LabelledPair", "calibrate_threshold"]


class CalibrationError(InvalidInputError):
    """The examples cannot give a threshold (none of one label, a trap at similarity 1)."""


@dataclass(frozen=True, slots=True)
class LabelledPair:
    """One labelled example: a query, a cached question, their similarity, the right call."""

    similarity: float
    should_hit: bool
    query_text: str | None = None
    candidate_text: str | None = None
    verified: bool | None = None
    """A verdict already known (False: never served); ignored when ``verify=`` is given."""


@dataclass(frozen=True, slots=True)
class Calibration:
    """The threshold to use and what to expect from it on the examples given."""

    threshold: float
    hit_rate: float
    wrong_rate: float
    hits: int
    """Should-hit examples served at ``threshold``."""
    wrong: int
    """Traps served at ``threshold``."""
    should_hit: int
    should_miss: int
    max_wrong_rate: float
    refused: int = 0
    """Examples the verifier (or their own verdict) refused, whatever the threshold."""

    def __repr__(self) -> str:
        return (
            f"Calibration(threshold={self.threshold:.4f}, "
            f"hit_rate={self.hit_rate:.1%} ({self.hits}/{self.should_hit}), "
            f"wrong_rate={self.wrong_rate:.1%} ({self.wrong}/{self.should_miss}), "
            f"max_wrong_rate={self.max_wrong_rate:.1%}, refused={self.refused})"
        )


def calibrate_threshold(
    examples: Iterable[Any],
    *,
    max_wrong_rate: float = 0.01,
    verify: Callable[[str, str, float], bool] | None = None,
    embed_fn: Callable[[str], Any] | None = None,
) -> Calibration:
    """The lowest similarity threshold whose wrong rate on ``examples`` is ``<= max_wrong_rate``.

    See the module docstring for the accepted examples and the definitions. ``verify``
    and ``embed_fn`` must be sync callables (an awaitable result raises
    :class:`InvalidInputTypeError`: embed first, or pass verdicts in the examples).
    Raises :class:`InvalidInputError` (a ``ValueError``) for no examples, a bad
    example (its index is named), a similarity that is not a finite number in
    [-1, 1], or a ``max_wrong_rate`` outside [0, 1]; :class:`CalibrationError` (a kind
    of it) when there is no should-hit example or no trap, or when a trap that
    cannot be refused has similarity 1 (no threshold in [-1, 1] skips it).
    """
    if isinstance(max_wrong_rate, bool) or not isinstance(max_wrong_rate, (int, float)):
        raise InvalidInputTypeError(
            f"max_wrong_rate must be a number, got {type(max_wrong_rate).__name__}"
        )
    if not 0.0 <= max_wrong_rate <= 1.0:  # NaN fails too
        raise InvalidInputError(f"max_wrong_rate must be in [0, 1], got {max_wrong_rate}")
    if verify is not None and not callable(verify):
        raise InvalidInputTypeError("verify must be callable")
    if embed_fn is not None and not callable(embed_fn):
        raise InvalidInputTypeError("embed_fn must be callable")
    if isinstance(examples, (str, bytes)):
        raise InvalidInputTypeError("examples must be an iterable of labelled examples")
    similarities: list[float] = []
    labels: list[bool] = []
    refused = 0
    for index, example in enumerate(examples):
        pair = _pair(example, index, embed_fn)
        if pair is None:
            continue
        verdict = pair.verified
        if verify is not None:
            if pair.query_text is None or pair.candidate_text is None:
                raise InvalidInputError(
                    f"example {index} has no texts: verify= needs query and candidate texts"
                )
            raw: object = verify(pair.query_text, pair.candidate_text, pair.similarity)
            if inspect.isawaitable(raw):
                _close(raw)
                raise InvalidInputTypeError("verify must be a sync callable here")
            verdict = bool(raw)
        if verdict is False:
            refused += 1
            labels.append(pair.should_hit)
            similarities.append(-math.inf)  # never served
            continue
        similarities.append(pair.similarity)
        labels.append(pair.should_hit)
    if not labels:
        raise InvalidInputError("no examples to calibrate on")
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        raise CalibrationError(
            f"calibration needs should-hit examples and traps, got {positives} and {negatives}"
        )
    sims = np.array(similarities, dtype=np.float64)
    hit = np.array(labels, dtype=bool)
    order = np.argsort(-sims, kind="stable")
    sims, hit = sims[order], hit[order]
    servable = np.isfinite(sims)
    best: tuple[float, int, int] | None = None  # threshold, hits, wrong
    hits = wrong = 0
    i, n = 0, int(servable.sum())
    while i < n:
        j = i
        while j < n and sims[j] == sims[i]:  # equal similarities are served together
            j += 1
        group = hit[i:j]
        hits += int(group.sum())
        wrong += int(len(group) - group.sum())
        if wrong > max_wrong_rate * negatives:
            break
        best = (float(sims[i]), hits, wrong)
        i = j
    if best is None:
        top = float(sims[0]) if n else 1.0
        if n and top >= 1.0 - SIMILARITY_TOLERANCE:
            raise CalibrationError(
                "a trap has similarity 1 and is not refused: no threshold in [-1, 1] keeps "
                "the wrong rate under the cap (add a verifier, or fix the labels)"
            )
        threshold = 1.0 if not n else min(1.0, float(np.nextafter(top, math.inf)))
        # the cache counts a similarity within SIMILARITY_TOLERANCE below as reaching it
        threshold = min(1.0, max(threshold, top + 2 * SIMILARITY_TOLERANCE)) if n else threshold
        best = (threshold, 0, 0)
    threshold, hits, wrong = best
    return Calibration(
        threshold=threshold,
        hit_rate=hits / positives,
        wrong_rate=wrong / negatives,
        hits=hits,
        wrong=wrong,
        should_hit=positives,
        should_miss=negatives,
        max_wrong_rate=float(max_wrong_rate),
        refused=refused,
    )


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning


def _pair(example: Any, index: int, embed_fn: Callable[[str], Any] | None) -> LabelledPair | None:
    """``example`` as a checked :class:`LabelledPair`; ``None`` for a record without candidate."""
    pair: LabelledPair | None
    if isinstance(example, LabelledPair):
        pair = example
    elif isinstance(example, ShadowRecord):
        if example.label is None:
            raise InvalidInputError(
                f"example {index} is a shadow record without a label: use record.labelled(...)"
            )
        pair = _from_record(example, example.label)
    elif isinstance(example, tuple) and len(example) == 2 and isinstance(example[0], ShadowRecord):
        pair = _from_record(example[0], _label(example[1], index))
    elif isinstance(example, tuple) and len(example) == 2:
        pair = LabelledPair(_similarity(example[0], index), _label(example[1], index))
    elif isinstance(example, tuple) and len(example) == 3:
        query, candidate, label = example
        if not isinstance(query, str) or not isinstance(candidate, str):
            raise InvalidInputTypeError(f"example {index}: texts must be str")
        if embed_fn is None:
            raise InvalidInputError(f"example {index} is a text pair: pass embed_fn= to embed it")
        pair = LabelledPair(
            _cosine(embed_fn, query, candidate, index), _label(label, index), query, candidate
        )
    else:
        raise InvalidInputTypeError(
            f"example {index} must be a LabelledPair, a labelled ShadowRecord, "
            f"(similarity, should_hit) or (query_text, candidate_text, should_hit); "
            f"got {type(example).__name__}"
        )
    if isinstance(example, LabelledPair):
        # a LabelledPair is built by hand: check it as the tuples are checked
        pair = LabelledPair(
            _similarity(example.similarity, index),
            _label(example.should_hit, index),
            example.query_text,
            example.candidate_text,
            example.verified,
        )
    return pair


def _from_record(record: ShadowRecord, label: bool) -> LabelledPair | None:
    if record.similarity is None:
        return None  # the scope was empty: nothing was compared
    return LabelledPair(
        record.similarity, label, record.query_text, record.candidate_text, record.verified
    )


def _label(value: object, index: int) -> bool:
    if type(value) is not bool:
        raise InvalidInputTypeError(
            f"example {index}: should_hit must be a bool, got {type(value).__name__}"
        )
    return value


def _similarity(value: object, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise InvalidInputTypeError(
            f"example {index}: similarity must be a number, got {type(value).__name__}"
        )
    similarity = float(value)
    if not -1.0 - SIMILARITY_TOLERANCE <= similarity <= 1.0 + SIMILARITY_TOLERANCE:
        raise InvalidInputError(
            f"example {index}: similarity must be a cosine in [-1, 1], got {value}"
        )
    return min(1.0, max(-1.0, similarity))


def _cosine(embed_fn: Callable[[str], Any], first: str, second: str, index: int) -> float:
    vectors = []
    for text in (first, second):
        raw = embed_fn(text)
        if inspect.isawaitable(raw):
            _close(raw)
            raise InvalidInputTypeError("embed_fn must be a sync callable here")
        vectors.append(as_unit_vector(raw, what=f"example {index} embedding"))
    if vectors[0].shape != vectors[1].shape:
        raise InvalidInputError(f"example {index}: the two embeddings differ in dimension")
    return min(1.0, max(-1.0, float(vectors[0] @ vectors[1])))
