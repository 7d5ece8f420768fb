"""No prompt or answer text ever reaches the logs.

Each scenario drives the library through one family of events (hits and misses,
coalescing across "processes", provider errors and timeouts, dead backends and
circuit breakers, refused values, rate limiting, corrupt entries, chat memory) with
every prompt and answer carrying a unique marker, while every logger records at
DEBUG. No record at INFO or above may contain a marker, and neither may any DEBUG
record: debug logs get shipped too. Exceptions raised to the caller may carry text
(the caller owns it); what is checked is what the library writes to the logs,
tracebacks of logged exceptions included.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from aiocache_llm import (
    InferenceGateway,
    MemoryChatMemory,
    MemoryExactCache,
    MemoryRateLimiter,
    MemorySemanticCache,
    RateLimitConfig,
    RateLimitExceeded,
    RedisChatMemory,
    RedisExactCache,
    RedisRateLimiter,
    RedisSemanticCache,
    cached_completion,
)
from aiocache_llm.embedders import HashingEmbedder
from tests.support.redis_server import free_port

pytestmark = pytest.mark.timeout(60)

_FORMAT = logging.Formatter("%(name)s %(levelname)s %(message)s")


class Marks:
    """Hands out unique marker texts and remembers them all."""

    def __init__(self) -> None:
        self.all: list[str] = []

    def __call__(self, kind: str) -> str:
        marker = f"{kind}-MARKER-{uuid.uuid4().hex[:12]}"
        self.all.append(marker)
        return marker

    def query(self) -> dict[str, Any]:
        return {
            "model": "m",
            "messages": [
                {"role": "system", "content": f"system {self('SYSTEM')}"},
                {"role": "user", "content": f"what about {self('PROMPT')} today"},
            ],
        }


class MarkedProvider:
    """Answers with a fresh marker per call; fails or stalls on demand."""

    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self.calls = 0
        self.fail = False
        self.stall = 0.0

    async def __call__(self, query: Any) -> str:
        self.calls += 1
        if self.stall:
            await asyncio.sleep(self.stall)
        if self.fail:
            # a provider error quoting the prompt, as real SDK errors sometimes do
            raise RuntimeError(f"upstream rejected {query!r}")
        return f"answer {self.marks('ANSWER')} to {query['messages'][-1]['content']}"


def _dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


def _fake() -> Redis:
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


async def hits_and_misses(marks: Marks) -> None:
    provider = MarkedProvider(marks)
    embed = HashingEmbedder(dimension=64)
    async with InferenceGateway(
        provider,
        semantic_cache=MemorySemanticCache(embed, similarity_threshold=0.5, embed_in_thread=False),
    ) as gateway:
        query = marks.query()
        await gateway.resolve(query)
        await gateway.resolve(query)  # exact hit
        paraphrase = {
            **query,
            "messages": [
                *query["messages"][:-1],
                {"role": "user", "content": query["messages"][-1]["content"] + "?"},
            ],
        }
        await gateway.resolve(paraphrase)  # semantic hit
        await gateway.resolve(marks.query(), no_cache=True, no_store=True, ttl_seconds=1)
        await gateway.warm([marks.query() for _ in range(3)])
    assert provider.calls == 5

    @cached_completion()
    async def complete(prompt: str) -> str:
        return f"decorated {marks('ANSWER')} for {prompt}"

    prompt = marks("PROMPT")
    assert await complete(prompt) == await complete(prompt)
    await complete.gateway.aclose()


async def redis_caches_and_fleet(marks: Marks) -> None:
    client = _fake()
    provider = MarkedProvider(marks)
    provider.stall = 0.05
    embed = HashingEmbedder(dimension=64)
    gateways = [
        InferenceGateway(
            provider,
            exact_cache=RedisExactCache(client=client, key_prefix="p:x", max_size=10),
            semantic_cache=RedisSemanticCache(
                embed, client=client, key_prefix="p:s", embed_in_thread=False
            ),
            backend_timeout=5,
        )
        for _ in range(2)  # two processes, in effect: the second waits on the lease
    ]
    query = marks.query()
    await asyncio.gather(*(g.resolve(query) for g in gateways))
    await gateways[1].resolve(query)
    assert provider.calls == 1
    # a foreign entry, carrying text, planted under the key of a query: a counted miss
    other = marks.query()
    cache = gateways[0].exact_cache
    assert isinstance(cache, RedisExactCache)
    await client.set(cache.key(other), f"acl\x01m{marks('STORED')}\n{{}}".encode())
    await gateways[0].resolve(other)
    for gateway in gateways:
        await gateway.aclose()
    await client.aclose()


async def provider_errors_and_timeouts(marks: Marks) -> None:
    provider = MarkedProvider(marks)
    provider.fail = True
    async with InferenceGateway(provider, provider_timeout=0.05) as gateway:
        query = marks.query()
        results = await asyncio.gather(
            *(gateway.resolve(query) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        provider.fail, provider.stall = False, 1.0
        with pytest.raises(TimeoutError):
            await gateway.resolve(marks.query())


async def dead_backends_and_breakers(marks: Marks) -> None:
    url = _dead_url()
    provider = MarkedProvider(marks)
    exact = RedisExactCache(url=url)
    semantic = RedisSemanticCache(HashingEmbedder(dimension=16), url=url, embed_in_thread=False)
    limiter = RedisRateLimiter(url=url, config=RateLimitConfig(1000))
    gateway = InferenceGateway(
        provider,
        exact_cache=exact,
        semantic_cache=semantic,
        rate_limiter=limiter,
        backend_timeout=0.5,
        breaker_threshold=2,
        breaker_reset_after=0.05,
    )
    async with exact, semantic, limiter, gateway:
        for _ in range(4):  # open, skip, half-open probe, open again
            await gateway.resolve(marks.query(), user_id=marks("USER"))
            await asyncio.sleep(0.06)
        assert gateway.stats().backend_errors > 0
    memory = RedisChatMemory(url=url)
    async with memory:
        with pytest.raises(Exception, match="append"):
            await memory.append("conv", "user", marks("CHAT"))


async def refused_values(marks: Marks) -> None:
    big = MarkedProvider(marks)
    for cache in (
        MemoryExactCache(max_value_bytes=32),
        RedisExactCache(client=_fake(), max_value_bytes=32),
    ):
        async with cache, InferenceGateway(big, exact_cache=cache) as gateway:
            await gateway.resolve(marks.query())  # the answer is too large to cache

    async def unstorable(query: Any) -> Any:
        return {marks("ANSWER"): {1, 2}}  # a set: not JSON

    async with InferenceGateway(unstorable) as gateway:
        await gateway.resolve(marks.query())


async def rate_limiting(marks: Marks) -> None:
    provider = MarkedProvider(marks)
    for limiter in (
        MemoryRateLimiter(RateLimitConfig(200)),
        RedisRateLimiter(client=_fake(), config=RateLimitConfig(200)),
    ):
        async with limiter, InferenceGateway(provider, rate_limiter=limiter) as gateway:
            user = marks("USER")
            refused = 0
            for _ in range(50):
                try:
                    await gateway.resolve(marks.query(), user_id=user)
                except RateLimitExceeded:
                    refused += 1
            assert refused > 0


async def chat_memories(marks: Marks) -> None:
    client = _fake()
    for memory in (MemoryChatMemory(), RedisChatMemory(client=client, key_prefix="c")):
        async with memory:
            conv = marks("CONV")
            await memory.append(conv, "user", marks("CHAT"))
            await memory.append(conv, "assistant", [{"type": "text", "text": marks("CHAT")}])
            await memory.get_history(conv)
            await memory.clear(conv)
    async with RedisChatMemory(client=client, key_prefix="c") as memory:
        await client.rpush("c:conv", f"not a message {marks('STORED')}")
        with pytest.raises(Exception, match="position 0"):
            await memory.get_history("conv")
    await client.aclose()


async def failing_embedder(marks: Marks) -> None:
    good = HashingEmbedder(dimension=16)

    def embed(text: str) -> Any:
        if "MARKER" in text:
            # an embedding service error quoting its input, as real ones sometimes do
            raise ValueError(f"cannot embed {text!r}")
        return good(text)

    def ask(text: str) -> dict[str, Any]:
        return {"model": "m", "messages": [{"role": "user", "content": text}]}

    semantic = MemorySemanticCache(embed, embed_in_thread=False)
    await semantic.put(ask("seed"), "seed")  # the scope has an entry: lookups embed
    provider = MarkedProvider(marks)
    async with InferenceGateway(provider, semantic_cache=semantic, breaker_threshold=2) as gateway:
        for _ in range(3):  # failures, then the breaker opens
            await gateway.resolve(ask(f"tell me {marks('PROMPT')}"))
        assert gateway.stats().backend_errors >= 2


# name -> (scenario, whether it must log something: else the check proves nothing)
SCENARIOS: dict[str, tuple[Callable[[Marks], Awaitable[None]], bool]] = {
    "hits-and-misses": (hits_and_misses, False),
    "redis-caches-and-fleet": (redis_caches_and_fleet, False),
    "provider-errors": (provider_errors_and_timeouts, False),
    "dead-backends": (dead_backends_and_breakers, True),
    "refused-values": (refused_values, True),
    "rate-limiting": (rate_limiting, False),
    "chat-memory": (chat_memories, False),
    "failing-embedder": (failing_embedder, True),
}


def _leaks(records: list[logging.LogRecord], markers: list[str], below: int) -> list[str]:
    found = []
    for record in records:
        if record.levelno < below:
            continue
        text = _FORMAT.format(record)  # with the traceback of a logged exception
        if any(marker in text for marker in markers):
            found.append(text)
    return found


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_no_prompt_or_answer_text_is_logged(
    scenario: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    marks = Marks()
    run, logs = SCENARIOS[scenario]
    await run(marks)
    assert len(marks.all) >= 3, "the scenario used marked texts"
    if logs:
        assert any(r.name.startswith("aiocache_llm") for r in caplog.records)
    assert _leaks(caplog.records, marks.all, logging.INFO) == []
    assert _leaks(caplog.records, marks.all, logging.DEBUG) == []
