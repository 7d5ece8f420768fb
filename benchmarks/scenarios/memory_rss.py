"""Scenario 6: resident memory of 100,000 entries of 1 KB, each store in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from benchmarks.harness import Measurement, Section, Target, by_name
from benchmarks.scenarios.common import Context

ENTRIES = 100_000
VALUE_BYTES = 1024

# Runs in a child process so that each store starts from the same clean heap.
PROBE = textwrap.dedent(
    """
    import asyncio, gc, hashlib, json, os, sys
    import psutil

    kind, entries, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def query(i):
        return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}

    def value(i):
        head = f"{i:08d}"
        return head + "x" * (size - len(head))

    def key(q):
        return hashlib.sha256(json.dumps(q, sort_keys=True).encode()).hexdigest()

    async def main():
        if kind == "aiocache_llm":
            from aiocache_llm import MemoryExactCache
            store = MemoryExactCache(max_size=0)
            put = lambda i: store.put(query(i), value(i))
        elif kind == "aiocache":
            from aiocache import SimpleMemoryCache
            store = SimpleMemoryCache()
            put = lambda i: store.set(key(query(i)), value(i))
        elif kind == "cashews":
            from cashews import Cache
            store = Cache(); store.setup("mem://", size=entries * 2)
            put = lambda i: store.set(key(query(i)), value(i))
        else:
            store = {}
            async def put(i):
                store[key(query(i))] = value(i)
        await put(-1)
        gc.collect()
        before = psutil.Process().memory_info().rss
        for i in range(entries):
            await put(i)
        gc.collect()
        after = psutil.Process().memory_info().rss
        print(json.dumps({"growth": after - before}))

    asyncio.run(main())
    """
)


def growth(kind: str, entries: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, kind, str(entries), str(VALUE_BYTES)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["growth"])


async def run(ctx: Context) -> Section:
    entries = 20_000 if ctx.quick else ENTRIES
    repeats = 1 if ctx.quick else 3
    payload = entries * VALUE_BYTES
    kinds = [
        ("aiocache_llm", "aiocache_llm MemoryExactCache"),
        ("dict", "plain dict {sha256: str}"),
        ("cashews", "cashews mem://"),
        ("aiocache", "aiocache SimpleMemoryCache"),
    ]
    rows = [
        Measurement(label, [growth(kind, entries) / payload for _ in range(repeats)], "x payload")
        for kind, label in kinds
    ]
    section = Section(
        f"6. Memory: {entries:,} entries of 1 KB",
        "RSS growth after storing the entries, as a multiple of the payload "
        f"({payload / 1e6:.0f} MB of values), each store measured in a fresh process.",
    )
    section.add_table(
        "RSS growth / payload bytes (lower is better)", rows, "plain dict {sha256: str}"
    )
    section.targets.append(
        Target(
            "MemoryExactCache RSS / payload",
            by_name(rows, "aiocache_llm MemoryExactCache").median,
            1.5,
        )
    )
    return section
