"""``@cached_completion``: cache and coalesce an async function or method by its arguments.

Run: ``python examples/decorator.py`` (no server needed: the cache is in memory;
pass ``cache=RedisExactCache(...)`` to share it across processes).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from typing import TypeVar

from aiocache_llm import cached_completion

T = TypeVar("T")

# how often each function body really ran: what the cache saved is the difference
runs: Counter[str] = Counter()


@cached_completion(ttl_seconds=600)
async def summarize(text: str, max_words: int = 5) -> str:
    runs["summarize"] += 1
    await asyncio.sleep(0.2)  # stands in for a slow, paid LLM call
    return " ".join(text.split()[:max_words]) + " ..."


class Translator:
    def __init__(self, target: str) -> None:
        self.target = target

    # ``self`` is never part of the key (instances share answers), so the key names
    # what in ``self`` changes the answer: the target language
    @cached_completion(key=lambda self, text: {"target": self.target, "text": text})
    async def translate(self, text: str) -> dict[str, str]:
        runs["translate"] += 1
        await asyncio.sleep(0.05)
        return {"language": self.target, "text": f"<{self.target}> {text}"}


async def step(label: str, function: str, call: Awaitable[T]) -> T:
    """Await ``call`` and print whether the function body ran for it."""
    before = runs[function]
    result = await call
    ran = runs[function] - before
    outcome = f"ran {ran}x" if ran else "cached"
    print(f"{label:<42} {outcome:<8} {function} runs so far: {runs[function]}")
    return result


async def main() -> None:
    text = "Single flight means one provider call for many identical concurrent requests"
    other = "Concurrent callers wait for the call in flight instead of starting their own"

    first = await step("summarize(text)", "summarize", summarize(text))
    again = await step("summarize(text) again", "summarize", summarize(text))
    # defaults applied and keywords bound: every spelling of a call is the same call
    spelled = await step(
        "summarize(text=text, max_words=5)", "summarize", summarize(text=text, max_words=5)
    )
    assert first == again == spelled
    answers = await step(
        "10 x summarize(other), concurrently",
        "summarize",
        asyncio.gather(*(summarize(other) for _ in range(10))),
    )
    assert len(set(answers)) == 1

    dropped = await summarize.invalidate(text)  # type: ignore[attr-defined]
    print(f"summarize.invalidate(text) -> {dropped}")
    await step("summarize(text) after invalidate", "summarize", summarize(text))

    await step(
        "Translator('fr').translate('hello')", "translate", Translator("fr").translate("hello")
    )
    await step(
        "another Translator('fr') instance", "translate", Translator("fr").translate("hello")
    )
    german = await step(
        "Translator('de').translate('hello')", "translate", Translator("de").translate("hello")
    )
    print(f"german answer: {german}")

    stats = summarize.gateway.stats()  # type: ignore[attr-defined]
    print(
        f"summarize gateway: requests={stats.requests} exact_hits={stats.exact_hits} "
        f"coalesced={stats.coalesced} provider_calls={stats.provider_calls}"
    )


if __name__ == "__main__":
    asyncio.run(main())
