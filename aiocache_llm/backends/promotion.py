"""Semantic hits promoted into an exact cache, and the capability both semantic caches share.

A semantic hit on a paraphrase may be *promoted*: stored in the exact cache under the
paraphrase's own key, so that asking it again is an exact hit (no embedding, no vector
search). A promotion is a copy of another entry, so it must never outlive it:

* it carries at most the original's remaining lifetime (and at most the exact cache's
  own default lifetime, or the one asked for);
* it dies with the original: whenever the semantic entry goes (``invalidate``, a put
  that replaces it, eviction, expiry, ``clear``), its promotions are deleted from the
  exact cache too.

For the second rule the semantic cache records, with each entry, the exact entries
promoted from it, and deletes them itself. It can do so only for an exact cache that
lives where it does: a :class:`MemorySemanticCache` promotes into a
:class:`MemoryExactCache` (same process), a :class:`RedisSemanticCache` into a
:class:`RedisExactCache` on the same Redis server (its scripts delete the promoted
keys in the same step as the entry). Any other pairing is never promoted into: a
promotion there could not be deleted with its original (another process's memory,
another server).

:class:`PromotingSemanticCache` is the capability the gateway checks for, never a
class: ``lookup`` (a ``get`` that also says which entry answered and how long it has
left) and ``promote``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from aiocache_llm.core.query import Query

__all__ = [
    "PromotingSemanticCache",
    "SemanticHit",
    "SupportsPromotionConflict",
    "promotion_ttl",
]


class SemanticHit(NamedTuple):
    """What a semantic cache's ``lookup`` found."""

    value: Any
    """The stored answer (a fresh copy if mutable), as ``get`` returns it."""
    ttl_seconds: float | None
    """The entry's remaining lifetime when it was read, in seconds; None = never expires."""
    entry: str
    """The id of the entry that answered, within its cache (for :meth:`promote`)."""


@runtime_checkable
class PromotingSemanticCache(Protocol):
    """A semantic cache that can tell its hits' lifetimes and promote them safely."""

    async def lookup(
        self, query: Query, *, similarity_threshold: float | None = None
    ) -> SemanticHit | None:
        """``get``, returning a :class:`SemanticHit` (or ``None`` on a miss)."""
        ...

    async def promote(
        self,
        hit: SemanticHit,
        exact_cache: object,
        digest: str,
        *,
        ttl_seconds: float | None = None,
    ) -> bool:
        """Store ``hit.value`` in ``exact_cache`` under ``digest``, tied to ``hit``'s entry.

        Returns False, storing nothing, when ``exact_cache`` cannot be tied to this
        cache or the entry is gone.
        """
        ...


@runtime_checkable
class SupportsPromotionConflict(Protocol):
    """A semantic cache that can tell, before any request, a pairing that never promotes.

    On a Redis Cluster a :class:`RedisSemanticCache` promotes only into an exact cache
    whose entries share its hash slot; the gateway asks at construction and refuses a
    pairing that could never promote (a reason string), instead of silently losing
    every promotion.
    """

    def promotion_conflict(self, exact_cache: object) -> str | None:
        """Why promotions into ``exact_cache`` can never work here, or None."""
        ...


def promotion_ttl(
    requested: float | None, default: float | None, remaining: float | None
) -> float | None:
    """The lifetime of a promotion: the one asked for (else the exact cache's default),
    capped by the original entry's ``remaining`` lifetime; None = never expires.

    A result ``<= 0`` means the original has expired: nothing may be promoted.
    """
    ttl = requested if requested is not None else default
    if remaining is None:
        return ttl
    return remaining if ttl is None else min(ttl, remaining)
