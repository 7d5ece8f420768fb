"""@cached_completion: keys from bound arguments, coalescing, methods, invalidation."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiocache_llm import InvalidInputTypeError, MemoryExactCache, cached_completion


async def test_second_call_is_served_from_the_cache() -> None:
    calls: list[tuple[str, float]] = []

    @cached_completion()
    async def complete(prompt: str, temperature: float = 0.0) -> str:
        calls.append((prompt, temperature))
        return f"answer to {prompt}"

    assert await complete("hi") == "answer to hi"
    assert await complete("hi") == "answer to hi"
    assert await complete("hi", temperature=0.5) == "answer to hi"
    assert calls == [("hi", 0.0), ("hi", 0.5)]


async def test_argument_spelling_and_order_share_one_entry() -> None:
    calls = 0

    @cached_completion()
    async def f(a: int, b: int = 2, *, c: str = "x") -> int:
        nonlocal calls
        calls += 1
        return a + b

    assert await f(1) == 3
    assert await f(1, 2) == 3  # default applied explicitly
    assert await f(a=1, b=2) == 3
    assert await f(b=2, a=1, c="x") == 3
    assert calls == 1
    assert await f(1, c="y") == 3
    assert calls == 2


async def test_var_keyword_order_does_not_matter() -> None:
    calls = 0

    @cached_completion()
    async def f(**options: Any) -> int:
        nonlocal calls
        calls += 1
        return len(options)

    await f(x=1, y=2)
    await f(y=2, x=1)
    assert calls == 1


async def test_concurrent_equal_calls_run_the_function_once() -> None:
    calls = 0

    @cached_completion()
    async def slow(prompt: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return prompt.upper()

    results = await asyncio.gather(*(slow("same") for _ in range(200)))
    assert results == ["SAME"] * 200
    assert calls == 1


async def test_methods_are_cached_without_self_in_the_key() -> None:
    class Assistant:
        def __init__(self) -> None:
            self.calls = 0

        @cached_completion()
        async def ask(self, prompt: str) -> str:
            self.calls += 1
            return f"{prompt}!"

    first, second = Assistant(), Assistant()
    assert await first.ask("hello") == "hello!"
    assert await second.ask("hello") == "hello!"
    assert first.calls + second.calls == 1
    assert inspect.iscoroutinefunction(first.ask)
    assert await first.ask.invalidate("hello") is True
    assert await second.ask.invalidate("hello") is False
    await first.ask("hello")
    assert first.calls + second.calls == 2


async def test_key_function_replaces_the_arguments() -> None:
    calls = 0

    @cached_completion(key=lambda prompt, request_id: prompt.strip().lower())
    async def f(prompt: str, request_id: int) -> str:
        nonlocal calls
        calls += 1
        return prompt

    await f("Hello ", 1)
    await f("hello", 2)
    assert calls == 1


async def test_given_cache_and_ttl_are_used() -> None:
    now = [0.0]
    cache = MemoryExactCache(clock=lambda: now[0])
    calls = 0

    @cached_completion(cache, ttl_seconds=10)
    async def f(x: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"x": x}

    assert await f(1) == {"x": 1}
    assert (await cache.stats()).size == 1
    now[0] = 11
    await f(1)
    assert calls == 2


async def test_invalidate_drops_one_entry() -> None:
    calls = 0

    @cached_completion()
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    await f(1)
    await f(2)
    assert await f.invalidate(1) is True
    await f(1)
    await f(2)
    assert calls == 3


async def test_errors_are_not_cached() -> None:
    calls = 0

    @cached_completion()
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("transient")
        return x

    with pytest.raises(RuntimeError):
        await f(1)
    assert await f(1) == 1


def test_sync_functions_are_refused_at_decoration() -> None:
    with pytest.raises(InvalidInputTypeError, match="async def"):

        @cached_completion()
        def f(x: int) -> int:  # type: ignore[type-var]
            return x


async def test_unkeyable_arguments_raise_a_clear_error() -> None:
    @cached_completion()
    async def f(x: object) -> int:
        return 1

    with pytest.raises(InvalidInputTypeError, match="not JSON-serializable"):
        await f(object())


async def test_wrong_arguments_raise_like_the_function() -> None:
    @cached_completion()
    async def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="missing"):
        await f()  # type: ignore[call-arg]


async def test_async_generators_are_cached_replayed_and_shared() -> None:
    runs = 0

    @cached_completion()
    async def tokens(prompt: str, n: int = 3) -> AsyncIterator[str]:
        nonlocal runs
        runs += 1
        for i in range(n):
            await asyncio.sleep(0.01)
            yield f"{prompt}-{i}"

    async def read(stream: Any) -> list[str]:
        return [item async for item in stream]

    expected = ["a-0", "a-1", "a-2"]
    shared = await asyncio.gather(*(read(tokens("a")) for _ in range(20)))
    assert shared == [expected] * 20
    assert await read(tokens(prompt="a", n=3)) == expected
    assert runs == 1
    assert tokens.gateway.stats().stream_hits == 1
    assert await tokens.invalidate("a")
    assert await read(tokens("a")) == expected
    assert runs == 2


async def test_an_async_def_returning_a_stream_needs_stream_true() -> None:
    async def chunks() -> AsyncIterator[str]:
        yield "x"
        yield "y"

    @cached_completion()
    async def unmarked() -> Any:
        return chunks()

    with pytest.raises(InvalidInputTypeError, match="does not stream"):
        await unmarked()

    calls = 0

    @cached_completion(stream=True)
    async def marked() -> Any:
        nonlocal calls
        calls += 1
        return chunks()

    first, second = await asyncio.gather(marked(), marked())
    assert [c async for c in first] == ["x", "y"]
    assert [c async for c in second] == ["x", "y"]
    assert [c async for c in await marked()] == ["x", "y"]
    assert calls == 1


async def test_generator_methods_leave_self_out_of_the_key() -> None:
    class Bot:
        def __init__(self) -> None:
            self.runs = 0

        @cached_completion()
        async def say(self, text: str) -> AsyncIterator[str]:
            self.runs += 1
            yield text

    one, two = Bot(), Bot()
    assert [c async for c in one.say("hi")] == ["hi"]
    assert [c async for c in two.say("hi")] == ["hi"]
    assert one.runs + two.runs == 1
    assert await two.say.invalidate("hi")
