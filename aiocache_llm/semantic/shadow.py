"""``ShadowRecord``: one semantic lookup the gateway made in shadow mode, for calibration.

In shadow mode (``InferenceGateway(..., semantic_mode="shadow")``) the gateway asks
the semantic cache what it *would* serve (:meth:`probe` of both semantic caches), never
serves it, and records the answer as one of these: in a bounded in-memory log
(``gateway.shadow_records()``) and/or through an ``on_shadow=`` callback. Label
records (``record.labelled(True)`` when the candidate's answer would have been right
for the query) and hand them to :func:`~aiocache_llm.semantic.calibrate_threshold`.

Records hold the texts of the query and of the candidate: they are user data, kept
in process only, never logged by the library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aiocache_llm.backends.verification import SemanticProbe
from aiocache_llm.core.errors import InvalidInputTypeError

__all__ = ["ShadowRecord"]


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    """What the semantic cache would have served for one request (see :class:`SemanticProbe`).

    ``would_hit``: the cache would have answered (at ``threshold``, verifier
    included); ``similarity`` and ``candidate_text``: the candidate it would have
    served, else the scope's nearest entry (``None`` when the scope was empty);
    ``verified``: the verifier's verdict on it (``None`` without a verifier);
    ``at``: wall-clock time of the lookup (seconds since the epoch); ``label``:
    whether serving the candidate would have been right, set by you
    (:meth:`labelled`), ``None`` until then.
    """

    query_text: str
    candidate_text: str | None
    similarity: float | None
    threshold: float
    verified: bool | None
    would_hit: bool
    at: float
    label: bool | None = None

    @classmethod
    def from_probe(cls, probe: SemanticProbe, at: float) -> ShadowRecord:
        """The record of a cache's probe made at time ``at``."""
        return cls(
            probe.query_text,
            probe.candidate_text,
            probe.similarity,
            probe.threshold,
            probe.verified,
            probe.would_hit,
            at,
        )

    def labelled(self, should_hit: bool) -> ShadowRecord:
        """A copy with ``label=should_hit`` (True: the candidate's answer was right)."""
        if type(should_hit) is not bool:
            raise InvalidInputTypeError(
                f"should_hit must be a bool, got {type(should_hit).__name__}"
            )
        return dataclasses.replace(self, label=should_hit)
