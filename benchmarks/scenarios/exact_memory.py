"""Scenario 1: an exact hit in memory, every implementation given the same chat-request dict."""

from __future__ import annotations

import hashlib
import json

from aiocache import SimpleMemoryCache
from cashews import Cache

from aiocache_llm import InferenceGateway, MemoryExactCache
from benchmarks.harness import Section, Target, by_name, interleaved, per_op_seconds
from benchmarks.scenarios.common import QUERY, Context, user_key, value_of_size

VALUE = value_of_size(512)


async def run(ctx: Context) -> Section:
    ours = MemoryExactCache()
    await ours.put(QUERY, VALUE)

    async def provider(query: object) -> str:
        raise AssertionError("a hit never calls the provider")

    gateway = InferenceGateway(provider, exact_cache=ours)

    baseline: dict[str, str] = {user_key(QUERY): VALUE}

    async def baseline_get() -> object:
        return baseline.get(hashlib.sha256(json.dumps(QUERY, sort_keys=True).encode()).hexdigest())

    aiocache = SimpleMemoryCache()
    await aiocache.set(user_key(QUERY), VALUE)
    cashews = Cache()
    cashews.setup("mem://")
    await cashews.set(user_key(QUERY), VALUE)

    for hit in (
        await ours.get(QUERY),
        await gateway.resolve(QUERY),
        await baseline_get(),
        await aiocache.get(user_key(QUERY)),
        await cashews.get(user_key(QUERY)),
    ):
        assert hit == VALUE, "every candidate must really hit"

    ops = ctx.ops(50_000)
    rows = await interleaved(
        [
            (
                "aiocache_llm MemoryExactCache.get",
                lambda: per_op_seconds(lambda: ours.get(QUERY), ops),
            ),
            (
                "aiocache_llm gateway.resolve (hit)",
                lambda: per_op_seconds(lambda: gateway.resolve(QUERY), ops),
            ),
            ("baseline json.dumps+sha256+dict.get", lambda: per_op_seconds(baseline_get, ops)),
            (
                "cashews mem:// get",
                lambda: per_op_seconds(lambda: cashews.get(user_key(QUERY)), ops),
            ),
            (
                "aiocache SimpleMemoryCache.get",
                lambda: per_op_seconds(lambda: aiocache.get(user_key(QUERY)), ops),
            ),
        ],
        ctx.repeats,
        unit="µs",
        scale=1e6,
    )
    await gateway.aclose()
    await cashews.close()

    section = Section(
        "1. Exact hit, in memory",
        "One `get` of a 512-byte answer for a chat-request dict. The peers are given the key "
        "their users would compute (sorted JSON + SHA-256); ours take the dict itself.",
    )
    section.add_table("µs per hit (lower is better)", rows, "baseline json.dumps+sha256+dict.get")
    get = by_name(rows, "aiocache_llm MemoryExactCache.get").median
    resolve = by_name(rows, "aiocache_llm gateway.resolve (hit)").median
    base = by_name(rows, "baseline json.dumps+sha256+dict.get").median
    section.targets += [
        Target("MemoryExactCache.get / baseline", get / base, 0.5),
        Target("gateway.resolve hit / MemoryExactCache.get", resolve / get, 2.0),
    ]
    return section
