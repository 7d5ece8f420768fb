"""The gateway's counters and latency percentiles, reported as a frozen :class:`GatewayStats`."""

from __future__ import annotations

from collections import deque

from pydantic import BaseModel, ConfigDict

__all__ = ["GatewayStats", "LatencyWindow"]


class GatewayStats(BaseModel):
    """A frozen snapshot of an :class:`InferenceGateway`'s counters (this process).

    Every valid resolve is counted in ``requests`` and ends as exactly one of
    ``exact_hits``, ``semantic_hits``, ``coalesced`` (it joined a call another caller
    of this process started), ``fleet_hits`` (another process computed it) or
    ``misses`` (this caller went to the provider: a provider call, a rate-limit
    refusal, or an error). Latencies are over the last 4096 resolves, in ms.
    """

    model_config = ConfigDict(frozen=True)

    requests: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    """Resolves that found nothing anywhere and went to the provider for everyone."""
    coalesced: int = 0
    fleet_hits: int = 0
    provider_calls: int = 0
    provider_errors: int = 0
    rate_limited: int = 0
    backend_errors: int = 0
    """Cache, limiter or lease operations that failed or timed out (answered anyway)."""
    backend_skipped: int = 0
    """Backend operations not attempted because a circuit breaker was open (summed over
    every breaker: on a Redis Cluster the exact cache and fleet leases have one per
    primary; :meth:`InferenceGateway.breaker_states` tells each one's state)."""
    in_flight: int = 0
    stream_requests: int = 0
    """Streamed requests (also counted in ``requests`` and in exactly one outcome)."""
    stream_hits: int = 0
    """Streams answered by replaying a stored recording (exact or semantic)."""
    streams_shared: int = 0
    """Streams that joined one already in flight in this process (live fan-out)."""
    chunks_replayed: int = 0
    """Chunks served from stored recordings."""
    streams_abandoned: int = 0
    """Provider streams closed early because every consumer had left."""
    shadow_lookups: int = 0
    """Shadow-mode semantic lookups recorded (``semantic_mode="shadow"``)."""
    shadow_would_hit: int = 0
    """Shadow lookups whose answer the semantic cache would have served."""
    shadow_refused: int = 0
    """Shadow lookups whose candidate the cache's verifier refused."""
    shadow_callback_errors: int = 0
    """``on_shadow`` calls that raised (their records are still in the log)."""
    latency_p50_ms: float = 0.0
    latency_p90_ms: float = 0.0
    latency_p99_ms: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Share of requests answered from a cache (exact or semantic), in [0, 1]."""
        hits = self.exact_hits + self.semantic_hits
        return hits / self.requests if self.requests else 0.0


class LatencyWindow:
    """The last ``size`` durations; percentiles computed on demand in O(size log size)."""

    __slots__ = ("_samples",)

    def __init__(self, size: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def percentiles_ms(self, *quantiles: float) -> tuple[float, ...]:
        """Nearest-rank percentiles (``quantiles`` in [0, 1]) in ms; zeros when empty."""
        if not self._samples:
            return tuple(0.0 for _ in quantiles)
        ordered = sorted(self._samples)
        last = len(ordered) - 1
        return tuple(ordered[min(last, round(q * last))] * 1000 for q in quantiles)
