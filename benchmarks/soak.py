"""``python -m benchmarks.soak``: minutes of mixed traffic on one Redis, reported as it goes.

Not part of the test run. Starts a private ``redis-server`` on a free loopback port
(or uses ``--redis-url``) and runs ``--workers`` coroutines for ``--seconds``, each
doing, at random:

- 45 % resolve a repeated query (a hot set of 200), 10 % a paraphrase of one, 15 % a
  query never seen before, 5 % a query from a "greedy" user asking for so many tokens
  that the rate limiter refuses most of them, through an :class:`InferenceGateway`
  with a :class:`RedisExactCache` and a :class:`RedisSemanticCache` (HashingEmbedder),
  both bounded to 2000 entries so that a steady state exists, and a
  :class:`RedisRateLimiter` (library defaults otherwise: fail open, 0.5 s timeouts);
- 25 % a chat turn: append a user message and the reply to one of the worker's own
  conversations, and every fourth turn read the history back and check it ends with
  exactly what this worker appended.

The provider answers an :class:`LLMResponse` with usage after 10-50 ms and refuses
1 % of queries. ``--chaos`` (private server only) kills the server with SIGKILL at
half time and restarts it ``--down-seconds`` later on the same port (empty), then
freezes it with SIGSTOP at three quarters for ``--down-seconds``.

Every ``--report-every`` seconds one line about that interval: operations per
second, errors by kind, hit rate, resolve latency p99 and max (and the slowest chat
turn), provider calls; then running totals of the gateway's backend errors and
skipped calls and the limiter's backend errors; and RSS, objects tracked by the
garbage collector, open file descriptors, pooled connections, the server's client
count and asyncio tasks now. At the
end a summary table (markdown) and, with ``--json``, the figures as JSON. Exits 1 if
any error was not one of the expected kinds (rate limited, provider refused, chat
append/read refused while Redis was unreachable) or any answer or history was wrong.

Run it from the repository root: ``python -m benchmarks.soak --seconds 180 --chaos``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from aiocache_llm import (
    BackendError,
    ChatMemoryConfig,
    HashingEmbedder,
    InferenceGateway,
    LLMResponse,
    RateLimitConfig,
    RateLimitExceeded,
    RedisChatMemory,
    RedisExactCache,
    RedisRateLimiter,
    RedisSemanticCache,
    Usage,
)
from benchmarks.probes import Resources, snapshot

_VOCABULARY = """
alpine breeze canyon dune eclipse forest glacier horizon iceberg jade kayak lantern marble
nebula orchid pebble quartz rainbow summit thunder umbra velvet waterfall xenon yonder zenith
acorn bramble crater dewdrop ember feather granite hollow ivory juniper kernel lichen
"""
WORDS = tuple(_VOCABULARY.split())
EXPECTED = frozenset({"rate_limited", "provider_refused", "chat_unavailable"})
MAX_TURNS = 10
CACHE_SIZE = 2000
GREEDY_TOKENS = 300_000
BUDGET = 1_000_000


class ProviderRefused(Exception):
    """The simulated provider's own error (1 % of queries)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0, help="duration (default 180)")
    parser.add_argument("--report-every", type=float, default=10.0, help="seconds per report")
    parser.add_argument("--workers", type=int, default=64, help="concurrent coroutines")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--chaos", action="store_true", help="kill/restart, then freeze/thaw")
    parser.add_argument("--down-seconds", type=float, default=3.0, help="length of each fault")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.chaos and args.redis_url:
        parser.error("--chaos needs the private server: it cannot kill --redis-url")
    for name in ("seconds", "report_every", "down_seconds"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def words_of(text: str) -> tuple[str, ...]:
    return tuple(sorted(re.findall(r"[^\W_]+", text.lower())))


class Provider:
    """10-50 ms, an LLMResponse with usage; refuses queries whose text starts "refuse"."""

    def __init__(self, seed: int) -> None:
        self.calls = 0
        self._random = random.Random(seed)

    async def __call__(self, query: dict[str, Any]) -> LLMResponse:
        self.calls += 1
        await asyncio.sleep(self._random.uniform(0.01, 0.05))
        text = str(query["messages"][-1]["content"])
        if text.startswith("refuse"):
            raise ProviderRefused("refused")
        prompt = len(text) // 4 + 4
        completion = self._random.randint(20, 200)
        return LLMResponse(
            content=f"answer:{text}",
            model="soak",
            finish_reason="stop",
            usage=Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )


@dataclass
class Interval:
    """What happened in one reporting interval."""

    ended_at: float
    resolves: int = 0
    chat_ops: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    chat_latencies: list[float] = field(default_factory=list)


@dataclass
class Row:
    """One report line, kept for the summary."""

    t: float
    resolves_per_s: float
    chat_ops_per_s: float
    errors: dict[str, int]
    hit_rate: float
    p99_ms: float
    max_ms: float
    chat_max_ms: float
    provider_calls: int
    backend_errors: int
    backend_skipped: int
    limiter_backend_errors: int
    resources: Resources
    events: list[str]


class Soak:
    """The components, the workers and the bookkeeping of one soak run."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.args = args
        self.provider = Provider(args.seed)
        # bounded, so that a steady state exists and growth past it would show a leak
        self.exact = RedisExactCache(
            url=url, key_prefix="soak:exact", value_types=[LLMResponse], max_size=CACHE_SIZE
        )
        self.semantic = RedisSemanticCache(
            HashingEmbedder(),
            url=url,
            key_prefix="soak:semantic",
            value_types=[LLMResponse],
            max_size=CACHE_SIZE,
            embed_in_thread=False,
        )
        self.limiter = RedisRateLimiter(
            url=url, key_prefix="soak:limit", config=RateLimitConfig(BUDGET)
        )
        self.chat = RedisChatMemory(
            url=url, key_prefix="soak:chat", config=ChatMemoryConfig(max_turns=MAX_TURNS)
        )
        self.gateway = InferenceGateway(
            self.provider,
            exact_cache=self.exact,
            semantic_cache=self.semantic,
            rate_limiter=self.limiter,
        )
        self.observer = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        rng = random.Random(args.seed)
        self.hot = [" ".join(rng.sample(WORDS, 6)) for _ in range(200)]
        self.interval = Interval(ended_at=0.0)
        self.totals: Counter[str] = Counter()
        self.rows: list[Row] = []
        self.events: list[str] = []
        self.started = 0.0
        self._last = self.gateway.stats()
        self._stop = asyncio.Event()

    @property
    def clients(self) -> list[Redis]:
        return [c.client for c in (self.exact, self.semantic, self.limiter, self.chat)]

    def event(self, text: str) -> None:
        self.events.append(f"{time.perf_counter() - self.started:.1f}s {text}")

    async def run(self, chaos: Any | None) -> None:
        self.started = time.perf_counter()
        workers = [asyncio.ensure_future(self._worker(i)) for i in range(self.args.workers)]
        chaos_task = asyncio.ensure_future(chaos(self)) if chaos else None
        every, seconds = self.args.report_every, self.args.seconds
        for k in range(1, math.ceil(seconds / every - 1e-9) + 1):
            report_at = self.started + min(k * every, seconds)
            await asyncio.sleep(max(0.0, report_at - time.perf_counter()))
            await self._report()
        self._stop.set()
        await asyncio.gather(*workers)
        if chaos_task is not None:
            await chaos_task

    async def aclose(self) -> None:
        await self.gateway.aclose()
        for component in (self.exact, self.semantic, self.limiter, self.chat):
            await component.aclose()
        await self.observer.aclose()

    # -- traffic ---------------------------------------------------------------------

    async def _worker(self, number: int) -> None:
        rng = random.Random(self.args.seed * 10_000 + number)
        turns = 0
        while not self._stop.is_set():
            roll = rng.random()
            started = time.perf_counter()
            if roll < 0.75:
                await self._resolve(rng, roll)
                self.interval.latencies.append(time.perf_counter() - started)
            else:
                turns += 1
                await self._chat_turn(rng, number, turns)
                self.interval.chat_latencies.append(time.perf_counter() - started)
            await asyncio.sleep(rng.uniform(0.005, 0.03))

    def _query(self, rng: random.Random, roll: float) -> tuple[dict[str, Any], str, bool]:
        """(query, user, greedy) for a resolve of the given kind."""
        greedy = False
        if roll < 0.45:
            text = rng.choice(self.hot)
        elif roll < 0.55:
            words = rng.choice(self.hot).split()
            rng.shuffle(words)
            text = " ".join(words).upper() + "?"
        elif roll < 0.70:
            refuse = rng.random() < 0.01
            # a random tag, not a counter: "u17" and "u170" would be near each other
            body = f"{' '.join(rng.sample(WORDS, 5))} {rng.getrandbits(64):016x}"
            text = f"refuse {body}" if refuse else body
        else:
            text = f"greedy {rng.getrandbits(64):016x}"
            greedy = True
        query: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": text}]}
        if greedy:
            query["max_tokens"] = GREEDY_TOKENS
            return query, f"greedy-{rng.randrange(5)}", True
        return query, f"user-{rng.randrange(100)}", False

    async def _resolve(self, rng: random.Random, roll: float) -> None:
        query, user, _ = self._query(rng, roll)
        text = query["messages"][0]["content"]
        try:
            answer = await self.gateway.resolve(query, user_id=user)
        except RateLimitExceeded:
            self._error("rate_limited")
        except ProviderRefused:
            self._error("provider_refused" if text.startswith("refuse") else "wrong_refusal")
        except Exception as exc:
            self._error(f"resolve:{type(exc).__name__}")
        else:
            content = getattr(answer, "content", None)
            if not isinstance(content, str) or words_of(content[7:]) != words_of(text):
                self._error("wrong_answer")
            self.interval.resolves += 1

    async def _chat_turn(self, rng: random.Random, worker: int, turn: int) -> None:
        conversation = f"w{worker}-c{turn % 3}"
        question = f"turn {turn} of worker {worker}: {rng.choice(WORDS)}?"
        reply = f"reply to turn {turn}"
        try:
            await self.chat.append(conversation, "user", question)
            await self.chat.append(conversation, "assistant", reply)
            self.interval.chat_ops += 2
            if turn % 4 == 0:
                history = await self.chat.get_history(conversation)
                self.interval.chat_ops += 1
                last = [m["content"] for m in history[-2:]]
                if len(history) > 2 * MAX_TURNS or last != [question, reply]:
                    self._error("chat_history_wrong")
        except BackendError:
            self._error("chat_unavailable")
        except Exception as exc:
            self._error(f"chat:{type(exc).__name__}")

    def _error(self, kind: str) -> None:
        self.interval.errors[kind] += 1
        self.totals[kind] += 1

    # -- reporting -------------------------------------------------------------------

    async def _report(self) -> None:
        now = time.perf_counter()
        interval, self.interval = self.interval, Interval(ended_at=now)
        seconds = max(1e-9, now - (interval.ended_at or self.started))
        stats, last = self.gateway.stats(), self._last
        self._last = stats
        limiter = await self.limiter.stats()
        latencies = sorted(interval.latencies) or [0.0]
        hits = stats.exact_hits + stats.semantic_hits - last.exact_hits - last.semantic_hits
        events, self.events = self.events, []
        row = Row(
            t=now - self.started,
            resolves_per_s=interval.resolves / seconds,
            chat_ops_per_s=interval.chat_ops / seconds,
            errors=dict(interval.errors),
            hit_rate=hits / max(1, stats.requests - last.requests),
            p99_ms=latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            max_ms=latencies[-1] * 1000,
            chat_max_ms=max(interval.chat_latencies, default=0.0) * 1000,
            provider_calls=stats.provider_calls - last.provider_calls,
            backend_errors=stats.backend_errors,
            backend_skipped=stats.backend_skipped,
            limiter_backend_errors=limiter.backend_errors,
            resources=await snapshot(self.clients, self.observer),
            events=events,
        )
        self.rows.append(row)
        errors = " ".join(f"{k}={v}" for k, v in sorted(row.errors.items())) or "none"
        print(
            f"[{row.t:6.1f}s] {row.resolves_per_s:7.1f} resolves/s {row.chat_ops_per_s:6.1f} "
            f"chat ops/s | errors: {errors} | hit rate {row.hit_rate:.2f}, p99 "
            f"{row.p99_ms:.0f} ms, max {row.max_ms:.0f} ms (chat {row.chat_max_ms:.0f}), "
            f"provider calls {row.provider_calls}, "
            f"backend errors {row.backend_errors} (+{row.backend_skipped} skipped), limiter "
            f"{row.limiter_backend_errors} | {row.resources.row()}"
            + (f" | {'; '.join(events)}" if events else ""),
            flush=True,
        )

    def summary(self) -> str:
        lines = [
            "| t (s) | resolves/s | chat ops/s | errors | hit rate | p99 ms | max ms | "
            "chat max ms | provider calls | backend errors (+skipped) | limiter errors | "
            "RSS MiB | objects | fds | pool conns | server clients | tasks | events |",
            "|" + "---|" * 18,
        ]
        for row in self.rows:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(row.errors.items())) or "-"
            r = row.resources
            lines.append(
                f"| {row.t:.0f} | {row.resolves_per_s:.0f} | {row.chat_ops_per_s:.0f} | "
                f"{errors} | {row.hit_rate:.2f} | {row.p99_ms:.0f} | {row.max_ms:.0f} | "
                f"{row.chat_max_ms:.0f} | {row.provider_calls} | "
                f"{row.backend_errors} (+{row.backend_skipped}) | {row.limiter_backend_errors} | "
                f"{r.rss_mib:.1f} | {r.objects} | {r.fds if r.fds is not None else '-'} | "
                f"{r.pool_connections} | "
                f"{r.server_clients if r.server_clients is not None else '-'} | {r.tasks} | "
                f"{'; '.join(row.events) or '-'} |"
            )
        stats = self.gateway.stats()
        rss = [row.resources.rss_mib for row in self.rows]
        objects = [row.resources.objects for row in self.rows]
        errors = dict(sorted(self.totals.items()))
        lines += [
            "",
            f"Totals over {self.args.seconds:.0f} s: {stats.requests} resolves "
            f"({stats.requests / self.args.seconds:.0f}/s), hit rate {stats.hit_rate:.2f} "
            f"(exact {stats.exact_hits}, semantic {stats.semantic_hits}, coalesced "
            f"{stats.coalesced}), provider calls {stats.provider_calls}, rate limited "
            f"{stats.rate_limited}, backend errors {stats.backend_errors} (+"
            f"{stats.backend_skipped} skipped); errors by kind {errors}; "
            f"RSS {min(rss):.1f}-{max(rss):.1f} MiB (first {rss[0]:.1f}, last {rss[-1]:.1f}); "
            f"objects {min(objects)}-{max(objects)} (first {objects[0]}, last {objects[-1]}).",
        ]
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        return {
            "seconds": self.args.seconds,
            "chaos": self.args.chaos,
            "gateway": self.gateway.stats().model_dump(),
            "errors": dict(self.totals),
            "unexpected": {k: v for k, v in self.totals.items() if k not in EXPECTED},
            "rows": [{**asdict(row), "resources": asdict(row.resources)} for row in self.rows],
        }


async def chaos(soak: Soak, server: Any) -> None:
    """SIGKILL and restart at half time, SIGSTOP and SIGCONT at three quarters."""
    down = soak.args.down_seconds
    await asyncio.sleep(soak.args.seconds / 2)
    soak.event("SIGKILL")
    server.kill()
    await asyncio.sleep(down)
    await asyncio.to_thread(server.start)
    soak.event("restarted (empty)")
    await asyncio.sleep(max(0.0, soak.args.seconds / 4 - down))
    soak.event("SIGSTOP")
    server.freeze()
    try:
        await asyncio.sleep(down)
    finally:
        server.thaw()
    soak.event("SIGCONT")


async def soak_main(args: argparse.Namespace) -> int:
    server = None
    if args.redis_url is None:
        if shutil.which("redis-server") is None:
            sys.exit("redis-server not found: install it or pass --redis-url")
        from tests.support.redis_server import RedisServer  # the repository's own helper

        server = RedisServer().start()
    url = args.redis_url if server is None else server.url
    soak = Soak(url, args)
    try:
        await soak.run((lambda s: chaos(s, server)) if args.chaos else None)
    finally:
        await soak.aclose()
        if server is not None:
            server.stop()
    print()
    print(soak.summary())
    figures = soak.figures()
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    if figures["unexpected"]:
        print(f"UNEXPECTED errors: {figures['unexpected']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(soak_main(parse_args(argv))))


if __name__ == "__main__":
    main()
