"""The AsyncChatMemory contract: every backend answers these calls the same way."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocache_llm import (
    DEFAULT_ROLES,
    AsyncChatMemory,
    AsyncMessageChatMemory,
    BackendUnavailableError,
    ChatMemoryConfig,
    ClosedResourceError,
    CorruptEntryError,
    InvalidInputError,
    InvalidInputTypeError,
    MemoryChatMemory,
    RedisChatMemory,
    ValueTooLargeError,
)
from aiocache_llm.backends.chat_messages import CONTINUATION_PREFIXES
from aiocache_llm.backends.redis.chat_memory import APPEND_MESSAGES
from tests.conftest import ALL_BACKENDS, Backend, open_backend

CONV = "conv-ü-🦜:with colon"
OTHER_CONV = "another conversation"

Factory = Callable[..., AsyncChatMemory]


@pytest.fixture(params=ALL_BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """This suite also runs on a Redis Cluster and on a Sentinel-managed primary."""
    async with open_backend(request) as opened:
        yield opened


@pytest.fixture
async def make_memory(backend: Backend) -> AsyncIterator[Factory]:
    """Builds memories of the backend under test; every one built shares its storage.

    ``own_client=True`` gives a Redis memory its own connection (another process, in
    effect); memory backends are private to their object, so it means nothing there.
    """
    made: list[AsyncChatMemory] = []
    extra_clients: list[Redis] = []

    def make(*, own_client: bool = False, **kwargs: Any) -> AsyncChatMemory:
        memory: AsyncChatMemory
        if backend.redis is None:
            memory = MemoryChatMemory(clock=backend.clock, **kwargs)
        elif not own_client:
            memory = RedisChatMemory(
                client=backend.redis.client, key_prefix=backend.redis.prefix, **kwargs
            )
        elif backend.redis.url is not None:
            memory = RedisChatMemory(
                url=backend.redis.url, key_prefix=backend.redis.prefix, **kwargs
            )
        else:
            server = backend.redis.client.connection_pool.connection_kwargs["server"]
            client: Redis = fakeredis.FakeAsyncRedis(server=server)
            extra_clients.append(client)
            memory = RedisChatMemory(client=client, key_prefix=backend.redis.prefix, **kwargs)
        made.append(memory)
        return memory

    yield make
    for memory in made:
        await memory.aclose()
    for client in extra_clients:
        await client.aclose()


@pytest.fixture
def memory(make_memory: Factory) -> AsyncChatMemory:
    return make_memory()


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


async def test_is_an_async_chat_memory(memory: AsyncChatMemory) -> None:
    assert isinstance(memory, AsyncChatMemory)


async def test_history_is_oldest_first(memory: AsyncChatMemory) -> None:
    assert await memory.get_history(CONV) == []
    await memory.append(CONV, "system", "Be brief.")
    await memory.append(CONV, "user", "Capital of France?")
    await memory.append(CONV, "assistant", "Paris.")
    assert await memory.get_history(CONV) == [
        {"role": "system", "content": "Be brief."},
        user("Capital of France?"),
        assistant("Paris."),
    ]


async def test_a_full_window_of_turns_is_kept_whole(make_memory: Factory) -> None:
    memory = make_memory(config=ChatMemoryConfig(max_turns=3))
    expected = []
    for turn in range(3):
        await memory.append(CONV, "user", f"q{turn}")
        await memory.append(CONV, "assistant", f"a{turn}")
        expected += [user(f"q{turn}"), assistant(f"a{turn}")]
    assert await memory.get_history(CONV) == expected


async def test_trim_keeps_exactly_the_newest_two_messages_per_turn(make_memory: Factory) -> None:
    memory = make_memory(config=ChatMemoryConfig(max_turns=3))
    for i in range(11):
        await memory.append(CONV, "user", f"m{i}")
    assert await memory.get_history(CONV) == [user(f"m{i}") for i in range(5, 11)]


async def test_every_default_role_is_accepted(memory: AsyncChatMemory) -> None:
    roles = sorted(DEFAULT_ROLES)
    for role in roles:
        await memory.append(CONV, role, f"as {role}")
    history = await memory.get_history(CONV)
    assert [m["role"] for m in history] == roles


async def test_configured_roles_replace_the_defaults(make_memory: Factory) -> None:
    memory = make_memory(config=ChatMemoryConfig(roles=frozenset({"user", "critic"})))
    await memory.append(CONV, "critic", "too long")
    with pytest.raises(InvalidInputError, match=r"role must be one of \['critic', 'user'\]"):
        await memory.append(CONV, "assistant", "hello")
    assert await memory.get_history(CONV) == [{"role": "critic", "content": "too long"}]


@pytest.mark.parametrize(
    "content",
    [
        "",
        "emoji 🦜👩‍👩‍👧 and accents é",
        "nul \x00 inside",
        "line separators \u2028 \u2029 and \r\n",
        "null",
        [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
        {"nested": [{"deep": [1, 2.5, -3e-7, True, None, {"": "empty key"}]}], "n": None},
        [2**63 - 1, -(2**63), 0.1, "\U0010ffff"],
        [],
        {},
    ],
    ids=[
        "empty",
        "emoji",
        "nul",
        "u2028",
        "null-text",
        "parts",
        "nested",
        "int64-bounds",
        "empty-list",
        "empty-dict",
    ],
)
async def test_content_round_trips_equal_and_same_type(
    memory: AsyncChatMemory, content: Any
) -> None:
    await memory.append(CONV, "user", content)
    [message] = await memory.get_history(CONV)
    assert type(message["content"]) is type(content)
    assert message == user(content)


async def test_content_keeps_its_key_order(memory: AsyncChatMemory) -> None:
    # providers see the history as sent: key order matters to prompt caching and diffs
    content = {"z": 1, "a": {"y": [{"k": 2, "b": 3}], "c": None}}
    await memory.append(CONV, "tool", content)
    [message] = await memory.get_history(CONV)
    assert list(message) == ["role", "content"]
    assert orjson.dumps(message["content"]) == orjson.dumps(content)


async def test_returned_history_is_a_fresh_copy(memory: AsyncChatMemory) -> None:
    parts = [{"type": "text", "text": "hi"}]
    await memory.append(CONV, "user", parts)
    parts[0]["text"] = "changed after append"
    first = await memory.get_history(CONV)
    first[0]["content"][0]["text"] = "changed in the result"
    first[0]["role"] = "assistant"
    first.append(user("extra"))
    assert await memory.get_history(CONV) == [user([{"type": "text", "text": "hi"}])]


async def test_clear_forgets_only_that_conversation(memory: AsyncChatMemory) -> None:
    await memory.append(CONV, "user", "mine")
    await memory.append(OTHER_CONV, "user", "theirs")
    await memory.clear(CONV)
    assert await memory.get_history(CONV) == []
    assert await memory.get_history(OTHER_CONV) == [user("theirs")]
    await memory.clear("never existed")
    await memory.append(CONV, "user", "fresh start")
    assert await memory.get_history(CONV) == [user("fresh start")]


async def test_conversations_are_isolated(make_memory: Factory) -> None:
    memory = make_memory(config=ChatMemoryConfig(max_turns=1))
    ids = [CONV, OTHER_CONV, "a", "A", "a:b", "a*"]
    for i in range(3):
        for conv in ids:
            await memory.append(conv, "user", f"{conv}/{i}")
    for conv in ids:
        assert await memory.get_history(conv) == [user(f"{conv}/1"), user(f"{conv}/2")]


async def test_conversation_expires_after_ttl(make_memory: Factory, backend: Backend) -> None:
    memory = make_memory(config=ChatMemoryConfig(ttl_seconds=0.3))
    await memory.append(CONV, "user", "hello")
    await memory.append(OTHER_CONV, "user", "other")
    assert await memory.get_history(CONV) == [user("hello")]
    await backend.wait(0.45)
    assert await memory.get_history(CONV) == []
    assert await memory.get_history(OTHER_CONV) == []


async def test_append_refreshes_ttl_but_reading_does_not(
    make_memory: Factory, backend: Backend
) -> None:
    memory = make_memory(config=ChatMemoryConfig(ttl_seconds=0.4))
    await memory.append(CONV, "user", "q")
    await memory.append(OTHER_CONV, "user", "read only")
    await backend.wait(0.25)
    await memory.append(CONV, "assistant", "a")
    assert await memory.get_history(OTHER_CONV) == [user("read only")]
    await backend.wait(0.25)
    # 0.5 s after the first append, 0.25 s after the refresh
    assert await memory.get_history(CONV) == [user("q"), assistant("a")]
    assert await memory.get_history(OTHER_CONV) == []
    await backend.wait(0.3)
    assert await memory.get_history(CONV) == []


async def test_sub_second_ttl_is_kept_to_the_millisecond(
    make_memory: Factory, backend: Backend
) -> None:
    memory = make_memory(config=ChatMemoryConfig(ttl_seconds=0.15))
    await memory.append(CONV, "user", "short-lived")
    if backend.redis is not None:
        assert isinstance(memory, RedisChatMemory)
        assert 0 < await backend.redis.client.pttl(memory.key(CONV)) <= 150
    else:
        await backend.wait(0.149)
        assert await memory.get_history(CONV) == [user("short-lived")]
    await backend.wait(0.3)
    assert await memory.get_history(CONV) == []


async def test_without_ttl_a_conversation_does_not_expire(
    memory: AsyncChatMemory, backend: Backend
) -> None:
    await memory.append(CONV, "user", "keep me")
    if backend.redis is not None:
        assert isinstance(memory, RedisChatMemory)
        assert await backend.redis.client.pttl(memory.key(CONV)) == -1
    else:
        await backend.wait(10**6)
    assert await memory.get_history(CONV) == [user("keep me")]


class _Unserializable:
    pass


@pytest.mark.parametrize(
    ("conv_id", "role", "content", "error", "match"),
    [
        ("", "user", "hi", InvalidInputError, "conv_id"),
        (42, "user", "hi", InvalidInputTypeError, "conv_id"),
        (None, "user", "hi", InvalidInputTypeError, "conv_id"),
        ("lone \ud800", "user", "hi", InvalidInputError, "conv_id"),
        (CONV, "wizard", "hi", InvalidInputError, r"role must be one of \[.*'assistant'"),
        (CONV, "USER", "hi", InvalidInputError, "role"),
        (CONV, "", "hi", InvalidInputError, "role"),
        (CONV, None, "hi", InvalidInputTypeError, "role"),
        (CONV, "user", None, InvalidInputTypeError, "content"),
        (CONV, "user", 42, InvalidInputTypeError, "content"),
        (CONV, "user", b"bytes", InvalidInputTypeError, "content"),
        (CONV, "user", ("a", "tuple"), InvalidInputTypeError, "content"),
        (CONV, "user", {"x": float("nan")}, InvalidInputError, "content"),
        (CONV, "user", [{"score": float("inf")}], InvalidInputError, "content"),
        (CONV, "user", [{"x": _Unserializable()}], InvalidInputTypeError, "content"),
        (CONV, "user", {1: "non-str key"}, InvalidInputTypeError, "content"),
        (CONV, "user", [("nested", "tuple")], InvalidInputError, "content"),
        (CONV, "user", [{1, 2}], InvalidInputTypeError, "content"),
        (CONV, "user", [2**64], InvalidInputTypeError, "content"),
        (CONV, "user", "lone \udfff surrogate", InvalidInputError, "content"),
    ],
    ids=[
        "empty-id",
        "int-id",
        "none-id",
        "surrogate-id",
        "unknown-role",
        "role-case",
        "empty-role",
        "none-role",
        "none-content",
        "int-content",
        "bytes-content",
        "tuple-content",
        "nan",
        "nested-inf",
        "object",
        "int-key",
        "nested-tuple",
        "set",
        "int-beyond-64-bits",
        "surrogate-content",
    ],
)
async def test_bad_append_raises_and_keeps_the_history(
    memory: AsyncChatMemory,
    conv_id: Any,
    role: Any,
    content: Any,
    error: type[Exception],
    match: str,
) -> None:
    await memory.append(CONV, "user", "kept")
    with pytest.raises(error, match=match):
        await memory.append(conv_id, role, content)
    assert await memory.get_history(CONV) == [user("kept")]
    assert (await memory.stats()).appended == 1


@pytest.mark.parametrize(
    ("conv_id", "error"),
    [("", InvalidInputError), (b"bytes", InvalidInputTypeError), (1.5, InvalidInputTypeError)],
    ids=["empty", "bytes", "float"],
)
async def test_bad_conv_id_raises_on_every_method(
    memory: AsyncChatMemory, conv_id: Any, error: type[Exception]
) -> None:
    await memory.append(CONV, "user", "kept")
    with pytest.raises(error, match="conv_id"):
        await memory.get_history(conv_id)
    with pytest.raises(error, match="conv_id"):
        await memory.clear(conv_id)
    assert await memory.get_history(CONV) == [user("kept")]
    stats = await memory.stats()
    assert (stats.reads, stats.cleared) == (1, 0)


async def test_oversized_message_raises_value_too_large(make_memory: Factory) -> None:
    memory = make_memory(max_message_bytes=100)
    await memory.append(CONV, "user", "small")
    with pytest.raises(ValueTooLargeError, match="max_message_bytes=100"):
        await memory.append(CONV, "user", "x" * 100)
    with pytest.raises(ValueTooLargeError):
        await memory.append(CONV, "user", [{"type": "text", "text": "é" * 50}])
    assert await memory.get_history(CONV) == [user("small")]


async def test_zero_max_message_bytes_means_unbounded(make_memory: Factory) -> None:
    memory = make_memory(max_message_bytes=0)
    big = "x" * (17 * 1024 * 1024)
    await memory.append(CONV, "user", big)
    [message] = await memory.get_history(CONV)
    assert len(message["content"]) == len(big)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"config": {"max_turns": 5}}, InvalidInputTypeError),
        ({"config": 5}, InvalidInputTypeError),
        ({"max_message_bytes": -1}, InvalidInputError),
        ({"max_message_bytes": 1.5}, InvalidInputTypeError),
    ],
    ids=["dict-config", "int-config", "negative-bound", "float-bound"],
)
async def test_bad_construction_raises(
    make_memory: Factory, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        make_memory(**kwargs)


async def test_none_config_means_the_defaults(make_memory: Factory) -> None:
    memory = make_memory(config=None)
    assert isinstance(memory, (MemoryChatMemory, RedisChatMemory))
    assert memory.config == ChatMemoryConfig()
    for i in range(45):
        await memory.append(CONV, "user", str(i))
    assert [m["content"] for m in await memory.get_history(CONV)] == [str(i) for i in range(5, 45)]


async def test_instances_on_the_same_storage_share_history(
    make_memory: Factory, backend: Backend
) -> None:
    if backend.is_memory:
        pytest.skip("memory backends are private to their object")
    writer, reader = make_memory(), make_memory(own_client=True)
    await writer.append(CONV, "user", "q")
    await reader.append(CONV, "assistant", "a")
    assert await writer.get_history(CONV) == [user("q"), assistant("a")]
    assert await reader.get_history(CONV) == [user("q"), assistant("a")]
    await reader.clear(CONV)
    assert await writer.get_history(CONV) == []


async def test_concurrent_writers_keep_the_newest_in_each_writers_order(
    make_memory: Factory, backend: Backend
) -> None:
    writers, per_writer, max_turns = 5, 40, 10
    config = ChatMemoryConfig(max_turns=max_turns)
    shared = make_memory(config=config)
    memories = [
        shared if backend.is_memory else make_memory(config=config, own_client=True)
        for _ in range(writers)
    ]

    async def write(writer: int) -> None:
        for seq in range(per_writer):
            await memories[writer].append(CONV, "user", {"writer": writer, "seq": seq})
            # in-memory appends never yield: make the writers interleave
            await asyncio.sleep(0)

    await asyncio.gather(*(write(w) for w in range(writers)))
    history = await shared.get_history(CONV)
    assert len(history) == 2 * max_turns
    contents = [m["content"] for m in history]
    assert len({(c["writer"], c["seq"]) for c in contents}) == len(contents)
    for writer in range(writers):
        kept = [c["seq"] for c in contents if c["writer"] == writer]
        # whatever survives of a writer is the end of its sequence, in its order
        assert kept == list(range(per_writer - len(kept), per_writer))
    assert sum([(await m.stats()).appended for m in set(memories)]) == writers * per_writer


async def test_stats_count_successful_calls(memory: AsyncChatMemory) -> None:
    assert await memory.stats() == type(await memory.stats())()
    await memory.append(CONV, "user", "q")
    await memory.append(CONV, "assistant", "a")
    await memory.get_history(CONV)
    await memory.clear(CONV)
    with pytest.raises(InvalidInputError):
        await memory.append(CONV, "nobody", "x")
    stats = await memory.stats()
    assert (stats.appended, stats.reads, stats.cleared) == (2, 1, 1)
    with pytest.raises(Exception, match="frozen"):
        stats.appended = 5


async def test_repr_is_informative(make_memory: Factory) -> None:
    memory = make_memory(config=ChatMemoryConfig(max_turns=7, ttl_seconds=2.5))
    await memory.append(CONV, "user", "q")
    await memory.get_history(CONV)
    text = repr(memory)
    assert text.startswith(type(memory).__name__ + "(")
    for part in ("max_turns=7", "ttl_seconds=2.5", "appended=1", "reads=1"):
        assert part in text


async def test_closed_memory_refuses_calls(make_memory: Factory) -> None:
    memory = make_memory()
    async with memory:
        await memory.append(CONV, "user", "q")
    with pytest.raises(ClosedResourceError):
        await memory.append(CONV, "user", "again")
    with pytest.raises(ClosedResourceError):
        await memory.get_history(CONV)
    await memory.aclose()


# Memory only: the injectable clock and housekeeping.


async def test_expired_conversations_are_purged(clock: Any) -> None:
    memory = MemoryChatMemory(ChatMemoryConfig(ttl_seconds=1.0), clock=clock)
    for i in range(100):
        await memory.append(f"c{i}", "user", "x")
    assert "conversations=100" in repr(memory)
    clock.advance(0.5)
    await memory.append("late", "user", "x")
    clock.advance(0.6)
    # the first 100 expired, "late" has not: one call purges exactly those
    assert await memory.get_history("late") == [user("x")]
    assert "conversations=1," in repr(memory)


async def test_an_expired_conversation_is_purged_behind_a_refreshed_one(clock: Any) -> None:
    memory = MemoryChatMemory(ChatMemoryConfig(ttl_seconds=1.0), clock=clock)
    await memory.append("refreshed", "user", "x")
    await memory.append("abandoned", "user", "x")
    clock.advance(0.9)
    await memory.append("refreshed", "assistant", "y")
    clock.advance(0.6)
    assert await memory.get_history("refreshed") == [user("x"), assistant("y")]
    assert "conversations=1," in repr(memory)


async def test_memory_refuses_a_clock_that_cannot_be_called() -> None:
    with pytest.raises(InvalidInputTypeError, match="clock"):
        MemoryChatMemory(clock=42)  # type: ignore[arg-type]


async def test_memory_default_clock_is_real_time() -> None:
    memory = MemoryChatMemory(ChatMemoryConfig(ttl_seconds=0.05))
    await memory.append(CONV, "user", "x")
    assert await memory.get_history(CONV) == [user("x")]
    await asyncio.sleep(0.1)
    assert await memory.get_history(CONV) == []


# Whole messages: tool calls and their results (AsyncMessageChatMemory).


def call(call_id: str, name: str = "get_weather") -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps({"city": call_id}).decode()},
    }


def openai_round(n: int) -> list[dict[str, Any]]:
    """user -> assistant tool call (content None) -> two tool results -> assistant answer."""
    first, second = f"call_{n}a", f"call_{n}b"
    return [
        {"role": "user", "content": f"weather {n}?"},
        {"role": "assistant", "content": None, "tool_calls": [call(first), call(second)]},
        {"role": "tool", "tool_call_id": first, "content": f"sunny {n}"},
        {"role": "tool", "tool_call_id": second, "content": [{"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": f"answer {n}", "refusal": None},
    ]


def anthropic_round(n: int) -> list[dict[str, Any]]:
    """user -> assistant text + tool_use -> user tool_result blocks -> assistant text."""
    use = f"toolu_{n}"
    return [
        {"role": "user", "content": [{"type": "text", "text": f"weather {n}?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": use, "name": "get_weather", "input": {"n": n}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use, "content": "sunny"},
                {"type": "tool_result", "tool_use_id": use, "content": [], "is_error": True},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": f"answer {n}"}]},
    ]


def is_tool_result(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return message["role"] == "tool" or (
        message["role"] == "user"
        and isinstance(content, list)
        and bool(content)
        and all(part.get("type") == "tool_result" for part in content)
    )


def assert_replayable(history: list[dict[str, Any]]) -> None:
    """What the OpenAI and Anthropic APIs require of tool messages in a history."""
    assert not history or not is_tool_result(history[0]), history[0]
    called: set[str] = set()
    for message in history:
        for tool_call in message.get("tool_calls") or []:
            called.add(tool_call["id"])
        content = message.get("content")
        if isinstance(content, list):
            called |= {p["id"] for p in content if p.get("type") == "tool_use"}
            for part in content:
                if part.get("type") == "tool_result":
                    assert part["tool_use_id"] in called, f"orphan tool_result {part}"
        if message["role"] == "tool":
            assert message["tool_call_id"] in called, f"orphan tool result {message}"


def expected_history(appended: list[dict[str, Any]], kept: int, keep: int) -> int:
    """How many messages the trim rule keeps after an append (written apart from the code)."""
    if kept <= keep:
        return kept
    window = appended[len(appended) - keep :]
    for index, message in enumerate(window):
        if not is_tool_result(message):
            return keep - index
    raise AssertionError("the test never appends a window of only tool results")


def same_json(left: object, right: object) -> bool:
    """Equal, key order included (providers see key order: prompt caching, diffs)."""
    return orjson.dumps(left) == orjson.dumps(right)


async def test_is_an_async_message_chat_memory(memory: AsyncChatMemory) -> None:
    assert isinstance(memory, AsyncMessageChatMemory)
    assert not isinstance(object(), AsyncMessageChatMemory)


@pytest.mark.parametrize("max_turns", [2, 3, 5])
@pytest.mark.parametrize("shape", ["openai", "anthropic"])
@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
async def test_a_tool_conversation_replays_exactly_and_never_starts_with_a_tool_result(
    make_memory: Factory, max_turns: int, shape: str, batched: bool
) -> None:
    memory = make_memory(config=ChatMemoryConfig(max_turns=max_turns))
    assert isinstance(memory, AsyncMessageChatMemory)
    keep = 2 * max_turns
    appended: list[dict[str, Any]] = []
    kept = 0
    trimmed_below_the_bound = False
    for n in range(6):
        messages = openai_round(n) if shape == "openai" else anthropic_round(n)
        # a call and its results go in together when batched, one by one otherwise
        steps = (
            [messages[:1], messages[1:-1], messages[-1:]]
            if batched
            else [[message] for message in messages]
        )
        for step in steps:
            if len(step) == 1 and not batched:
                await memory.append_message(CONV, step[0])
            else:
                await memory.append_messages(CONV, step)
            appended += step
            kept = expected_history(appended, kept + len(step), keep)
            history = await memory.get_history(CONV)
            assert len(history) == kept <= keep
            trimmed_below_the_bound |= kept < keep and len(appended) > keep
            assert_replayable(history)
            # exactly the newest messages, each as given: same keys, same order
            assert same_json(history, appended[len(appended) - kept :])
    assert len(appended) > 2 * keep
    # one by one, the window meets every position: some trims must go past tool results
    assert trimmed_below_the_bound or batched


async def test_a_message_comes_back_exactly_as_given(memory: AsyncChatMemory) -> None:
    assert isinstance(memory, AsyncMessageChatMemory)
    given = [
        {"content": "key order is kept", "role": "system"},
        {"role": "developer", "content": "and extra keys", "cache_control": {"type": "ephemeral"}},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "hi"}]},
        {"tool_calls": [call("c1")], "role": "assistant"},  # content left out: kept out
        {"role": "tool", "tool_call_id": "c1", "content": ""},
        {"role": "assistant", "content": None, "refusal": "I can't help with that."},
        {"role": "user", "content": {"seed": "dict content"}},
    ]
    for message in given:
        await memory.append_message(CONV, message)
    history = await memory.get_history(CONV)
    assert same_json(history, given)
    assert "content" not in history[3]
    # fresh copies: changing the result or the argument changes nothing stored
    history[3]["tool_calls"][0]["id"] = "changed"
    given[2]["content"][0]["text"] = "changed"
    assert (await memory.get_history(CONV))[3]["tool_calls"][0]["id"] == "c1"
    assert (await memory.get_history(CONV))[2]["content"][0]["text"] == "hi"
    assert (await memory.stats()).appended == len(given)


async def test_the_seed_form_and_a_seed_shaped_message_are_the_same_message(
    memory: AsyncChatMemory,
) -> None:
    assert isinstance(memory, AsyncMessageChatMemory)
    await memory.append(CONV, "user", "hi")
    await memory.append_message(CONV, user("hi"))
    await memory.append(CONV, "user", [{"type": "tool_result", "tool_use_id": "x"}])
    first, second, third = await memory.get_history(CONV)
    assert first == second == user("hi")
    assert list(third) == ["role", "content"]


async def test_an_assistant_reply_without_content_needs_what_carries_it(
    memory: AsyncChatMemory,
) -> None:
    assert isinstance(memory, AsyncMessageChatMemory)
    await memory.append(CONV, "user", "kept")
    # (role, content) has no room for tool_calls: None would be a reply with nothing in it
    with pytest.raises(InvalidInputTypeError, match="append_message"):
        await memory.append(CONV, "assistant", None)
    for message in (
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": None, "tool_calls": [call("c")]},
    ):
        with pytest.raises(InvalidInputError, match="content"):
            await memory.append_message(CONV, message)
    assert await memory.get_history(CONV) == [user("kept")]
    reply = {"role": "assistant", "content": None, "tool_calls": [call("c")]}
    await memory.append_message(CONV, reply)
    assert await memory.get_history(CONV) == [user("kept"), reply]


BAD_MESSAGES: dict[str, tuple[Any, type[Exception], str]] = {
    "list": ([user("hi")], InvalidInputTypeError, "message must be a dict"),
    "str": ("hi", InvalidInputTypeError, "message must be a dict"),
    "none": (None, InvalidInputTypeError, "message must be a dict"),
    "no-role": ({"content": "hi"}, InvalidInputError, "role"),
    "unknown-role": ({"role": "wizard", "content": "hi"}, InvalidInputError, "role must be one"),
    "int-role": ({"role": 1, "content": "hi"}, InvalidInputTypeError, "role"),
    "tool-call-id-int": (
        {"role": "tool", "tool_call_id": 7, "content": "x"},
        InvalidInputTypeError,
        "tool_call_id",
    ),
    "name-none": ({"role": "user", "name": None, "content": "x"}, InvalidInputTypeError, "name"),
    "content-int": ({"role": "user", "content": 5}, InvalidInputTypeError, "content"),
    "content-bytes": ({"role": "user", "content": b"x"}, InvalidInputTypeError, "content"),
    "content-tuple": ({"role": "user", "content": ("a",)}, InvalidInputTypeError, "content"),
    "user-none": ({"role": "user", "content": None}, InvalidInputError, "content"),
    "tool-calls-dict": (
        {"role": "assistant", "content": "x", "tool_calls": {"id": "c"}},
        InvalidInputTypeError,
        "tool_calls",
    ),
    "tool-calls-none": (
        {"role": "assistant", "content": "x", "tool_calls": None},
        InvalidInputTypeError,
        "exclude_none",
    ),
    "tool-calls-of-str": (
        {"role": "assistant", "content": None, "tool_calls": ["c"]},
        InvalidInputTypeError,
        "tool_calls",
    ),
    "nan-in-arguments": (
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "x": float("nan")}]},
        InvalidInputError,
        "non-finite",
    ),
    "inf-in-part": (
        {"role": "user", "content": [{"type": "text", "score": float("inf")}]},
        InvalidInputError,
        "non-finite",
    ),
    "nested-tuple": (
        {"role": "user", "content": [{"type": "x", "v": (1, 2)}]},
        InvalidInputError,
        "round trip",
    ),
    "set": ({"role": "user", "content": "x", "meta": {1, 2}}, InvalidInputTypeError, "message"),
    "int-key": ({"role": "user", "content": "x", 1: "y"}, InvalidInputTypeError, "message"),
    "surrogate": (
        {"role": "user", "content": "x", "name": "\ud800"},
        InvalidInputError,
        "Unicode",
    ),
}


@pytest.mark.parametrize(("message", "error", "match"), BAD_MESSAGES.values(), ids=BAD_MESSAGES)
async def test_a_bad_message_raises_and_changes_nothing(
    memory: AsyncChatMemory, message: Any, error: type[Exception], match: str
) -> None:
    assert isinstance(memory, AsyncMessageChatMemory)
    await memory.append(CONV, "user", "kept")
    with pytest.raises(error, match=match):
        await memory.append_message(CONV, message)
    # in a batch, one bad message refuses the whole batch
    good = {"role": "assistant", "content": "fine"}
    with pytest.raises(error, match=match):
        await memory.append_messages(CONV, [good, message])
    with pytest.raises(error, match=match):
        await memory.append_messages(OTHER_CONV, [good, message])
    assert await memory.get_history(CONV) == [user("kept")]
    assert await memory.get_history(OTHER_CONV) == []
    assert (await memory.stats()).appended == 1


@pytest.mark.parametrize(
    "messages", ["hi", b"hi", user("hi"), 42, None], ids=["str", "bytes", "dict", "int", "none"]
)
async def test_append_messages_takes_a_list_of_messages(
    memory: AsyncChatMemory, messages: Any
) -> None:
    assert isinstance(memory, AsyncMessageChatMemory)
    with pytest.raises(InvalidInputTypeError, match="messages must be a list"):
        await memory.append_messages(CONV, messages)
    assert await memory.get_history(CONV) == []


async def test_an_oversized_message_raises_value_too_large(make_memory: Factory) -> None:
    memory = make_memory(max_message_bytes=200)
    assert isinstance(memory, AsyncMessageChatMemory)
    big = {"role": "assistant", "content": None, "tool_calls": [call("x" * 200)]}
    with pytest.raises(ValueTooLargeError, match="max_message_bytes=200"):
        await memory.append_messages(CONV, [user("q"), big])
    assert await memory.get_history(CONV) == []


async def test_appending_no_messages_does_nothing(make_memory: Factory, backend: Backend) -> None:
    memory = make_memory(config=ChatMemoryConfig(ttl_seconds=1))
    assert isinstance(memory, AsyncMessageChatMemory)
    await memory.append_messages(CONV, [])
    await memory.append_messages(CONV, iter([]))
    assert await memory.get_history(CONV) == []
    assert (await memory.stats()).appended == 0
    await memory.append(CONV, "user", "q")
    await backend.wait(0.6)
    await memory.append_messages(CONV, [])  # appends nothing, so refreshes nothing
    await backend.wait(0.6)
    assert await memory.get_history(CONV) == []


async def test_a_large_batch_is_appended_whole_and_trimmed_like_single_appends(
    make_memory: Factory,
) -> None:
    memory = make_memory(config=ChatMemoryConfig(max_turns=1000))
    assert isinstance(memory, AsyncMessageChatMemory)
    batch = [user(f"m{i}") for i in range(2500)]  # more than one Lua unpack slice
    await memory.append_messages(CONV, batch[:1500])
    assert await memory.get_history(CONV) == batch[:1500]
    await memory.append_messages(CONV, batch[1500:])
    assert await memory.get_history(CONV) == batch[-2000:]
    await memory.clear(CONV)
    await memory.append_messages(CONV, batch)
    assert await memory.get_history(CONV) == batch[-2000:]
    assert (await memory.stats()).appended == 5000


async def test_a_call_with_more_results_than_the_bound_is_refused_whole(
    make_memory: Factory,
) -> None:
    memory = make_memory(config=ChatMemoryConfig(max_turns=1))
    assert isinstance(memory, AsyncMessageChatMemory)
    question, tool_call, first, second, _ = openai_round(0)
    await memory.append_message(CONV, question)
    # keeping the newest two would keep two results without their call
    with pytest.raises(InvalidInputError, match="nothing appended"):
        await memory.append_messages(CONV, [tool_call, first, second])
    assert await memory.get_history(CONV) == [question]
    await memory.append_messages(CONV, [tool_call, first])
    assert await memory.get_history(CONV) == [tool_call, first]
    with pytest.raises(InvalidInputError, match="nothing appended"):
        await memory.append_message(CONV, second)
    assert await memory.get_history(CONV) == [tool_call, first]
    assert (await memory.stats()).appended == 3


async def test_a_tool_result_appended_first_is_kept_until_a_trim(make_memory: Factory) -> None:
    # within the bound nothing is dropped: the seed form allowed a lone tool message
    memory = make_memory(config=ChatMemoryConfig(max_turns=2))
    assert isinstance(memory, AsyncMessageChatMemory)
    result = {"role": "tool", "tool_call_id": "lost", "content": "42"}
    await memory.append_message(CONV, result)
    await memory.append(CONV, "tool", "seed-form tool message")
    await memory.append(CONV, "user", "q")
    await memory.append(CONV, "assistant", "a")
    assert len(await memory.get_history(CONV)) == 4
    await memory.append(CONV, "user", "q2")
    # one over the bound: the trim goes past both tool messages, to the user message
    assert await memory.get_history(CONV) == [user("q"), assistant("a"), user("q2")]


async def test_concurrent_tool_calls_stay_whole_and_histories_stay_replayable(
    make_memory: Factory, backend: Backend
) -> None:
    writers, rounds, max_turns = 4, 12, 3
    config = ChatMemoryConfig(max_turns=max_turns)
    shared = make_memory(config=config)
    memories = [
        shared if backend.is_memory else make_memory(config=config, own_client=True)
        for _ in range(writers)
    ]
    done = asyncio.Event()
    seen = 0

    async def write(writer: int) -> None:
        memory = memories[writer]
        assert isinstance(memory, AsyncMessageChatMemory)
        for n in range(rounds):
            call_id = f"{writer}-{n}"
            await memory.append_message(CONV, user(call_id))
            await asyncio.sleep(0)
            await memory.append_messages(
                CONV,
                [
                    {"role": "assistant", "content": None, "tool_calls": [call(call_id)]},
                    {"role": "tool", "tool_call_id": call_id, "content": "ok"},
                ],
            )
            await asyncio.sleep(0)

    async def read() -> None:
        nonlocal seen
        while not done.is_set():
            history = await shared.get_history(CONV)
            assert len(history) <= 2 * max_turns
            assert_replayable(history)
            seen += 1
            await asyncio.sleep(0)

    reader = asyncio.create_task(read())
    await asyncio.gather(*(write(w) for w in range(writers)))
    done.set()
    await reader
    assert seen > 0
    history = await shared.get_history(CONV)
    assert_replayable(history)
    for index, message in enumerate(history):
        # a call and its result were appended in one step: always next to each other
        if message.get("tool_calls"):
            assert history[index + 1]["tool_call_id"] == message["tool_calls"][0]["id"]
    total = sum([(await m.stats()).appended for m in set(memories)])
    assert total == writers * rounds * 3


async def test_a_replayed_history_is_accepted_by_the_openai_sdk(make_memory: Factory) -> None:
    from tests.support.openai_server import FakeOpenAIServer

    memory = make_memory(config=ChatMemoryConfig(max_turns=3))
    assert isinstance(memory, AsyncMessageChatMemory)
    for n in range(3):
        question, tool_call, *results, answer = openai_round(n)
        await memory.append_message(CONV, question)
        await memory.append_messages(CONV, [tool_call, *results])
        await memory.append_message(CONV, answer)
    history = await memory.get_history(CONV)
    assert history[0]["role"] == "assistant"  # the trim cut into round 1's tool results
    async with FakeOpenAIServer() as server:
        client = server.client()
        completion = await client.chat.completions.create(
            model="gpt-test", messages=[*history, user("and tomorrow?")]
        )
        assert completion.choices[0].message.content == "Echo: and tomorrow?"
        # the SDK sent the stored messages as they are
        assert server.bodies[-1]["messages"][:-1] == history


# Redis only: the data layout, and what other writers or a dead server do to us.


@pytest.fixture
def redis_memory(make_memory: Factory, backend: Backend) -> RedisChatMemory:
    if backend.is_memory:
        pytest.skip("Redis backends only")
    memory = make_memory()
    assert isinstance(memory, RedisChatMemory)
    return memory


async def test_conversation_is_a_list_of_plain_json_under_prefix_colon_id(
    redis_memory: RedisChatMemory, backend: Backend
) -> None:
    assert backend.redis is not None
    await redis_memory.append(CONV, "user", [{"type": "text", "text": "hi"}])
    await redis_memory.append(CONV, "assistant", "hello")
    # ':' and '%' in the id are escaped so nested tenant prefixes never meet
    key = f"{backend.redis.prefix}:{CONV.replace(':', '%3A')}"
    assert redis_memory.key(CONV) == key
    assert await backend.redis.client.type(key) == b"list"
    stored = await backend.redis.client.lrange(key, 0, -1)
    assert [orjson.loads(item) for item in stored] == [
        user([{"type": "text", "text": "hi"}]),
        assistant("hello"),
    ]
    await redis_memory.clear(CONV)
    assert await backend.redis.client.exists(key) == 0


async def test_whole_messages_are_tagged_and_seed_shaped_ones_keep_the_seed_form(
    redis_memory: RedisChatMemory, backend: Backend
) -> None:
    assert backend.redis is not None
    question, tool_call, result, *_ = openai_round(0)
    await redis_memory.append(CONV, "user", "hi")
    await redis_memory.append_messages(CONV, [question, tool_call, result])
    await redis_memory.append(CONV, "tool", "a seed-form tool message")
    blocks = [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]
    await redis_memory.append(CONV, "user", blocks)
    stored = await backend.redis.client.lrange(redis_memory.key(CONV), 0, -1)
    # plain JSON every element; the seed form (what earlier versions read) where it can be
    assert [orjson.loads(item) for item in stored] == [
        user("hi"),
        question,
        {"may_start": True, "message": tool_call},
        {"may_start": False, "message": result},
        {"role": "tool", "content": "a seed-form tool message"},
        {"may_start": False, "message": user(blocks)},
    ]
    assert stored[1] == stored[0].replace(b'"hi"', b'"weather 0?"')


async def test_histories_written_by_earlier_versions_are_read_and_trimmed(
    make_memory: Factory, backend: Backend
) -> None:
    if backend.redis is None:
        pytest.skip("Redis backends only")
    memory = make_memory(config=ChatMemoryConfig(max_turns=2))
    assert isinstance(memory, RedisChatMemory)
    # exactly the bytes the seed version wrote: {"role","content"}, compact, in order
    legacy = [
        b'{"role":"user","content":"q0"}',
        b'{"role":"tool","content":{"result":42}}',
        b'{"role":"user","content":"q"}',
        b'{"role":"assistant","content":[{"type":"text","text":"a"}]}',
    ]
    await backend.redis.client.rpush(memory.key(CONV), *legacy)
    assert await memory.get_history(CONV) == [orjson.loads(item) for item in legacy]
    await memory.append(CONV, "user", "q2")
    # one over the bound: the trim goes past the legacy tool message, as past a new one
    assert await memory.get_history(CONV) == [
        user("q"),
        assistant([{"type": "text", "text": "a"}]),
        user("q2"),
    ]


def test_the_lua_script_and_python_share_the_continuation_prefixes() -> None:
    for prefix in CONTINUATION_PREFIXES:
        assert f"'{prefix.decode()}'" in APPEND_MESSAGES


class _Explodes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (pytest.fail, ("a pickle stored in Redis was unpickled",))


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xff\xfe binary",
        b"not json",
        pickle.dumps(_Explodes()),
        b"acl\x01shello",
        b"null",
        b'["user", "hi"]',
        b'{"role": "user"}',
        b'{"role": "user", "content": "hi", "extra": 1}',
        b'{"role": 1, "content": "hi"}',
        b'{"role": "user", "content": 5}',
        b'{"role": "user", "content": NaN}',
        b'{"may_start": 1, "message": {"role": "user", "content": "hi"}}',
        b'{"may_start": true, "message": "hi"}',
        b'{"may_start": true, "message": {"content": "no role"}}',
        b'{"may_start": true, "message": {"role": "user"}, "extra": 1}',
    ],
    ids=[
        "empty",
        "binary",
        "text",
        "pickle",
        "codec-value",
        "json-null",
        "json-list",
        "no-content",
        "extra-key",
        "int-role",
        "int-content",
        "nan",
        "int-flag",
        "str-message",
        "tagged-no-role",
        "tagged-extra-key",
    ],
)
async def test_a_foreign_element_raises_corrupt_entry_naming_its_position(
    redis_memory: RedisChatMemory, backend: Backend, garbage: bytes
) -> None:
    assert backend.redis is not None
    key = redis_memory.key(CONV)
    await redis_memory.append(CONV, "user", "before")
    await backend.redis.client.rpush(key, garbage)
    await redis_memory.append(CONV, "assistant", "after")
    with pytest.raises(CorruptEntryError, match=r"'conv-ü-🦜:with colon'.*position 1") as caught:
        await redis_memory.get_history(CONV)
    assert "position 1 (0 = oldest)" in str(caught.value)
    # the garbage is reported, never skipped or deleted
    assert await backend.redis.client.llen(key) == 3
    await redis_memory.clear(CONV)
    assert await redis_memory.get_history(CONV) == []


async def test_a_non_list_under_our_key_raises_corrupt_entry_and_stays(
    redis_memory: RedisChatMemory, backend: Backend
) -> None:
    assert backend.redis is not None
    key = redis_memory.key(CONV)
    await backend.redis.client.set(key, b"someone else's string", px=60_000)
    with pytest.raises(CorruptEntryError, match="not a list"):
        await redis_memory.append(CONV, "user", "hi")
    with pytest.raises(CorruptEntryError, match="not a list"):
        await redis_memory.append_messages(CONV, [user("hi"), assistant("a")])
    with pytest.raises(CorruptEntryError, match="conv-ü"):
        await redis_memory.get_history(CONV)
    assert await backend.redis.client.get(key) == b"someone else's string"
    # the failed append ran nothing after its push: the foreign key's expiry is intact
    assert 59_000 < await backend.redis.client.pttl(key) <= 60_000
    assert (await redis_memory.stats()).appended == 0


async def test_redis_constructor_checks_its_connection_arguments(backend: Backend) -> None:
    if backend.redis is None:
        pytest.skip("Redis backends only")
    with pytest.raises(InvalidInputError, match="exactly one"):
        RedisChatMemory()
    with pytest.raises(InvalidInputError, match="exactly one"):
        RedisChatMemory(url="redis://localhost", client=backend.redis.client)
    with pytest.raises(InvalidInputError, match="glob"):
        RedisChatMemory(client=backend.redis.client, key_prefix="chat*")


async def test_a_dead_server_raises_backend_unavailable_and_counts_nothing() -> None:
    # Redis() retries refused connections 10 times with backoff by default: fail fast here
    client = Redis(
        host="127.0.0.1",
        port=1,
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    async with RedisChatMemory(client=client) as memory:
        with pytest.raises(BackendUnavailableError, match="append"):
            await memory.append(CONV, "user", "lost?")
        with pytest.raises(BackendUnavailableError, match="get_history"):
            await memory.get_history(CONV)
        with pytest.raises(BackendUnavailableError, match="clear"):
            await memory.clear(CONV)
        assert await memory.stats() == type(await memory.stats())()
    await client.aclose()


async def test_a_dead_url_raises_backend_unavailable() -> None:
    async with RedisChatMemory(url="redis://127.0.0.1:1/0") as memory:
        with pytest.raises(BackendUnavailableError) as caught:
            await memory.append(CONV, "user", "lost?")
        assert caught.value.__cause__ is not None
