"""aiocache_llm in one screen, with no server: ``python examples/quickstart.py``.

Everything here runs in memory. For a fleet, swap each ``Memory*`` class for its
``Redis*`` twin (same methods, plus ``url=`` or ``client=``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiocache_llm import (
    ChatMemoryConfig,
    HashingEmbedder,
    InferenceGateway,
    LLMResponse,
    MemoryChatMemory,
    MemoryExactCache,
    MemoryRateLimiter,
    MemorySemanticCache,
    RateLimitConfig,
    RateLimitExceeded,
    Usage,
)

calls = 0


async def fake_llm(query: dict[str, Any]) -> LLMResponse:
    """Stands in for a paid provider call (an SDK's ``create`` in a real app)."""
    global calls
    calls += 1
    await asyncio.sleep(0.2)
    question = query["messages"][-1]["content"]
    return LLMResponse(
        content=f"(answer #{calls} to {question!r})",
        model=query["model"],
        usage=Usage(prompt_tokens=20, completion_tokens=30, total_tokens=50),
    )


def ask(question: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}]}


async def main() -> None:
    gateway = InferenceGateway(
        fake_llm,
        exact_cache=MemoryExactCache(max_size=1000, ttl_seconds=3600),
        # a toy embedder (hashed words and trigrams): real apps pass a model's embed function
        semantic_cache=MemorySemanticCache(HashingEmbedder(), similarity_threshold=0.85),
        rate_limiter=MemoryRateLimiter(RateLimitConfig(max_tokens_per_minute=300)),
    )
    async with gateway:
        answer = await gateway.resolve(ask("What is the capital of France?"), user_id="alice")
        print(f"1. miss      -> provider call #{calls}: {answer.content}")

        answer = await gateway.resolve(ask("What is the capital of France?"), user_id="alice")
        print(f"2. exact hit -> still {calls} call(s): {answer.content}")

        answer = await gateway.resolve(ask("What is the capital city of France?"), user_id="bob")
        print(f"3. paraphrase, semantic hit -> still {calls} call(s): {answer.content}")

        before = calls
        answers = await asyncio.gather(
            *(gateway.resolve(ask("Why is the sky blue?")) for _ in range(50))
        )
        distinct = {a.content for a in answers}
        print(f"4. 50 concurrent identical misses -> {calls - before} call, {len(distinct)} answer")

        # a call reserves its estimate (prompt/4 + a 256-token completion allowance,
        # ~266 here) from carol's 300 tokens/min, and is reconciled with the 50
        # tokens the answer reports: what is left is too little for a second call
        questions = ["How do volcanoes form?", "Who wrote Hamlet?"]
        for number, question in enumerate(questions, 1):
            try:
                await gateway.resolve(ask(question), user_id="carol", no_store=True)
                print(f"5. carol's request {number} granted")
            except RateLimitExceeded as exc:
                print(f"5. carol's request {number} refused: {exc}")

        stats = gateway.stats()
        print(
            f"   gateway: {stats.requests} requests, {stats.exact_hits} exact hits, "
            f"{stats.semantic_hits} semantic hits, {stats.coalesced} coalesced, "
            f"{stats.provider_calls} provider calls, {stats.rate_limited} rate limited"
        )

    async with MemoryChatMemory(ChatMemoryConfig(max_turns=2)) as memory:
        for turn in range(1, 5):
            await memory.append("conv-1", "user", f"question {turn}")
            await memory.append("conv-1", "assistant", f"answer {turn}")
        history = await memory.get_history("conv-1")
        print(f"6. chat memory keeps the last 2 turns: {[m['content'] for m in history]}")


if __name__ == "__main__":
    asyncio.run(main())
