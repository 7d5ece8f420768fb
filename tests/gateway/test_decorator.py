"""@cached_completion: keys from bound arguments, coalescing, methods, invalidation."""

from __future__ import annotations

import asyncio
import inspect
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
