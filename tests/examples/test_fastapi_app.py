"""examples/fastapi_app.py under a real uvicorn server, hit by a burst of identical requests."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from examples.fastapi_app import app
from tests.conftest import RedisTarget

BURST = 200
ENV = ("REDIS_URL", "KEY_PREFIX", "FAKE_LLM_LATENCY", "RATE_LIMIT_TOKENS_PER_MINUTE")
REQUEST = {
    "model": "demo-model",
    "messages": [{"role": "user", "content": "Why is the sky blue?"}],
    "temperature": 0.0,
}

pytestmark = pytest.mark.timeout(30)


@asynccontextmanager
async def serve_app(
    monkeypatch: pytest.MonkeyPatch, **env: str
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the example app on a free loopback port; yield a client pointed at it."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # bound here and handed over, so the port is known and never raced for
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        # uvicorn exposes no startup event, only this flag
        started_by = time.monotonic() + 10
        while not server.started:
            if serving.done() or time.monotonic() > started_by:
                raise RuntimeError("the example app did not start")
            await asyncio.sleep(0.01)
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10
        ) as client:
            yield client
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def burst(client: httpx.AsyncClient) -> tuple[list[httpx.Response], float]:
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(
            client.post("/v1/chat", json=REQUEST, headers={"x-user-id": f"u{i}"})
            for i in range(BURST)
        )
    )
    return responses, time.perf_counter() - started


def assert_one_answer_for_all(responses: list[httpx.Response]) -> dict[str, Any]:
    assert [r.status_code for r in responses] == [200] * BURST
    answers = [r.json() for r in responses]
    assert all(answer == answers[0] for answer in answers)
    assert answers[0]["content"] == "You asked: Why is the sky blue?"
    assert answers[0]["model"] == "demo-model"
    return answers[0]


def scraped_provider_calls(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aiocache_llm_gateway_provider_calls_total":
                return sample.value
    raise AssertionError("provider_calls counter missing from /metrics")


async def test_a_burst_of_identical_requests_makes_one_provider_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve_app(monkeypatch, FAKE_LLM_LATENCY="0.5") as client:
        responses, elapsed = await burst(client)
        assert_one_answer_for_all(responses)
        stats = (await client.get("/stats")).json()
        metrics = (await client.get("/metrics")).text

    assert stats["backend"] == "memory"
    assert stats["provider_calls"] == 1
    gateway = stats["gateway"]
    assert gateway["requests"] == BURST
    assert gateway["provider_calls"] == 1
    # the others either joined the call in flight or, arriving after it, hit the cache
    assert gateway["coalesced"] + gateway["exact_hits"] == BURST - 1
    assert gateway["coalesced"] > 0
    assert scraped_provider_calls(metrics) == 1
    print(f"\nmemory: {BURST} requests -> 1 provider call in {elapsed:.2f} s")


@pytest.mark.redis
async def test_with_redis_the_answer_is_shared_and_survives_a_restart(
    monkeypatch: pytest.MonkeyPatch, real_redis: RedisTarget
) -> None:
    assert real_redis.url is not None
    env = {
        "REDIS_URL": real_redis.url,
        "KEY_PREFIX": real_redis.prefix,
        "FAKE_LLM_LATENCY": "0.5",
    }
    async with serve_app(monkeypatch, **env) as client:
        responses, elapsed = await burst(client)
        answer = assert_one_answer_for_all(responses)
        stats = (await client.get("/stats")).json()

    assert stats["backend"] == "redis"
    assert stats["provider_calls"] == 1
    assert stats["gateway"]["requests"] == BURST
    assert stats["gateway"]["coalesced"] + stats["gateway"]["exact_hits"] == BURST - 1
    assert stats["gateway"]["backend_errors"] == 0
    stored = [key async for key in real_redis.client.scan_iter(match=f"{real_redis.prefix}:*")]
    assert stored, "the answer was not written under KEY_PREFIX"
    print(f"\nredis: {BURST} requests -> 1 provider call in {elapsed:.2f} s")

    # a new process (here: a new app lifespan) finds the answer in Redis
    async with serve_app(monkeypatch, **env) as client:
        again = await client.post("/v1/chat", json=REQUEST)
        restarted = (await client.get("/stats")).json()
    assert again.status_code == 200
    assert again.json() == answer
    assert restarted["provider_calls"] == 0
    assert restarted["gateway"]["exact_hits"] == 1


async def test_a_user_over_budget_gets_429_and_costs_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve_app(monkeypatch, RATE_LIMIT_TOKENS_PER_MINUTE="1") as client:
        refused = await client.post("/v1/chat", json=REQUEST, headers={"x-user-id": "alice"})
        empty_user = await client.post("/v1/chat", json=REQUEST, headers={"x-user-id": ""})
        stats = (await client.get("/stats")).json()
    assert refused.status_code == 429
    assert empty_user.status_code == 422
    assert "user_id" in empty_user.json()["detail"]
    assert stats["provider_calls"] == 0
    assert stats["gateway"]["rate_limited"] == 1


async def read_events(client: httpx.AsyncClient, **headers: str) -> tuple[int, list[str]]:
    """POST a streaming request; return the status and the ``data:`` payloads in order."""
    async with client.stream("POST", "/v1/chat/stream", json=REQUEST, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, []
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [
            line.removeprefix("data: ")
            async for line in response.aiter_lines()
            if line.startswith("data: ")
        ]
    return response.status_code, data


def streamed_text(data: list[str]) -> str:
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    return "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])


async def test_concurrent_sse_streams_share_one_provider_stream_then_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve_app(monkeypatch, FAKE_LLM_LATENCY="0.5") as client:
        results = await asyncio.gather(*(read_events(client) for _ in range(50)))
        replayed = await read_events(client)
        stats = (await client.get("/stats")).json()
    assert all(status == 200 for status, _ in results)
    assert {streamed_text(data) for _, data in results} == {"You asked: Why is the sky blue?"}
    assert replayed[1] == results[0][1]
    assert stats["provider_calls"] == 1
    gateway = stats["gateway"]
    assert gateway["stream_requests"] == 51
    assert gateway["streams_shared"] + gateway["stream_hits"] == 50
    assert gateway["stream_hits"] >= 1


async def test_a_streaming_user_over_budget_gets_429_before_any_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve_app(monkeypatch, RATE_LIMIT_TOKENS_PER_MINUTE="1") as client:
        status, data = await read_events(client, **{"x-user-id": "alice"})
        stats = (await client.get("/stats")).json()
    assert (status, data) == (429, [])
    assert stats["provider_calls"] == 0


async def test_a_request_that_cannot_be_keyed_is_a_422_not_a_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # an integer beyond 64 bits cannot be keyed: a type error, caught as bad input
    unkeyable = {**REQUEST, "seed": 1234567890123456789012345678901}
    async with serve_app(monkeypatch) as client:
        plain = await client.post("/v1/chat", json=unkeyable)
        streamed = await client.post("/v1/chat/stream", json=unkeyable)
    assert (plain.status_code, streamed.status_code) == (422, 422)
    assert "JSON-serializable" in plain.json()["detail"]
