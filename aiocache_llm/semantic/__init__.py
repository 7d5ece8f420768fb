"""Semantic quality: the built-in verifier, threshold calibration and shadow records.

* :class:`SemanticGuard`: a fast, dependency-free ``verify=`` for both semantic caches
  that refuses candidates differing in what changes an answer (numbers, dates,
  negation, names, units, direction, ...).
* :func:`calibrate_threshold`: the similarity threshold that keeps wrong answers under
  a rate, from labelled pairs or shadow records, with the hit rate to expect.
* :class:`ShadowRecord`: what the gateway's shadow mode records for each lookup.
"""

from aiocache_llm.backends.verification import SemanticProbe, VerifyFn
from aiocache_llm.semantic.calibration import (
    Calibration,
    CalibrationError,
    LabelledPair,
    calibrate_threshold,
)
from aiocache_llm.semantic.guard import RULES, SemanticGuard
from aiocache_llm.semantic.shadow import ShadowRecord

__all__ = [
    "RULES",
    "Calibration",
    "CalibrationError",
    "LabelledPair",
    "SemanticGuard",
    "SemanticProbe",
    "ShadowRecord",
    "VerifyFn",
    "calibrate_threshold",
]
