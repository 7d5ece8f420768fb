"""Prometheus metrics for :class:`InferenceGateway` (the ``aiocache_llm[prometheus]`` extra).

::

    from aiocache_llm.metrics.prometheus import register_gateway_metrics

    register_gateway_metrics(gateway, name="chat")
    # expose the registry as usual: prometheus_client.start_http_server(9100),
    # or prometheus_client.make_asgi_app() mounted on the web app

Nothing is recorded per request: a collector calls ``gateway.stats()`` when
Prometheus scrapes and turns the snapshot into metrics, labelled
``gateway="<name>"``. With the default ``namespace`` they are:

- counters ``aiocache_llm_gateway_<field>_total`` for ``requests``, ``exact_hits``,
  ``semantic_hits``, ``misses``, ``coalesced``, ``fleet_hits``, ``provider_calls``,
  ``provider_errors``, ``rate_limited``, ``backend_errors``, ``backend_skipped``,
  ``stream_requests``, ``stream_hits``, ``streams_shared``, ``chunks_replayed`` and
  ``streams_abandoned``;
- gauge ``aiocache_llm_gateway_in_flight``;
- gauge ``aiocache_llm_gateway_latency_seconds{quantile="0.5"|"0.9"|"0.99"}``: resolve
  latency percentiles over the gateway's recent resolves (not a histogram:
  percentiles of several processes cannot be averaged, only compared).

Every gateway registered in one registry under one namespace is served by the same
:class:`GatewayCollector` (a registry refuses two collectors that produce the same
metric names). A scrape may run in the exporter's thread: it only reads counters,
and ``stats()`` builds its snapshot without yielding.

Not exported: the backends' own stats (``CacheStats``, ``RateLimiterStats``) are
read with a coroutine (a Redis round trip for the Redis backends), which a
synchronous scrape cannot await.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Mapping

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.validation import check_id
from aiocache_llm.gateway.gateway import InferenceGateway
from aiocache_llm.gateway.stats import GatewayStats

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise ImportError(
        "aiocache_llm.metrics.prometheus needs the prometheus-client package: "
        "pip install 'aiocache_llm[prometheus]'"
    ) from exc

__all__ = [
    "COUNTERS",
    "DEFAULT_NAMESPACE",
    "GAUGES",
    "LATENCY_QUANTILES",
    "GatewayCollector",
    "check_namespace",
    "register_gateway_metrics",
    "unregister_gateway_metrics",
]

DEFAULT_NAMESPACE = "aiocache_llm"

COUNTERS: Mapping[str, str] = {
    "requests": "Resolves started.",
    "exact_hits": "Resolves answered from the exact cache.",
    "semantic_hits": "Resolves answered from the semantic cache.",
    "misses": "Resolves that found nothing in either cache and led the fill.",
    "coalesced": "Resolves that joined a fill already in flight in this process.",
    "fleet_hits": "Fills answered by another process's provider call (Redis lease).",
    "provider_calls": "Provider calls made.",
    "provider_errors": "Provider calls that raised or timed out.",
    "rate_limited": "Provider calls refused by the rate limiter.",
    "backend_errors": "Cache, limiter or lease operations that failed or timed out.",
    "backend_skipped": "Backend operations skipped because a circuit breaker was open.",
    "stream_requests": "Streamed requests started.",
    "stream_hits": "Streams answered by replaying a stored recording.",
    "streams_shared": "Streams that joined one already in flight in this process.",
    "chunks_replayed": "Chunks served from stored recordings.",
    "streams_abandoned": "Provider streams closed early because every consumer had left.",
    "shadow_lookups": "Shadow-mode semantic lookups recorded.",
    "shadow_would_hit": "Shadow lookups the semantic cache would have served.",
    "shadow_refused": "Shadow lookups whose candidate the verifier refused.",
    "shadow_callback_errors": "on_shadow callbacks that raised.",
}
"""``GatewayStats`` field -> help text of its ``<namespace>_gateway_<field>_total`` counter."""

GAUGES: Mapping[str, str] = {
    "in_flight": "Keys with a fill (cache miss being answered) in flight now.",
}
"""``GatewayStats`` field -> help text of its ``<namespace>_gateway_<field>`` gauge."""

LATENCY_QUANTILES: Mapping[str, str] = {
    "0.5": "latency_p50_ms",
    "0.9": "latency_p90_ms",
    "0.99": "latency_p99_ms",
}
"""``quantile`` label -> ``GatewayStats`` field (ms) of the latency gauge."""

# Prometheus metric names allow colons, but they are reserved for recording rules
_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def check_namespace(value: object) -> str:
    """Return a metric-name prefix: letters, digits and ``_``, not starting with a digit."""
    namespace = check_id("namespace", value)
    if not _NAMESPACE.fullmatch(namespace):
        raise InvalidInputError(
            f"namespace must match [a-zA-Z_][a-zA-Z0-9_]* (a Prometheus name), got {namespace!r}"
        )
    return namespace


class GatewayCollector(Collector):
    """A Prometheus collector of the :class:`GatewayStats` of named gateways.

    Usually made by :func:`register_gateway_metrics`; build one yourself to register
    it in a registry by hand (``registry.register(collector)``). ``add``/``remove``
    may be called at any time, also after registration. A scrape is O(gateways) plus
    each ``stats()`` (a sort of the recent latencies).
    """

    def __init__(self, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = check_namespace(namespace)
        self._gateways: dict[str, InferenceGateway] = {}
        # scrapes may come from the exporter's thread while the app adds or removes
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GatewayCollector(namespace={self.namespace!r}, gateways={list(self.names)})"

    @property
    def names(self) -> tuple[str, ...]:
        """The ``gateway`` label of every gateway exported, in registration order."""
        with self._lock:
            return tuple(self._gateways)

    def add(self, name: str, gateway: InferenceGateway) -> None:
        """Export ``gateway``'s stats labelled ``gateway=name``.

        Raises :class:`InvalidInputError` when ``name`` is taken or ``gateway`` is
        already exported under another name (its counters would be summed twice).
        """
        name = check_id("name", name)
        if not isinstance(gateway, InferenceGateway):
            raise InvalidInputTypeError(
                f"gateway must be an InferenceGateway, got {type(gateway).__name__}"
            )
        with self._lock:
            if name in self._gateways:
                raise InvalidInputError(f"a gateway is already exported as name={name!r}")
            for other, registered in self._gateways.items():
                if registered is gateway:
                    raise InvalidInputError(f"this gateway is already exported as name={other!r}")
            self._gateways[name] = gateway

    def remove(self, name: str) -> bool:
        """Stop exporting the gateway called ``name``; return whether one was exported."""
        name = check_id("name", name)
        with self._lock:
            return self._gateways.pop(name, None) is not None

    def describe(self) -> Iterable[Metric]:
        """The metric families without samples: lets a registry check names without a scrape."""
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        """Read every gateway's stats now and return them as metric families."""
        with self._lock:
            gateways = list(self._gateways.items())
        return self._families({name: gateway.stats() for name, gateway in gateways})

    def _families(self, snapshots: Mapping[str, GatewayStats]) -> list[Metric]:
        prefix = f"{self.namespace}_gateway_"
        families: list[Metric] = []
        for field, documentation in COUNTERS.items():
            counter = CounterMetricFamily(prefix + field, documentation, labels=["gateway"])
            for name, stats in snapshots.items():
                counter.add_metric([name], getattr(stats, field))
            families.append(counter)
        for field, documentation in GAUGES.items():
            gauge = GaugeMetricFamily(prefix + field, documentation, labels=["gateway"])
            for name, stats in snapshots.items():
                gauge.add_metric([name], getattr(stats, field))
            families.append(gauge)
        latency = GaugeMetricFamily(
            prefix + "latency_seconds",
            "Resolve latency percentiles over the gateway's recent resolves.",
            labels=["gateway", "quantile"],
        )
        for name, stats in snapshots.items():
            for quantile, field in LATENCY_QUANTILES.items():
                latency.add_metric([name, quantile], getattr(stats, field) / 1000)
        families.append(latency)
        return families


# one collector per (registry, namespace); a registry that is dropped takes its own along
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, GatewayCollector]] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register_gateway_metrics(
    gateway: InferenceGateway,
    *,
    registry: CollectorRegistry = REGISTRY,
    name: str = "default",
    namespace: str = DEFAULT_NAMESPACE,
) -> GatewayCollector:
    """Export ``gateway``'s stats from ``registry``, labelled ``gateway=name``.

    Returns the collector serving ``namespace`` in ``registry`` (created and
    registered on first use, shared by the gateways registered after). Undo with
    :func:`unregister_gateway_metrics`. Raises :class:`InvalidInputTypeError` /
    :class:`InvalidInputError` for a bad argument, a ``name`` already taken, a
    gateway already exported, or a registry that already has other metrics of the
    same names; nothing is registered then.
    """
    if not isinstance(gateway, InferenceGateway):
        raise InvalidInputTypeError(
            f"gateway must be an InferenceGateway, got {type(gateway).__name__}"
        )
    if not isinstance(registry, CollectorRegistry):
        raise InvalidInputTypeError(
            f"registry must be a prometheus_client CollectorRegistry, got {type(registry).__name__}"
        )
    name = check_id("name", name)
    namespace = check_namespace(namespace)
    with _collectors_lock:
        by_namespace = _collectors.get(registry, {})
        collector = by_namespace.get(namespace)
        if collector is not None:
            collector.add(name, gateway)
            return collector
        collector = GatewayCollector(namespace=namespace)
        collector.add(name, gateway)
        try:
            registry.register(collector)
        except ValueError as exc:
            raise InvalidInputError(
                f"registry already has metrics named like {namespace}_gateway_*: {exc}"
            ) from exc
        by_namespace[namespace] = collector
        _collectors[registry] = by_namespace
        return collector


def unregister_gateway_metrics(
    name: str = "default",
    *,
    registry: CollectorRegistry = REGISTRY,
    namespace: str = DEFAULT_NAMESPACE,
) -> bool:
    """Stop exporting the gateway registered as ``name``; return whether there was one.

    The last gateway of a namespace takes its collector out of the registry, so the
    metric names are free again.
    """
    if not isinstance(registry, CollectorRegistry):
        raise InvalidInputTypeError(
            f"registry must be a prometheus_client CollectorRegistry, got {type(registry).__name__}"
        )
    name = check_id("name", name)
    namespace = check_namespace(namespace)
    with _collectors_lock:
        by_namespace = _collectors.get(registry, {})
        collector = by_namespace.get(namespace)
        if collector is None or not collector.remove(name):
            return False
        if not collector.names:
            registry.unregister(collector)
            del by_namespace[namespace]
        return True
