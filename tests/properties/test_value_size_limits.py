"""The configurable bound on stored sizes, on every backend that stores values or messages.

``max_value_bytes`` (caches) and ``max_message_bytes`` (chat memory) bound the
*encoded* size: a value of exactly the bound is stored and comes back, one byte more
raises :class:`ValueTooLargeError` naming the setting, before any I/O, leaving what was
stored untouched. The default is 16 MiB; ``0`` and ``None`` mean unbounded. A gateway
whose cache refuses an oversized answer still returns it, uncached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from aiocache_llm import (
    DEFAULT_MAX_VALUE_BYTES,
    ChatMemoryConfig,
    InferenceGateway,
    MemoryChatMemory,
    MemoryExactCache,
    MemorySemanticCache,
    RedisChatMemory,
    RedisExactCache,
    RedisSemanticCache,
    ValueTooLargeError,
)
from aiocache_llm.backends.chat_messages import ChatMessageCodec
from aiocache_llm.core.codec import ValueCodec
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(60)

LIMIT = 1000
QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}


def value_of_size(size: int, char: str = "é") -> str:
    """A str whose encoded form is exactly ``size`` bytes (multi-byte chars included)."""
    overhead = len(ValueCodec(max_value_bytes=None).encode(""))
    body = size - overhead
    text = char * (body // len(char.encode())) + "a" * (body % len(char.encode()))
    assert len(ValueCodec(max_value_bytes=None).encode(text)) == size
    return text


def content_of_size(size: int) -> str:
    """A message content whose stored message is exactly ``size`` bytes."""
    codec = ChatMessageCodec(ChatMemoryConfig(), None)
    content = "é" * ((size - len(codec.encode("user", ""))) // 2)
    content += "a" * (size - len(codec.encode("user", content)))
    assert len(codec.encode("user", content)) == size
    return content


def embed(text: str) -> list[float]:
    return [1.0, float(len(text) % 7), 0.5]


def _cache(backend: Backend, kind: str, **kwargs: Any) -> Any:
    redis = backend.redis
    if kind == "exact":
        if redis is None:
            return MemoryExactCache(clock=backend.clock, **kwargs)
        return RedisExactCache(client=redis.client, key_prefix=redis.prefix, **kwargs)
    if redis is None:
        return MemorySemanticCache(embed, clock=backend.clock, embed_in_thread=False, **kwargs)
    return RedisSemanticCache(
        embed, client=redis.client, key_prefix=redis.prefix, embed_in_thread=False, **kwargs
    )


def _memory(backend: Backend, **kwargs: Any) -> Any:
    if backend.redis is None:
        return MemoryChatMemory(clock=backend.clock, **kwargs)
    return RedisChatMemory(client=backend.redis.client, key_prefix=backend.redis.prefix, **kwargs)


@pytest.mark.parametrize("kind", ["exact", "semantic"])
@pytest.mark.parametrize("char", ["a", "é", "🦜"])
async def test_cache_values_up_to_max_value_bytes_are_stored_one_more_byte_is_refused(
    backend: Backend, kind: str, char: str
) -> None:
    async with _cache(backend, kind, max_value_bytes=LIMIT) as cache:
        fits = value_of_size(LIMIT, char)
        await cache.put(QUERY, fits)
        assert await cache.get(QUERY) == fits
        with pytest.raises(ValueTooLargeError, match=f"max_value_bytes={LIMIT}"):
            await cache.put(QUERY, value_of_size(LIMIT + 1, char))
        with pytest.raises(ValueTooLargeError):
            await cache.put(QUERY, {"text": fits})  # containers count their JSON
        assert await cache.get(QUERY) == fits, "a refused value changed nothing"
        assert (await cache.stats()).size == 1


@pytest.mark.parametrize("kind", ["exact", "semantic"])
async def test_the_default_bound_is_16_mib(backend: Backend, kind: str) -> None:
    assert DEFAULT_MAX_VALUE_BYTES == 16 * 1024 * 1024
    async with _cache(backend, kind) as cache:
        with pytest.raises(ValueTooLargeError, match=f"max_value_bytes={DEFAULT_MAX_VALUE_BYTES}"):
            await cache.put(QUERY, value_of_size(DEFAULT_MAX_VALUE_BYTES + 1))
        assert await cache.get(QUERY) is None
        if backend.is_memory:  # sending 16 MiB to a server proves nothing more
            fits = value_of_size(DEFAULT_MAX_VALUE_BYTES, "a")
            await cache.put(QUERY, fits)
            assert await cache.get(QUERY) == fits


@pytest.mark.parametrize("unbounded", [0, None])
async def test_zero_or_none_max_value_bytes_is_unbounded(backend: Backend, unbounded: Any) -> None:
    if not backend.is_memory:
        pytest.skip("the bound is checked before any I/O: memory shows it")
    big = value_of_size(DEFAULT_MAX_VALUE_BYTES + 4096, "a")
    for kind in ("exact", "semantic"):
        async with _cache(backend, kind, max_value_bytes=unbounded) as cache:
            await cache.put(QUERY, big)
            assert await cache.get(QUERY) == big


async def test_chat_messages_up_to_max_message_bytes_are_kept_one_more_byte_is_refused(
    backend: Backend,
) -> None:
    async with _memory(backend, max_message_bytes=LIMIT) as memory:
        fits = content_of_size(LIMIT)
        await memory.append("conv", "user", fits)
        with pytest.raises(ValueTooLargeError, match=f"max_message_bytes={LIMIT}"):
            await memory.append("conv", "user", content_of_size(LIMIT + 1))
        with pytest.raises(ValueTooLargeError):
            await memory.append("conv", "user", [{"type": "text", "text": fits}])
        assert await memory.get_history("conv") == [{"role": "user", "content": fits}]
        assert (await memory.stats()).appended == 1


async def test_chat_default_bound_is_16_mib(backend: Backend) -> None:
    async with _memory(backend) as memory:
        with pytest.raises(
            ValueTooLargeError, match=f"max_message_bytes={DEFAULT_MAX_VALUE_BYTES}"
        ):
            await memory.append("conv", "user", content_of_size(DEFAULT_MAX_VALUE_BYTES + 1))
        assert await memory.get_history("conv") == []


@pytest.mark.parametrize("kind", ["exact", "semantic"])
async def test_a_gateway_serves_an_answer_too_large_to_cache_uncached(
    backend: Backend, kind: str
) -> None:
    big = value_of_size(LIMIT + 1)
    calls = 0

    async def provider(query: Any) -> str:
        nonlocal calls
        calls += 1
        return big

    cache = _cache(backend, kind, max_value_bytes=LIMIT)
    caches: dict[str, Callable[[], Any]] = {
        "exact": lambda: InferenceGateway(provider, exact_cache=cache),
        "semantic": lambda: InferenceGateway(
            provider, MemoryExactCache(max_value_bytes=LIMIT), semantic_cache=cache
        ),
    }
    async with cache, caches[kind]() as gateway:
        assert [await gateway.resolve(QUERY) for _ in range(2)] == [big, big]
        assert calls == 2, "nothing was cached"
        assert (await cache.stats()).size == 0
        if kind == "semantic" or not backend.is_memory:  # guarded caches count it
            assert gateway.stats().backend_errors == 2
