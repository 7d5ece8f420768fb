"""A steady load of concurrent resolves through a full Redis-backed gateway, for fault tests.

:class:`Stack` is the gateway a production app would build on one Redis (exact cache,
semantic cache with :class:`HashingEmbedder`, rate limiter), with short timeouts so
that faults resolve within seconds. :class:`Load` runs workers that each resolve
queries in a loop: repeated ones (a hot set), paraphrases of them, distinct ones,
and a few the provider refuses. Every outcome is checked as it happens.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from aiocache_llm import (
    GatewayStats,
    HashingEmbedder,
    InferenceGateway,
    RateLimitConfig,
    RedisExactCache,
    RedisRateLimiter,
    RedisSemanticCache,
)
from benchmarks.probes import Resources, snapshot

_VOCABULARY = """
amber basin cedar delta ember fjord glade harbor island jungle kelp lagoon meadow nectar
oasis prairie quarry river savanna tundra upland valley willow yarrow zephyr anchor beacon
compass drift estuary ferry gull hull inlet jetty keel lighthouse mast nautical oar pier
quay rudder sail tide undertow vessel wharf
"""
WORDS = tuple(_VOCABULARY.split())


class ProviderRefused(Exception):
    """The stand-in provider's own error: the "clear provider error" a caller may get."""


class LoadProvider:
    """Answers ``answer:<last message>`` after 10-50 ms; refuses messages starting "refuse"."""

    def __init__(self, latency: tuple[float, float] = (0.01, 0.05), seed: int = 7) -> None:
        self.latency = latency
        self.calls = 0
        self._random = random.Random(seed)

    async def __call__(self, query: Any) -> str:
        self.calls += 1
        await asyncio.sleep(self._random.uniform(*self.latency))
        text = str(query["messages"][-1]["content"])
        if text.startswith("refuse"):
            raise ProviderRefused("the provider refused this request")
        return f"answer:{text}"


@dataclass(frozen=True)
class Settings:
    """The timeouts a fault test runs with, and the worst resolve time they imply."""

    backend_timeout: float = 0.25
    semantic_timeout: float = 0.25
    limiter_timeout: float = 0.25
    breaker_reset_after: float = 0.5
    lease_seconds: float = 1.0
    fleet_max_wait: float = 1.5
    provider_latency: tuple[float, float] = (0.01, 0.05)

    @property
    def worst_resolve(self) -> float:
        """The longest one resolve can take while Redis misbehaves, in seconds.

        One resolve runs, one after the other, each bounded by its guard: exact get
        (T_b), semantic get (T_s), fleet subscription check (T_b), then as a waiter
        at most ``fleet_max_wait`` (W) plus the lease attempt and lookup of its
        last round and the lookup after a notification (3 T_b), then the
        computation: as leader a lookup and the release (2 T_b) around rate limit
        (T_l, the limiter's own deadline), provider (P), exact put (T_b) and
        semantic put (T_s). Callers coalesced on another's flight wait for that
        flight, which started before them, plus their own exact get: no more.
        Sum: 8 T_b + 2 T_s + T_l + W + P.
        """
        return (
            8 * self.backend_timeout
            + 2 * self.semantic_timeout
            + self.limiter_timeout
            + self.fleet_max_wait
            + self.provider_latency[1]
        )


class Stack:
    """Gateway, caches and limiter on one Redis ``url``, each with its own client (as in an app)."""

    def __init__(self, url: str, settings: Settings, *, prefix: str = "rel") -> None:
        self.settings = settings
        self.provider = LoadProvider(settings.provider_latency)
        self.exact = RedisExactCache(url=url, key_prefix=f"{prefix}:exact")
        self.semantic = RedisSemanticCache(
            HashingEmbedder(),
            url=url,
            key_prefix=f"{prefix}:semantic",
            embed_in_thread=False,
        )
        self.limiter = RedisRateLimiter(
            url=url,
            key_prefix=f"{prefix}:limit",
            config=RateLimitConfig(10**9),
            operation_timeout=settings.limiter_timeout,
            breaker_reset_after=settings.breaker_reset_after,
        )
        self.gateway = InferenceGateway(
            self.provider,
            exact_cache=self.exact,
            semantic_cache=self.semantic,
            rate_limiter=self.limiter,
            backend_timeout=settings.backend_timeout,
            semantic_timeout=settings.semantic_timeout,
            breaker_reset_after=settings.breaker_reset_after,
            lease_seconds=settings.lease_seconds,
            fleet_max_wait=settings.fleet_max_wait,
        )
        self.observer = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    @property
    def clients(self) -> list[Redis]:
        return [self.exact.client, self.semantic.client, self.limiter.client]

    async def resources(self) -> Resources:
        return await snapshot(self.clients, self.observer)

    async def aclose(self) -> None:
        await self.gateway.aclose()
        for resource in (self.exact, self.semantic, self.limiter):
            await resource.aclose()
        await self.observer.aclose()


def message(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def words_of(text: str) -> tuple[str, ...]:
    """The words of ``text`` whatever their order, case and punctuation."""
    return tuple(sorted(re.findall(r"[^\W_]+", text.lower())))


@dataclass
class Outcomes:
    """What the load's requests got, and how long the slowest took."""

    latencies: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    def summary(self) -> str:
        latencies = sorted(self.latencies)
        p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0
        return (
            f"{self.requests} requests {dict(self.kinds)}, p99 {p99 * 1000:.0f} ms, "
            f"worst {self.worst * 1000:.0f} ms"
        )


class Load:
    """``workers`` coroutines resolving a mix of queries until stopped.

    The mix, per request: 50 % one of ``hot`` repeated queries, 15 % a paraphrase of
    one (same words, other order and case), 33 % a query never asked before, 2 % one
    the provider refuses. Each worker thinks 10-40 ms between requests.
    """

    def __init__(self, stack: Stack, *, workers: int = 50, hot: int = 40, seed: int = 1) -> None:
        self.stack = stack
        self.workers = workers
        rng = random.Random(seed)
        self.hot = [" ".join(rng.sample(WORDS, 6)) for _ in range(hot)]
        self.outcomes = Outcomes()
        self.marks: dict[str, tuple[float, GatewayStats, int]] = {}
        self._seed = seed
        self._runs = 0
        self._unique = 0
        self._stop = asyncio.Event()

    def hot_queries(self) -> list[dict[str, Any]]:
        return [message(text) for text in self.hot]

    def mark(self, label: str) -> None:
        """Remember the gateway's stats and the provider's calls at this moment."""
        stats = self.stack.gateway.stats()
        self.marks[label] = (time.perf_counter(), stats, self.stack.provider.calls)

    def between(self, start: str, end: str) -> tuple[int, int, int]:
        """(requests, exact hits, provider calls) between two marks."""
        _, before, calls_before = self.marks[start]
        _, after, calls_after = self.marks[end]
        return (
            after.requests - before.requests,
            after.exact_hits - before.exact_hits,
            calls_after - calls_before,
        )

    async def run(self, seconds: float) -> Outcomes:
        """Run every worker for ``seconds`` (in-flight requests then finish)."""
        self._stop.clear()
        self._runs += 1
        loop = asyncio.get_running_loop()
        loop.call_later(seconds, self._stop.set)
        await asyncio.gather(*(self._worker(i) for i in range(self.workers)))
        return self.outcomes

    def _next_query(self, rng: random.Random) -> tuple[str, tuple[str, ...] | None]:
        """A query text and the words its answer must hold (None: the provider refuses it).

        A paraphrase may be answered with the answer of its original or of another
        paraphrase (a semantic hit), or its own: all hold the same words.
        """
        roll = rng.random()
        if roll < 0.5:
            text = rng.choice(self.hot)
        elif roll < 0.65:
            words = rng.choice(self.hot).split()
            rng.shuffle(words)
            text = " ".join(words).upper() + "?"
        elif roll < 0.98:
            # a random tag, not a counter: "q17" and "q170" are near each other
            text = f"{' '.join(rng.sample(WORDS, 5))} {rng.getrandbits(64):016x}"
        else:
            self._unique += 1
            return f"refuse {self._unique}", None
        return text, words_of(text)

    async def _worker(self, number: int) -> None:
        # each run draws new queries: a replay would make near-twins of the distinct ones
        rng = random.Random(f"{self._seed}:{self._runs}:{number}")
        outcomes = self.outcomes
        while not self._stop.is_set():
            text, words = self._next_query(rng)
            user = f"user-{rng.randrange(20)}"
            started = time.perf_counter()
            try:
                answer = await self.stack.gateway.resolve(message(text), user_id=user)
            except ProviderRefused:
                kind = "provider_error" if words is None else "unexpected"
            except Exception as exc:
                kind = "unexpected"
                outcomes.unexpected.append(f"{type(exc).__name__}: {exc}")
            else:
                ok = isinstance(answer, str) and words_of(answer.removeprefix("answer:")) == words
                kind = "answered" if ok and words is not None else "wrong_answer"
                if kind == "wrong_answer":
                    outcomes.unexpected.append(f"{text!r} answered {answer!r}")
            outcomes.latencies.append(time.perf_counter() - started)
            outcomes.kinds[kind] += 1
            await asyncio.sleep(rng.uniform(0.01, 0.04))
