"""One OS process of the multi-process chat memory test (run as a script, not collected).

``python chat_memory_worker.py URL PREFIX CONV WRITER MAX_TURNS STREAMS APPENDS``
connects, prints ``ready``, waits for a line on stdin (the start signal shared by all
workers), then runs STREAMS coroutines that each append APPENDS messages to
conversation CONV, one after another, with contents ``"<WRITER>.<stream>:<i>"``. It
prints one JSON report line: appends acknowledged, errors, and the memory's stats.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiocache_llm import BackendError, ChatMemoryConfig, RedisChatMemory


async def stream(memory: RedisChatMemory, conv: str, name: str, appends: int) -> list[str]:
    errors = []
    for i in range(appends):
        role = "user" if i % 2 == 0 else "assistant"
        try:
            await memory.append(conv, role, f"{name}:{i}")
        except BackendError as exc:  # reported, never swallowed: the test fails on it
            errors.append(f"{name}:{i}: {exc}")
    return errors


async def main(url: str, prefix: str, conv: str, writer: str, max_turns: int, streams: int,
               appends: int) -> None:  # fmt: skip
    config = ChatMemoryConfig(max_turns=max_turns)
    async with RedisChatMemory(url=url, key_prefix=prefix, config=config) as memory:
        await memory.get_history(f"{conv}-warm-up")  # connect before the start signal
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        results = await asyncio.gather(
            *(stream(memory, conv, f"{writer}.{s}", appends) for s in range(streams))
        )
        stats = await memory.stats()
    errors = [error for result in results for error in result]
    report = {"acknowledged": streams * appends - len(errors), "errors": errors}
    report["stats_appended"] = stats.appended
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    url, prefix, conv, writer, max_turns, streams, appends = sys.argv[1:8]
    asyncio.run(main(url, prefix, conv, writer, int(max_turns), int(streams), int(appends)))
