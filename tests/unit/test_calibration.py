"""calibrate_threshold on hand-checkable data: the lowest threshold under the wrong-rate cap."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from aiocache_llm import (
    Calibration,
    CalibrationError,
    InvalidInputError,
    InvalidInputTypeError,
    LabelledPair,
    SemanticGuard,
    ShadowRecord,
    calibrate_threshold,
)

# similarity, should_hit: served at t when similarity >= t
EXAMPLES = [
    (0.99, True),
    (0.97, True),
    (0.95, False),  # a trap above two paraphrases
    (0.93, True),
    (0.90, True),
    (0.85, False),
    (0.80, True),
    (0.70, False),
]


def test_no_wrong_answer_allowed_stops_above_the_first_trap() -> None:
    result = calibrate_threshold(EXAMPLES, max_wrong_rate=0.0)
    assert result.threshold == 0.97
    assert (result.hits, result.should_hit, result.wrong, result.should_miss) == (2, 5, 0, 3)
    assert result.hit_rate == pytest.approx(2 / 5)
    assert result.wrong_rate == 0.0


def test_one_trap_in_three_allowed_goes_down_to_the_next_trap() -> None:
    result = calibrate_threshold(EXAMPLES, max_wrong_rate=1 / 3)
    assert result.threshold == 0.90  # 0.85 would serve a second trap
    assert (result.hits, result.wrong) == (4, 1)
    assert result.wrong_rate == pytest.approx(1 / 3)


def test_everything_allowed_serves_everything() -> None:
    result = calibrate_threshold(EXAMPLES, max_wrong_rate=1.0)
    assert result.threshold == 0.70
    assert (result.hit_rate, result.wrong_rate) == (1.0, 1.0)


def test_ties_are_served_together() -> None:
    examples = [(0.9, True), (0.9, False), (0.9, True), (0.8, True), (0.7, False)]
    # 0.9 serves one trap of two (50%): over a 10% cap, so nothing is served
    result = calibrate_threshold(examples, max_wrong_rate=0.1)
    assert result.hits == 0
    assert result.threshold > 0.9
    assert calibrate_threshold(examples, max_wrong_rate=0.5).threshold == 0.8


def test_when_the_top_example_is_a_trap_nothing_is_served() -> None:
    examples = [(0.96, False), (0.95, True), (0.5, False)]
    result = calibrate_threshold(examples, max_wrong_rate=0.0)
    assert (result.hits, result.wrong, result.hit_rate) == (0, 0, 0.0)
    assert 0.96 < result.threshold <= 1.0
    assert "hit_rate=0.0% (0/1)" in repr(result)


def test_all_wrong_at_similarity_one_cannot_be_calibrated() -> None:
    with pytest.raises(CalibrationError, match="similarity 1"):
        calibrate_threshold([(1.0, False), (0.9, True)], max_wrong_rate=0.0)


def test_a_verifier_removes_the_traps_it_refuses() -> None:
    pairs = [
        LabelledPair(0.97, False, "Trains from Paris to Lyon", "Trains from Lyon to Paris"),
        LabelledPair(
            0.96, True, "how do i reverse a list in python", "How do I reverse a list in Python?"
        ),
        LabelledPair(0.94, False, "Roast a chicken at 200C", "Roast a chicken at 180C"),
        LabelledPair(0.90, True, "Can I freeze cooked rice?", "can i freez cooked rice?"),
    ]
    plain = calibrate_threshold(pairs, max_wrong_rate=0.0)
    assert plain.hits == 0
    guarded = calibrate_threshold(pairs, max_wrong_rate=0.0, verify=SemanticGuard())
    assert (guarded.threshold, guarded.hits, guarded.wrong, guarded.refused) == (0.90, 2, 0, 2)
    assert guarded.hit_rate == 1.0


def test_a_verdict_carried_by_the_example_counts_without_verify() -> None:
    examples = [LabelledPair(0.99, False, verified=False), LabelledPair(0.9, True), (0.5, False)]
    result = calibrate_threshold(examples, max_wrong_rate=0.0)
    assert (result.threshold, result.hits, result.refused) == (0.9, 1, 1)


def test_labelled_shadow_records_are_examples() -> None:
    def record(similarity: float | None, candidate: str | None, **kwargs: Any) -> ShadowRecord:
        return ShadowRecord("q", candidate, similarity, 0.95, None, False, 0.0, **kwargs)

    records = [
        record(0.97, "a", label=True),
        record(0.92, "b").labelled(False),
        (record(0.90, "c"), True),
        record(None, None, label=False),  # an empty scope: nothing compared, skipped
    ]
    result = calibrate_threshold(records, max_wrong_rate=0.0)
    assert (result.threshold, result.should_hit, result.should_miss) == (0.97, 2, 1)
    with pytest.raises(InvalidInputError, match="without a label"):
        calibrate_threshold([record(0.9, "a")])


def test_text_pairs_are_embedded_with_embed_fn() -> None:
    table = {"a": [1.0, 0.0], "b": [0.6, 0.8], "c": [0.8, 0.6], "d": [0.0, 1.0]}
    examples = [("a", "b", False), ("a", "c", True), ("a", "d", False)]
    result = calibrate_threshold(examples, max_wrong_rate=0.0, embed_fn=lambda t: table[t])
    assert result.threshold == pytest.approx(0.8)
    with pytest.raises(InvalidInputError, match="embed_fn"):
        calibrate_threshold(examples)


def test_calibration_is_a_frozen_value_with_a_readable_repr() -> None:
    result = calibrate_threshold(EXAMPLES, max_wrong_rate=0.0)
    assert isinstance(result, Calibration)
    with pytest.raises(AttributeError):
        result.threshold = 0.5  # type: ignore[misc]
    assert repr(result) == (
        "Calibration(threshold=0.9700, hit_rate=40.0% (2/5), wrong_rate=0.0% (0/3), "
        "max_wrong_rate=0.0%, refused=0)"
    )


@pytest.mark.parametrize(
    ("examples", "kwargs", "error", "match"),
    [
        ([], {}, InvalidInputError, "no examples"),
        ([(0.9, True), (0.8, True)], {}, CalibrationError, "traps"),
        ([(0.9, False)], {}, CalibrationError, "should-hit"),
        ([(1.5, True), (0.1, False)], {}, InvalidInputError, "example 0"),
        ([(0.5, True), (math.nan, False)], {}, InvalidInputError, "example 1"),
        ([(0.5, "yes"), (0.1, False)], {}, InvalidInputTypeError, "should_hit"),
        ([(True, True), (0.1, False)], {}, InvalidInputTypeError, "similarity"),
        ([LabelledPair(2.0, True), (0.1, False)], {}, InvalidInputError, "example 0"),
        ([object()], {}, InvalidInputTypeError, "example 0"),
        ("pairs", {}, InvalidInputTypeError, "iterable"),
        (EXAMPLES, {"max_wrong_rate": 1.5}, InvalidInputError, "max_wrong_rate"),
        (EXAMPLES, {"max_wrong_rate": math.nan}, InvalidInputError, "max_wrong_rate"),
        (EXAMPLES, {"max_wrong_rate": True}, InvalidInputTypeError, "max_wrong_rate"),
        (EXAMPLES, {"verify": SemanticGuard()}, InvalidInputError, "texts"),
        (EXAMPLES, {"verify": "yes"}, InvalidInputTypeError, "verify"),
    ],
)
def test_bad_input_raises_clearly(
    examples: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        calibrate_threshold(examples, **kwargs)


def test_an_async_verifier_is_refused() -> None:
    async def verify(query: str, candidate: str, similarity: float) -> bool:
        return True

    pairs = [LabelledPair(0.9, True, "a", "b"), LabelledPair(0.5, False, "a", "c")]
    with pytest.raises(InvalidInputTypeError, match="sync"):
        calibrate_threshold(pairs, verify=verify)  # type: ignore[arg-type]


def test_numpy_similarities_are_numbers() -> None:
    examples = [(np.float32(0.9), True), (np.float64(0.5), False)]
    assert calibrate_threshold(examples).threshold == pytest.approx(0.9)


def test_large_input_is_sorted_once() -> None:
    rng = np.random.default_rng(7)
    positives = [(float(s), True) for s in rng.uniform(0.8, 1.0, 5000)]
    negatives = [(float(s), False) for s in rng.uniform(0.5, 0.9, 5000)]
    result = calibrate_threshold(positives + negatives, max_wrong_rate=0.01)
    assert result.wrong <= 50
    assert result.threshold == pytest.approx(0.896, abs=0.005)
