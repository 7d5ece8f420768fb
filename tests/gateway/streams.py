"""A streaming provider stand-in: an async generator per call, with delays and failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class StreamingProvider:
    """Streams ``chunks`` (a list of values, default ``w0 w1 ...``) with ``delay`` between them.

    ``fail_after``: raise ``RuntimeError("boom")`` after that many chunks. ``usage``:
    a dict chunk ``{"usage": {"total_tokens": n}}`` appended last. Counts ``streams``
    started and ``closed_early`` (streams closed before their end); ``plain_calls``
    counts ``complete`` calls, which answer ``"plain:<text>"``.
    """

    def __init__(
        self,
        chunks: list[Any] | None = None,
        *,
        delay: float = 0.0,
        first_delay: float = 0.0,
        fail_after: int | None = None,
        usage: int | None = None,
    ) -> None:
        self.chunks = chunks if chunks is not None else [f"w{i} " for i in range(10)]
        self.delay = delay
        self.first_delay = first_delay
        self.fail_after = fail_after
        self.usage = usage
        self.streams = 0
        self.closed_early = 0
        self.finished = 0
        self.plain_calls = 0
        self.queries: list[Any] = []

    async def complete(self, query: Any) -> str:
        self.plain_calls += 1
        return f"plain:{query['messages'][-1]['content']}"

    async def stream(self, query: Any) -> AsyncIterator[Any]:
        self.streams += 1
        self.queries.append(query)
        done = False
        try:
            if self.first_delay:
                await asyncio.sleep(self.first_delay)
            for index, chunk in enumerate(self.chunks):
                if self.fail_after is not None and index == self.fail_after:
                    raise RuntimeError("boom")
                if index and self.delay:
                    await asyncio.sleep(self.delay)
                yield chunk
            if self.usage is not None:
                yield {"usage": {"total_tokens": self.usage}}
            done = True
            self.finished += 1
        finally:
            if not done:
                self.closed_early += 1


QUERY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "tell me"}]}


async def collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]
