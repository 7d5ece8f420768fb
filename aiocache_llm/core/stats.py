"""Frozen counter snapshots: every component reports its counters as one of these.

Counts are this process's, since the object was created; sizes are the backend's.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["CacheStats", "ChatMemoryStats", "RateLimiterStats"]


class RateLimiterStats(BaseModel):
    """What a rate limiter granted and refused in this process."""

    model_config = ConfigDict(frozen=True)

    granted: int = 0
    """Requests granted (``check_and_consume`` returning True, ``acquire`` returning)."""
    granted_tokens: int = 0
    refunded_tokens: int = 0
    """Tokens given back by ``refund`` or ``release`` (a call used fewer than it reserved)."""
    recorded_tokens: int = 0
    """Tokens recorded by ``record_usage`` (used beyond a reservation, even past the budget)."""
    refused: int = 0
    """Requests refused (``check_and_consume`` returning False, ``acquire`` raising)."""
    backend_errors: int = 0


class ChatMemoryStats(BaseModel):
    """What a chat memory stored and read in this process."""

    model_config = ConfigDict(frozen=True)

    appended: int = 0
    reads: int = 0
    cleared: int = 0


class CacheStats(BaseModel):
    """A frozen snapshot of one cache's counters.

    ``hits`` and ``misses`` count this process's lookups since the cache object was
    created; ``size`` is the number of entries the backend holds now (for Redis
    backends, shared by every process using the same key prefix).
    ``corrupt_entries`` counts entries found unreadable (treated as misses),
    ``undeclared_entries`` entries of a model type this process has not declared in
    ``value_types=`` (misses too, but the data is sound: declare the type), and
    ``evictions`` the entries removed to respect ``max_size``.
    ``verifier_refusals`` (semantic caches built with ``verify=``) counts the
    candidates the verifier did not accept, those it raised on included, and
    ``verifier_errors`` the calls that raised (or returned something other than a bool).
    """

    model_config = ConfigDict(frozen=True)

    hits: int = 0
    misses: int = 0
    size: int = 0
    evictions: int = 0
    corrupt_entries: int = 0
    undeclared_entries: int = 0
    verifier_refusals: int = 0
    verifier_errors: int = 0

    @property
    def total(self) -> int:
        """Lookups answered, hits plus misses."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """``hits / total`` in [0, 1]; 0.0 when nothing was looked up yet."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
