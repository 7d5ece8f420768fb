"""The ``verify=`` hook of both semantic caches: a check of each candidate before it is served.

A semantic cache finds candidates by cosine similarity alone, and similar words can
ask for different answers ("flights to Paris" / "flights from Paris"). A *verifier*
is a sync or async callable ``(query_text, candidate_text, similarity) -> bool``
called on the candidates at or above the threshold, best first, at most
``max_verify_candidates`` of them per lookup; the first it accepts is the hit.
:class:`~aiocache_llm.semantic.SemanticGuard` is the built-in one.

:class:`Verifier` wraps the user's callable for both twins: it awaits an async one
(a sync one runs inline on the event loop, so it must be fast: the guard takes
microseconds; anything slower should be async), and it turns every failure into a
refusal. A verifier that raises an ``Exception`` (or returns something other than a
bool) never fails the lookup: the candidate counts as refused and as a verifier
error, and the first such error of each cache is logged (without any text of the
query or the candidate). Cancellation is never swallowed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from aiocache_llm.backends.vectors import SIMILARITY_TOLERANCE
from aiocache_llm.core.query import Query
from aiocache_llm.core.validation import check_callable, check_positive_int

__all__ = [
    "DEFAULT_MAX_VERIFY_CANDIDATES",
    "MAX_VERIFY_CANDIDATES",
    "ProbingSemanticCache",
    "SemanticProbe",
    "Verifier",
    "VerifyFn",
    "judge",
]

logger = logging.getLogger("aiocache_llm.semantic")

VerifyFn = Callable[[str, str, float], bool | Awaitable[bool]]
"""A sync or async callable ``(query_text, candidate_text, similarity) -> bool``."""

DEFAULT_MAX_VERIFY_CANDIDATES = 4
"""Candidates a lookup offers the verifier at most, by default."""

MAX_VERIFY_CANDIDATES = 64
"""The largest ``max_verify_candidates`` a cache accepts (each candidate costs a call)."""


class Verifier:
    """A cache's verifier, with its counters (``refusals``, ``errors``)."""

    __slots__ = ("_fn", "_logged", "errors", "max_candidates", "refusals")

    def __init__(self, fn: object, max_candidates: object) -> None:
        self._fn: Callable[..., Any] = check_callable("verify", fn)
        self.max_candidates = check_positive_int(
            "max_verify_candidates", max_candidates, at_most=MAX_VERIFY_CANDIDATES
        )
        self._logged = False
        self.refusals = 0
        self.errors = 0

    def __repr__(self) -> str:
        name = getattr(self._fn, "__qualname__", None) or type(self._fn).__name__
        return f"{name}, max_candidates={self.max_candidates}"

    async def accepts(
        self, query_text: str, candidate_text: str, similarity: float, *, count: bool = True
    ) -> bool:
        """Whether the verifier accepts the candidate; never raises an ``Exception``.

        ``count=False`` (shadow probes) leaves the counters alone.
        """
        try:
            verdict = self._fn(query_text, candidate_text, similarity)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if not isinstance(verdict, (bool, np.bool_)):
                raise TypeError(f"verify returned {type(verdict).__name__}, not a bool")
        except Exception as exc:  # a broken verifier refuses; it never fails a lookup
            if count:
                self.errors += 1
                self.refusals += 1
            if not self._logged:
                self._logged = True
                # the exception's type only: its message may quote the texts
                logger.warning(
                    "semantic cache verifier %r raised %s: candidates it raises on are "
                    "refused (logged once per cache)",
                    self,
                    type(exc).__name__,
                )
            return False
        if not verdict and count:
            self.refusals += 1
        return bool(verdict)

    def refuse_unknown(self) -> None:
        """Count a candidate refused unasked: its text is unknown (an old version stored it)."""
        self.refusals += 1


class SemanticProbe(NamedTuple):
    """What a semantic lookup would have served, measured without serving it (shadow mode).

    ``candidate_text`` and ``similarity`` are those of the candidate a lookup would
    serve if there is one, else of the scope's most similar entry (whatever its
    similarity, so that a threshold can be calibrated below the current one); both
    ``None`` when the scope holds nothing. ``verified`` is the verifier's verdict on
    that candidate (``None`` without a verifier or a candidate); ``would_hit`` says
    whether ``get`` would have answered with it at ``threshold``.
    """

    query_text: str
    candidate_text: str | None
    similarity: float | None
    threshold: float
    verified: bool | None
    would_hit: bool


async def judge(
    query_text: str,
    candidates: list[tuple[str | None, float]],
    threshold: float,
    verifier: Verifier | None,
) -> SemanticProbe:
    """The probe of ``query_text`` given its candidates ``(text, similarity)``, best first.

    The verifier (if any) is asked about up to ``max_candidates`` of them, whatever
    their similarity, without counting; the first accepted is the probe's candidate.
    """
    floor = threshold - SIMILARITY_TOLERANCE
    if not candidates:
        return SemanticProbe(query_text, None, None, threshold, None, False)
    if verifier is None:
        text, similarity = candidates[0]
        return SemanticProbe(query_text, text, similarity, threshold, None, similarity >= floor)
    for text, similarity in candidates[: verifier.max_candidates]:
        if text is not None and await verifier.accepts(query_text, text, similarity, count=False):
            return SemanticProbe(query_text, text, similarity, threshold, True, similarity >= floor)
    text, similarity = candidates[0]
    return SemanticProbe(
        query_text, text, similarity, threshold, None if text is None else False, False
    )


@runtime_checkable
class ProbingSemanticCache(Protocol):
    """A semantic cache that can tell what it would serve without serving it (shadow mode)."""

    async def probe(
        self, query: Query, *, similarity_threshold: float | None = None
    ) -> SemanticProbe | None:
        """What ``get`` would serve, measured without counting or refreshing anything."""
        ...
