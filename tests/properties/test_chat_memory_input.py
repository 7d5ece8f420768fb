"""Chat memories under hostile ids, roles and contents: stored exactly, or refused cleanly.

An append either adds exactly ``{"role": role, "content": content}`` (same types at
every depth) after what was there, or raises :class:`InvalidInputError` /
:class:`InvalidInputTypeError` and leaves the history as it was. A conversation id
is usable by every method or refused by every method the same way. Memory and Redis
answer every input identically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocache_llm import (
    DEFAULT_ROLES,
    AsyncChatMemory,
    InvalidInputError,
    MemoryChatMemory,
    RedisChatMemory,
)
from tests.conftest import RedisTarget
from tests.properties.checks import FAST, REAL, REFUSED, assert_identical
from tests.properties.strategies import any_text, deep_trees, hostile_trees, nested

pytestmark = pytest.mark.timeout(120)

conv_ids = any_text | st.integers() | st.none() | st.binary(max_size=4)
roles = st.sampled_from(sorted(DEFAULT_ROLES)) | any_text | st.integers() | st.none()
contents = hostile_trees | any_text | deep_trees


@pytest.fixture(params=["memory", "fakeredis"])
async def fast_memory(request: pytest.FixtureRequest) -> AsyncIterator[AsyncChatMemory]:
    memory: AsyncChatMemory
    if request.param == "memory":
        memory = MemoryChatMemory()
    else:
        memory = RedisChatMemory(client=fakeredis.FakeAsyncRedis(), key_prefix="props")
    async with memory:
        yield memory


@pytest.fixture
async def real_memory(real_redis: RedisTarget) -> AsyncIterator[AsyncChatMemory]:
    async with RedisChatMemory(client=real_redis.client, key_prefix=real_redis.prefix) as memory:
        yield memory


async def check_append(memory: AsyncChatMemory, conv_id: Any, role: Any, content: Any) -> str:
    try:
        await memory.clear(conv_id)
    except REFUSED as exc:  # an unusable id: refused alike by every method
        with pytest.raises(type(exc), match="conv_id"):
            await memory.append(conv_id, "user", "hello")
        with pytest.raises(type(exc), match="conv_id"):
            await memory.get_history(conv_id)
        return "refused id"
    first = {"role": "user", "content": "first"}
    await memory.append(conv_id, "user", "first")
    try:
        await memory.append(conv_id, role, content)
    except REFUSED:
        assert await memory.get_history(conv_id) == [first], "a refused append changed history"
        return "refused"
    history = await memory.get_history(conv_id)
    assert len(history) == 2
    assert history[0] == first
    assert_identical(history[1], {"role": role, "content": content})
    return "stored"


@FAST
@given(conv_id=conv_ids, role=roles, content=contents)
async def test_any_append_is_stored_exactly_or_refused(
    fast_memory: AsyncChatMemory, conv_id: Any, role: Any, content: Any
) -> None:
    await check_append(fast_memory, conv_id, role, content)


@pytest.mark.redis
@REAL
@given(conv_id=conv_ids, role=roles, content=contents)
async def test_any_append_is_stored_exactly_or_refused_on_real_redis(
    real_memory: AsyncChatMemory, conv_id: Any, role: Any, content: Any
) -> None:
    await check_append(real_memory, conv_id, role, content)


@FAST
@given(conv_id=conv_ids, role=roles, content=contents)
async def test_memory_and_redis_chat_answer_every_input_the_same_way(
    conv_id: Any, role: Any, content: Any
) -> None:
    outcomes = []
    for memory in (MemoryChatMemory(), RedisChatMemory(client=fakeredis.FakeAsyncRedis())):
        async with memory:
            outcomes.append(await check_append(memory, conv_id, role, content))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("depth", [254, 255, 10_000])
async def test_deeply_nested_content_is_stored_or_refused_clearly(
    fast_memory: AsyncChatMemory, depth: int
) -> None:
    content = nested(depth)
    if depth <= 254:  # as deep as any value; the message object around it adds one level
        await fast_memory.append("deep", "user", content)
        assert (await fast_memory.get_history("deep"))[-1]["content"] == content
        return
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        await fast_memory.append("deep", "user", content)
    assert await fast_memory.get_history("deep") == []
