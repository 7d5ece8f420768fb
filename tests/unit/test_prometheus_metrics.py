"""Prometheus export of the gateway's stats: read at scrape time, labelled, optional."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aiocache_llm import GatewayStats, InferenceGateway, InvalidInputError, InvalidInputTypeError
from aiocache_llm.metrics.prometheus import (
    COUNTERS,
    GAUGES,
    LATENCY_QUANTILES,
    GatewayCollector,
    register_gateway_metrics,
    unregister_gateway_metrics,
)

ROOT = Path(__file__).resolve().parents[2]


class Provider:
    """Answers ``echo: <query>``; ``gate`` holds calls back; ``fail`` makes them raise."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, query: Any) -> str:
        self.calls += 1
        await self.gate.wait()
        if query == "fail":
            raise RuntimeError("provider down")
        return f"echo: {query}"


@pytest.fixture
async def provider() -> Provider:
    return Provider()


@pytest.fixture
async def gateway(provider: Provider) -> AsyncIterator[InferenceGateway]:
    async with InferenceGateway(provider) as gateway:
        yield gateway


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the text exposition, keyed by (sample name, labels)."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def family_types(registry: CollectorRegistry) -> dict[str, str]:
    text = generate_latest(registry).decode()
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def run_scenario(gateway: InferenceGateway, provider: Provider) -> None:
    """3 resolves of one query, 5 concurrent of another, 1 provider failure: 9 requests."""
    for _ in range(3):
        assert await gateway.resolve("capital of France?") == "echo: capital of France?"
    provider.gate.clear()
    pending = [asyncio.ensure_future(gateway.resolve("capital of Spain?")) for _ in range(5)]
    await asyncio.sleep(0)
    provider.gate.set()
    assert await asyncio.gather(*pending) == ["echo: capital of Spain?"] * 5
    with pytest.raises(RuntimeError, match="provider down"):
        await gateway.resolve("fail")


async def test_scrape_reports_the_counts_of_real_resolves(
    gateway: InferenceGateway, provider: Provider
) -> None:
    registry = CollectorRegistry()
    register_gateway_metrics(gateway, registry=registry)
    await run_scenario(gateway, provider)

    samples = scrape(registry)
    ns = "aiocache_llm_gateway_"
    expected = {
        "requests": 9,
        "exact_hits": 2,
        "misses": 3,
        "coalesced": 4,
        "provider_calls": provider.calls,
        "provider_errors": 1,
        "semantic_hits": 0,
        "fleet_hits": 0,
        "rate_limited": 0,
        "backend_errors": 0,
        "backend_skipped": 0,
    }
    assert provider.calls == 3
    for field, count in expected.items():
        assert value(samples, f"{ns}{field}_total", gateway="default") == count, field
    assert value(samples, f"{ns}in_flight", gateway="default") == 0

    stats = gateway.stats()
    latencies = [
        value(samples, f"{ns}latency_seconds", gateway="default", quantile=q)
        for q in LATENCY_QUANTILES
    ]
    assert latencies == [
        pytest.approx(getattr(stats, field) / 1000) for field in LATENCY_QUANTILES.values()
    ]
    assert 0 < latencies[0] <= latencies[1] <= latencies[2]  # type: ignore[operator]


async def test_counters_are_counters_and_gauges_are_gauges(gateway: InferenceGateway) -> None:
    registry = CollectorRegistry()
    register_gateway_metrics(gateway, registry=registry, namespace="llm")
    types = family_types(registry)
    assert {f"llm_gateway_{field}": "counter" for field in COUNTERS}.items() <= types.items()
    assert types["llm_gateway_in_flight"] == "gauge"
    assert types["llm_gateway_latency_seconds"] == "gauge"
    text = generate_latest(registry).decode()
    assert 'llm_gateway_requests_total{gateway="default"} 0.0' in text


def test_every_gateway_stat_is_exported() -> None:
    exported = set(COUNTERS) | set(GAUGES) | set(LATENCY_QUANTILES.values())
    assert exported == set(GatewayStats.model_fields)


async def test_values_are_read_at_scrape_time(
    gateway: InferenceGateway, provider: Provider
) -> None:
    registry = CollectorRegistry()
    register_gateway_metrics(gateway, registry=registry)
    name = "aiocache_llm_gateway_requests_total"
    assert registry.get_sample_value(name, {"gateway": "default"}) == 0
    await gateway.resolve("hello")
    await gateway.resolve("hello")
    assert registry.get_sample_value(name, {"gateway": "default"}) == 2
    assert (
        registry.get_sample_value("aiocache_llm_gateway_exact_hits_total", {"gateway": "default"})
        == 1
    )


async def test_in_flight_is_a_live_gauge(gateway: InferenceGateway, provider: Provider) -> None:
    registry = CollectorRegistry()
    register_gateway_metrics(gateway, registry=registry)
    provider.gate.clear()
    pending = [asyncio.ensure_future(gateway.resolve(q)) for q in ("a", "b", "b")]
    await asyncio.sleep(0)
    sample = ("aiocache_llm_gateway_in_flight", {"gateway": "default"})
    assert registry.get_sample_value(*sample) == 2
    provider.gate.set()
    await asyncio.gather(*pending)
    await asyncio.sleep(0)
    assert registry.get_sample_value(*sample) == 0


async def test_two_gateways_are_told_apart_by_label(provider: Provider) -> None:
    registry = CollectorRegistry()
    async with InferenceGateway(provider) as chat, InferenceGateway(provider) as embed:
        first = register_gateway_metrics(chat, registry=registry, name="chat")
        second = register_gateway_metrics(embed, registry=registry, name="embed")
        assert first is second
        assert first.names == ("chat", "embed")
        await chat.resolve("one")
        await chat.resolve("two")
        await embed.resolve("three")

        samples = scrape(registry)
        requests = "aiocache_llm_gateway_requests_total"
        assert value(samples, requests, gateway="chat") == 2
        assert value(samples, requests, gateway="embed") == 1

        assert unregister_gateway_metrics("chat", registry=registry)
        samples = scrape(registry)
        assert value(samples, requests, gateway="chat") is None
        assert value(samples, requests, gateway="embed") == 1

        assert unregister_gateway_metrics("embed", registry=registry)
        # the last one out takes the collector along: the names are free again
        assert "aiocache_llm_gateway" not in generate_latest(registry).decode()
        assert not unregister_gateway_metrics("embed", registry=registry)
        register_gateway_metrics(embed, registry=registry, name="embed")
        assert scrape(registry)[(requests, frozenset({("gateway", "embed")}))] == 1


async def test_namespaces_are_separate_collectors(gateway: InferenceGateway) -> None:
    registry = CollectorRegistry()
    first = register_gateway_metrics(gateway, registry=registry, namespace="svc_a")
    second = register_gateway_metrics(gateway, registry=registry, namespace="svc_b")
    assert first is not second
    assert registry.get_sample_value("svc_a_gateway_requests_total", {"gateway": "default"}) == 0
    assert registry.get_sample_value("svc_b_gateway_requests_total", {"gateway": "default"}) == 0


async def test_default_registry(gateway: InferenceGateway) -> None:
    name = "test-default-registry"
    register_gateway_metrics(gateway, name=name)
    try:
        await gateway.resolve("x")
        sample = REGISTRY.get_sample_value("aiocache_llm_gateway_requests_total", {"gateway": name})
        assert sample == 1
    finally:
        assert unregister_gateway_metrics(name)
    assert (
        REGISTRY.get_sample_value("aiocache_llm_gateway_requests_total", {"gateway": name}) is None
    )


async def test_a_collector_registered_by_hand(gateway: InferenceGateway) -> None:
    registry = CollectorRegistry()
    collector = GatewayCollector(namespace="manual")
    registry.register(collector)
    assert registry.get_sample_value("manual_gateway_requests_total", {"gateway": "g"}) is None
    collector.add("g", gateway)
    await gateway.resolve("x")
    assert registry.get_sample_value("manual_gateway_requests_total", {"gateway": "g"}) == 1
    assert "manual" in repr(collector)
    assert "'g'" in repr(collector)
    assert collector.remove("g")
    assert not collector.remove("g")


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"name": ""}, InvalidInputError, "name"),
        ({"name": 3}, InvalidInputTypeError, "name"),
        ({"namespace": ""}, InvalidInputError, "namespace"),
        ({"namespace": "9lives"}, InvalidInputError, "namespace"),
        ({"namespace": "has-dash"}, InvalidInputError, "namespace"),
        ({"namespace": "co:lon"}, InvalidInputError, "namespace"),
        ({"registry": object()}, InvalidInputTypeError, "registry"),
    ],
)
async def test_bad_arguments_register_nothing(
    gateway: InferenceGateway, kwargs: dict[str, Any], error: type[Exception], argument: str
) -> None:
    registry = kwargs.setdefault("registry", CollectorRegistry())
    with pytest.raises(error, match=argument):
        register_gateway_metrics(gateway, **kwargs)
    if isinstance(registry, CollectorRegistry):
        assert generate_latest(registry) == b""


async def test_not_a_gateway_is_refused() -> None:
    registry = CollectorRegistry()
    with pytest.raises(InvalidInputTypeError, match="gateway"):
        register_gateway_metrics(object(), registry=registry)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputTypeError, match="gateway"):
        GatewayCollector().add("x", object())  # type: ignore[arg-type]
    assert generate_latest(registry) == b""


async def test_unregister_bad_arguments(gateway: InferenceGateway) -> None:
    registry = CollectorRegistry()
    register_gateway_metrics(gateway, registry=registry)
    with pytest.raises(InvalidInputError, match="name"):
        unregister_gateway_metrics("", registry=registry)
    with pytest.raises(InvalidInputTypeError, match="registry"):
        unregister_gateway_metrics(registry=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="namespace"):
        unregister_gateway_metrics(registry=registry, namespace="a b")
    # still registered after the refusals
    assert (
        registry.get_sample_value("aiocache_llm_gateway_requests_total", {"gateway": "default"})
        == 0
    )
    assert not unregister_gateway_metrics("other", registry=registry)
    assert not unregister_gateway_metrics(registry=registry, namespace="elsewhere")


async def test_a_taken_name_or_a_gateway_twice_is_refused_and_changes_nothing(
    gateway: InferenceGateway, provider: Provider
) -> None:
    registry = CollectorRegistry()
    collector = register_gateway_metrics(gateway, registry=registry, name="chat")
    async with InferenceGateway(provider) as other:
        with pytest.raises(InvalidInputError, match="'chat'"):
            register_gateway_metrics(other, registry=registry, name="chat")
        with pytest.raises(InvalidInputError, match="already exported as name='chat'"):
            register_gateway_metrics(gateway, registry=registry, name="again")
    assert collector.names == ("chat",)
    await gateway.resolve("x")
    assert (
        registry.get_sample_value("aiocache_llm_gateway_requests_total", {"gateway": "chat"}) == 1
    )


async def test_a_name_clash_with_other_metrics_registers_nothing(
    gateway: InferenceGateway,
) -> None:
    registry = CollectorRegistry()
    Counter("aiocache_llm_gateway_requests", "someone else's", registry=registry)
    with pytest.raises(InvalidInputError, match="already has metrics"):
        register_gateway_metrics(gateway, registry=registry)
    # a later attempt under a free namespace works: the failed one left nothing behind
    register_gateway_metrics(gateway, registry=registry, namespace="free")
    assert registry.get_sample_value("free_gateway_requests_total", {"gateway": "default"}) == 0
    assert not unregister_gateway_metrics(registry=registry)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_package_imports_without_prometheus_client() -> None:
    result = run_python(
        "import sys\n"
        "sys.modules['prometheus_client'] = None  # as if not installed\n"
        "import aiocache_llm, aiocache_llm.metrics\n"
        "print(aiocache_llm.InferenceGateway.__name__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "InferenceGateway"


def test_the_prometheus_module_names_the_extra_when_it_is_missing() -> None:
    result = run_python(
        "import sys\n"
        "sys.modules['prometheus_client'] = None  # as if not installed\n"
        "try:\n"
        "    import aiocache_llm.metrics.prometheus\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'aiocache_llm[prometheus]'" in result.stdout
