"""Scenario 7: streaming - a replayed hit, live fan-out to 1,000 consumers, across processes.

(a) Time to the first and to the last chunk of a 200-chunk recording replayed from the
cache, against a plain hit of the same text (in memory) or a raw GET of as many bytes
(Redis). (b) One live 200-chunk stream read by 1,000 concurrent consumers of one
gateway, against the naive design: one producer feeding one ``asyncio.Queue`` per
consumer. (c) The latency a chunk gains between a leader process and a follower
process through Redis, against raw redis-py ``XADD`` / ``XREAD BLOCK`` between the same
two processes.

Part (c) runs this module as the follower: ``python -m benchmarks.scenarios.streaming
REDIS_URL KEY_PREFIX`` reads one JSON command a line on stdin and answers on stdout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from aiocache_llm import InferenceGateway, LLMResponse, MemoryExactCache, RedisExactCache
from aiocache_llm.gateway.streaming import stream_key_query
from benchmarks.harness import Measurement, Section, Target
from benchmarks.scenarios.common import QUERY, Context

CHUNKS = 200
CONSUMERS = 1000
PACE_SECONDS = 0.005  # (c): the provider's gap between two chunks
SETTLE_SECONDS = 0.05  # (c): the follower's read is sent before the first chunk
ROOT = Path(__file__).resolve().parents[2]

clock = time.perf_counter

# -- (a) a replayed hit ---------------------------------------------------------------

HIT_CHUNKS = ["tok "] * CHUNKS
HIT_TEXT = "".join(HIT_CHUNKS)


class HitProvider:
    """Streams the 200-chunk answer once (it is then stored); answers plainly with its text."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, query: object) -> str:
        self.calls += 1
        return HIT_TEXT

    async def stream(self, query: object) -> Any:
        self.calls += 1
        for chunk in HIT_CHUNKS:
            yield chunk


async def store_hits(gateway: InferenceGateway, provider: HitProvider) -> None:
    """Stream once (the recording is stored) and resolve once; check both now hit."""
    assert [chunk async for chunk in gateway.stream(QUERY)] == HIT_CHUNKS
    assert await gateway.resolve(QUERY) == HIT_TEXT
    calls = provider.calls
    for _ in range(200):  # the producer stores the recording just after the stream's end
        hits = gateway.stats().stream_hits
        assert [chunk async for chunk in gateway.stream(QUERY)] == HIT_CHUNKS
        if gateway.stats().stream_hits == hits + 1:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the streamed answer was never stored")
    assert await gateway.resolve(QUERY) == HIT_TEXT
    assert provider.calls == calls, "a hit never calls the provider"


async def stream_hit(gateway: InferenceGateway, ops: int) -> tuple[float, float]:
    """Mean seconds from ``gateway.stream()`` to its first chunk, and to its last."""
    to_first = to_last = 0.0
    for _ in range(ops):
        started = clock()
        stream = gateway.stream(QUERY)
        await stream.__anext__()
        first = clock()
        async for _chunk in stream:
            pass
        last = clock()
        to_first += first - started
        to_last += last - started
    return to_first / ops, to_last / ops


async def each_call(call: Callable[[], Awaitable[object]], ops: int) -> tuple[float, float]:
    """Mean seconds per call, timed the same way as :func:`stream_hit` (twice the same)."""
    total = 0.0
    for _ in range(ops):
        started = clock()
        await call()
        total += clock() - started
    return total / ops, total / ops


Timed = Callable[[], Awaitable[tuple[float, float]]]


async def take_turns(
    candidates: Sequence[tuple[str, Timed]], repeats: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Like ``harness.interleaved`` for measurements of two figures: one warm-up each,
    then ``repeats`` rounds taking turns, each run after a full collection."""
    for _, measure in candidates:
        await measure()
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _ in candidates}
    for _ in range(repeats):
        for name, measure in candidates:
            gc.collect()
            first, second = await measure()
            samples[name][0].append(first * 1e6)
            samples[name][1].append(second * 1e6)
    return samples


async def replayed_hits(ctx: Context, section: Section) -> None:
    # in memory: a streamed hit against a plain hit of the same text
    provider = HitProvider()
    memory_cache = MemoryExactCache()
    memory = InferenceGateway(provider, exact_cache=memory_cache)
    await store_hits(memory, provider)
    stream_key = stream_key_query(QUERY)  # what a streamed request is filed under
    assert len(await memory_cache.get(stream_key)) == CHUNKS
    ops = ctx.ops(5_000)
    timed = await take_turns(
        [
            ("plain", lambda: each_call(lambda: memory.resolve(QUERY), ops)),
            ("stream", lambda: stream_hit(memory, ops)),
            ("get", lambda: each_call(lambda: memory_cache.get(stream_key), ops)),
        ],
        ctx.repeats,
    )
    await memory.aclose()
    plain = "gateway.resolve hit, plain str of the same 800 characters"
    section.add_table(
        f"(a) MemoryExactCache: a {CHUNKS}-chunk recording replayed, µs per hit",
        [
            Measurement(plain, timed["plain"][0], "µs"),
            Measurement("gateway.stream hit: first chunk", timed["stream"][0], "µs"),
            Measurement(f"gateway.stream hit: last ({CHUNKS}th) chunk", timed["stream"][1], "µs"),
            Measurement(RECORDING_GET.format("MemoryExactCache"), timed["get"][0], "µs"),
        ],
        plain,
    )
    section.notes.append(
        "(a) a streamed hit hands out its first chunk once the cache has returned the "
        "whole recording: in memory the first chunk took "
        f"{statistics.median(timed['stream'][0]):.1f} µs, of which "
        f"`MemoryExactCache.get` of the recording took {statistics.median(timed['get'][0]):.1f} "
        "µs (a recording of text chunks is kept as it is and a hit builds a new list of "
        "them; one with mutable chunks is kept encoded and decoded on every hit). From "
        "Redis the whole entry is read and decoded first."
    )

    # on Redis: a streamed hit against a raw GET of as many bytes as its entry
    prefix = f"bench:stream:hit:{secrets.token_hex(4)}"
    raw = Redis.from_url(ctx.redis_url)
    cache = RedisExactCache(url=ctx.redis_url, key_prefix=prefix)
    provider = HitProvider()
    gateway = InferenceGateway(provider, exact_cache=cache)
    try:
        await store_hits(gateway, provider)
        size = int(await raw.strlen(cache.key(stream_key)))
        assert size > len(HIT_TEXT), "the recording must be stored in Redis"
        raw_key = f"{prefix}:raw"
        await raw.set(raw_key, b"x" * size)
        assert len(await raw.get(raw_key) or b"") == size
        ops = ctx.ops(2_000)
        timed = await take_turns(
            [
                ("raw", lambda: each_call(lambda: raw.get(raw_key), ops)),
                ("stream", lambda: stream_hit(gateway, ops)),
                ("plain", lambda: each_call(lambda: gateway.resolve(QUERY), ops)),
                ("get", lambda: each_call(lambda: cache.get(stream_key), ops)),
            ],
            ctx.repeats,
        )
    finally:
        await gateway.aclose()
        await cache.aclose()
        await delete_prefix(raw, prefix)
        await raw.aclose()
    base = f"raw redis.asyncio GET of {size:,} bytes (the recording's entry)"
    section.add_table(
        "(a) RedisExactCache: the same recording replayed from Redis, µs per hit",
        [
            Measurement(base, timed["raw"][0], "µs"),
            Measurement("gateway.stream hit: first chunk", timed["stream"][0], "µs"),
            Measurement(f"gateway.stream hit: last ({CHUNKS}th) chunk", timed["stream"][1], "µs"),
            Measurement(
                "gateway.resolve hit, plain str of the same 800 characters",
                timed["plain"][0],
                "µs",
            ),
            Measurement(RECORDING_GET.format("RedisExactCache"), timed["get"][0], "µs"),
        ],
        base,
    )


RECORDING_GET = "{}.get of the recording alone (reads all its chunks)"


async def delete_prefix(raw: Redis, prefix: str) -> None:
    keys = [key async for key in raw.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await raw.delete(*keys)


# -- (b) live fan-out in one process ---------------------------------------------------

FAN_TEXTS = [f"{i:03d} " for i in range(CHUNKS)]  # distinct, so the order is checked


def fan_chunk(text: str, model: bool) -> Any:
    return LLMResponse(content=text) if model else text


class FanProvider:
    """Streams 200 short chunks, giving the event loop a turn after each one."""

    def __init__(self, model: bool) -> None:
        self.model = model
        self.calls = 0
        self.started = self.ended = 0.0

    async def __call__(self, query: object) -> str:
        raise AssertionError("only streamed")

    async def stream(self, query: object) -> Any:
        self.calls += 1
        self.started = clock()
        for text in FAN_TEXTS:
            yield fan_chunk(text, self.model)
            await asyncio.sleep(0)
        self.ended = clock()


def in_order(chunk: Any, read: int, model: bool) -> None:
    if (chunk.content if model else chunk) != FAN_TEXTS[read]:
        raise AssertionError(f"chunk {read} out of order: {chunk!r}")


def check_fan_out(results: Sequence[int]) -> None:
    # each consumer checks every chunk as it reads it (keeping none: 200,000 pydantic
    # copies alive would time the garbage collector, not the fan-out)
    assert list(results) == [CHUNKS] * CONSUMERS, "every consumer gets every chunk, in order"


# (ms from the start to the first chunk produced, producing, from the last chunk
# produced to the last consumer done) per run, for the notes
PHASES: dict[str, list[tuple[float, float, float]]] = {}


class FanOut:
    """Our gateway streaming to 1,000 consumers; a fresh query each run (a live stream)."""

    def __init__(self, model: bool) -> None:
        self.model = model
        self.provider = FanProvider(model)
        self.gateway = InferenceGateway(self.provider, exact_cache=MemoryExactCache())
        self.runs = 0

    async def __call__(self) -> float:
        self.runs += 1
        query = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"fan-out {self.model} {self.runs}"}],
        }
        gateway, calls, model = self.gateway, self.provider.calls, self.model

        async def consume() -> int:
            read = 0
            async for chunk in gateway.stream(query):
                in_order(chunk, read, model)
                read += 1
            return read

        started = clock()
        results = await asyncio.gather(*(consume() for _ in range(CONSUMERS)))
        elapsed = clock() - started
        assert self.provider.calls == calls + 1, "one provider stream per run"
        check_fan_out(results)
        provider = self.provider
        PHASES.setdefault(f"ours {self.model}", []).append(
            (
                (provider.started - started) * 1000,
                (provider.ended - provider.started) * 1000,
                (started + elapsed - provider.ended) * 1000,
            )
        )
        return elapsed


async def queue_floor(model: bool) -> float:
    """The naive design: one producer, one ``asyncio.Queue`` per consumer, a sentinel."""
    end = object()
    marks = [0.0, 0.0]
    started = clock()
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(CONSUMERS)]

    async def produce() -> int:
        marks[0] = clock()
        for text in FAN_TEXTS:
            chunk = fan_chunk(text, model)
            for queue in queues:
                queue.put_nowait(chunk)
            await asyncio.sleep(0)
        for queue in queues:
            queue.put_nowait(end)
        marks[1] = clock()
        return CHUNKS

    async def consume(queue: asyncio.Queue[Any]) -> int:
        read = 0
        while (chunk := await queue.get()) is not end:
            in_order(chunk, read, model)
            read += 1
        return read

    results = await asyncio.gather(produce(), *(consume(queue) for queue in queues))
    elapsed = clock() - started
    check_fan_out(results[1:])
    PHASES.setdefault(f"floor {model}", []).append(
        (
            (marks[0] - started) * 1000,
            (marks[1] - marks[0]) * 1000,
            (started + elapsed - marks[1]) * 1000,
        )
    )
    return elapsed


async def fan_out(ctx: Context, section: Section) -> None:
    PHASES.clear()
    ours_str, ours_model = FanOut(False), FanOut(True)
    candidates: list[tuple[str, Callable[[], Awaitable[float]]]] = [
        ("ours str", ours_str),
        ("floor str", lambda: queue_floor(False)),
        ("ours model", ours_model),
        ("floor model", lambda: queue_floor(True)),
    ]
    for _, run in candidates:  # warm-up
        await run()
    PHASES.clear()
    samples: dict[str, list[float]] = {name: [] for name, _ in candidates}
    model_repeats = 3 if ctx.quick else ctx.repeats  # informative rows, 2.5x as long
    for repeat in range(ctx.repeats):
        for name, run in candidates:  # ours, floor, ours, floor: they share the noise
            if name.endswith("model") and repeat >= model_repeats:
                continue
            gc.collect()
            samples[name].append(await run() * 1000)
    await ours_str.gateway.aclose()
    await ours_model.gateway.aclose()

    floor = "naive: 1 producer, 1,000 asyncio.Queue, sentinel"
    ours = "aiocache_llm gateway.stream, async for"
    section.add_table(
        f"(b) one live {CHUNKS}-chunk stream (str chunks) to {CONSUMERS:,} concurrent "
        "consumers, ms from the start to the last consumer done (lower is better)",
        [
            Measurement(floor, samples["floor str"], "ms"),
            Measurement(ours, samples["ours str"], "ms"),
        ],
        floor,
    )
    section.add_table(
        "(b) the same with pydantic chunks (`LLMResponse`), informative: ours hands every "
        "consumer a copy of its own, the queues share one object",
        [
            Measurement(floor, samples["floor model"], "ms"),
            Measurement(ours, samples["ours model"], "ms"),
        ],
        floor,
    )
    ratio = statistics.median(samples["ours str"]) / statistics.median(samples["floor str"])
    section.targets.append(Target("(b) live fan-out to 1,000 consumers / naive queues", ratio, 1.0))

    def phases(key: str) -> str:
        start, produce, tail = (statistics.median(p[i] for p in PHASES[key]) for i in range(3))
        return f"{start:.1f} ms to the first chunk, {produce:.0f} ms producing, {tail:.1f} ms tail"

    section.notes.append(
        f"(b) where the time goes (medians; start = until the provider or producer runs, "
        f"tail = from its last chunk to the last consumer done): ours {phases('ours False')}; "
        f"naive {phases('floor False')}. Our start is longer because each of the 1,000 "
        "consumers keys the request, looks up the cache and subscribes before the one "
        "provider stream (a task of its own) gets its first turn."
    )


# -- (c) across processes, through Redis -----------------------------------------------


def cross_query(run: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"cross {run}"}]}


class StampProvider:
    """Waits to be released, then streams chunks carrying ``perf_counter()`` at yield time."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.chunks = CHUNKS

    async def __call__(self, query: object) -> str:
        raise AssertionError("only streamed")

    async def stream(self, query: object) -> Any:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        for _ in range(self.chunks):
            yield repr(clock())
            await asyncio.sleep(PACE_SECONDS)


class Follower:
    """The child process: a gateway, and a raw redis-py client, on the same Redis."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, prefix: str) -> Follower:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.scenarios.streaming",
            url,
            prefix,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        follower = cls(process)
        await follower.expect("ready")
        return follower

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def expect(self, field: str) -> Any:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if not line:
            raise RuntimeError("the follower process exited")
        reply = json.loads(line)
        if field not in reply:
            raise RuntimeError(f"the follower answered {reply!r}, not {field!r}")
        return reply[field]

    async def stop(self) -> None:
        if self.process.returncode is None:
            try:
                await self.send({"mode": "quit"})
                await asyncio.wait_for(self.process.wait(), 10)
            except (OSError, TimeoutError):
                self.process.kill()
                await self.process.wait()


async def cross_ours(
    gateway: InferenceGateway, provider: StampProvider, follower: Follower, chunks: int
) -> list[float]:
    """The leader here, the follower there: per-chunk latencies seen by the follower."""
    run = secrets.token_hex(6)
    provider.entered.clear()
    provider.release.clear()
    provider.chunks = chunks
    calls = provider.calls

    async def lead() -> int:
        return sum([1 async for _ in gateway.stream(cross_query(run))])

    leader = asyncio.ensure_future(lead())
    await asyncio.wait_for(provider.entered.wait(), 30)  # we hold the lease
    await follower.send({"mode": "ours", "run": run})
    await follower.expect("subscribed")
    provider.release.set()
    latencies: list[float] = await follower.expect("latencies")
    assert await leader == chunks
    assert provider.calls == calls + 1
    assert len(latencies) == chunks
    return latencies


async def cross_raw(raw: Redis, prefix: str, follower: Follower, chunks: int) -> list[float]:
    """Raw redis-py between the same two processes: XADD here, XREAD BLOCK there."""
    key = f"{prefix}:raw:{secrets.token_hex(6)}"
    await follower.send({"mode": "raw", "key": key})
    await follower.expect("subscribed")
    for _ in range(chunks):
        await raw.xadd(key, {"t": repr(clock())})
        await asyncio.sleep(PACE_SECONDS)
    await raw.xadd(key, {"end": "1"})
    latencies: list[float] = await follower.expect("latencies")
    await raw.delete(key)
    assert len(latencies) == chunks
    return latencies


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def cross_process(ctx: Context, section: Section) -> None:
    prefix = f"bench:stream:fleet:{secrets.token_hex(4)}"
    raw = Redis.from_url(ctx.redis_url)
    provider = StampProvider()
    cache = RedisExactCache(url=ctx.redis_url, key_prefix=prefix)
    gateway = InferenceGateway(provider, exact_cache=cache)
    follower = await Follower.start(ctx.redis_url, prefix)
    repeats = 3 if ctx.quick else 7
    runs: list[tuple[str, Callable[[int], Awaitable[list[float]]]]] = [
        ("raw", lambda chunks: cross_raw(raw, prefix, follower, chunks)),
        ("ours", lambda chunks: cross_ours(gateway, provider, follower, chunks)),
    ]
    p50: dict[str, list[float]] = {name: [] for name, _ in runs}
    p99: dict[str, list[float]] = {name: [] for name, _ in runs}
    try:
        for _, run in runs:  # warm-up: connections, scripts, imports
            await run(20)
        for _ in range(repeats):
            for name, run in runs:
                gc.collect()
                latencies = [seconds * 1e6 for seconds in await run(CHUNKS)]
                p50[name].append(quantile(latencies, 0.5))
                p99[name].append(quantile(latencies, 0.99))
    finally:
        await follower.stop()
        await gateway.aclose()
        await cache.aclose()
        await delete_prefix(raw, prefix)
        await raw.aclose()

    base = "raw redis-py: XADD, XREAD BLOCK"
    ours = "aiocache_llm: leader gateway -> follower gateway"
    caption = (
        f"(c) a {CHUNKS}-chunk stream (a chunk every {PACE_SECONDS * 1000:g} ms) from this "
        "process to a consumer in a child process through Redis, per-chunk latency from "
        "the provider's yield to the consumer's receipt"
    )
    section.add_table(
        f"{caption}: median, µs",
        [Measurement(base, p50["raw"], "µs"), Measurement(ours, p50["ours"], "µs")],
        base,
    )
    section.add_table(
        f"{caption}: p99, µs",
        [Measurement(base, p99["raw"], "µs"), Measurement(ours, p99["ours"], "µs")],
        base,
    )
    ratio = statistics.median(p50["ours"]) / statistics.median(p50["raw"])
    section.targets.append(
        Target("(c) cross-process median per-chunk latency / raw XADD+XREAD", ratio, 1.5)
    )
    section.notes.append(
        "(c) ours is the whole path: the leader's producer hands the chunk to a writer "
        "task that appends it with one Lua call (XADD + PEXPIRE), the follower's relay "
        "reads it with XREAD BLOCK, decodes it and publishes it into its local broadcast, "
        "whose consumer gets it from `async for`. Raw: XADD awaited by the producer itself, "
        "the time taken on the XREAD reply. Medians of per-repeat figures; p99 of 200 "
        "samples is the second-worst chunk, so it follows the machine's noise."
    )


async def run(ctx: Context) -> Section:
    section = Section(
        "7. Streaming",
        f"Streamed answers of {CHUNKS} short chunks. (a) a cached recording replayed; "
        f"(b) one live provider stream read by {CONSUMERS:,} consumers at once, the "
        "provider giving the event loop a turn (`await asyncio.sleep(0)`) after each "
        "chunk, against the naive fan-out (the queues are created inside the timing, as "
        "each consumer needs one); (c) a leader gateway here and a follower gateway in a "
        "child process sharing one Redis (`RedisExactCache`), chunk timestamps from "
        "`time.perf_counter()`, the same monotonic clock in both processes.",
    )
    await replayed_hits(ctx, section)
    await fan_out(ctx, section)
    await cross_process(ctx, section)
    return section


# -- the follower process of (c) -------------------------------------------------------


async def follow_gateway(gateway: InferenceGateway, run: str) -> list[float]:
    latencies = []
    async for chunk in gateway.stream(cross_query(run)):
        latencies.append(clock() - float(chunk))
    return latencies


async def follow_raw(raw: Redis, key: str) -> list[float]:
    latencies: list[float] = []
    last: bytes | str = "0-0"
    while True:
        reply: Any = await raw.xread({key: last}, count=4096, block=5000)
        now = clock()
        if not reply:
            raise RuntimeError("no entry for 5 s")
        for entry_id, fields in reply[0][1]:
            last = entry_id
            if b"end" in fields:
                return latencies
            latencies.append(now - float(fields[b"t"]))


async def follower_main(url: str, prefix: str) -> None:
    async def no_provider(query: object) -> str:
        raise AssertionError("the follower never calls its provider")

    cache = RedisExactCache(url=url, key_prefix=prefix)
    gateway = InferenceGateway(no_provider, exact_cache=cache)
    raw = Redis.from_url(url)
    loop = asyncio.get_running_loop()

    def say(reply: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        command = json.loads(line) if line.strip() else {"mode": "quit"}
        if command["mode"] == "quit":
            break
        task: asyncio.Future[list[float]]
        if command["mode"] == "ours":
            followed = gateway.stats().fleet_hits
            task = asyncio.ensure_future(follow_gateway(gateway, command["run"]))
            deadline = clock() + 30
            while gateway.stats().fleet_hits == followed and not task.done():
                if clock() > deadline:
                    raise RuntimeError("never followed the leader")
                await asyncio.sleep(0.001)
        else:
            task = asyncio.ensure_future(follow_raw(raw, command["key"]))
        await asyncio.sleep(SETTLE_SECONDS)  # its XREAD BLOCK is on the server
        say({"subscribed": True})
        say({"latencies": await task})
    await gateway.aclose()
    await cache.aclose()
    await raw.aclose()


if __name__ == "__main__":
    asyncio.run(follower_main(sys.argv[1], sys.argv[2]))
