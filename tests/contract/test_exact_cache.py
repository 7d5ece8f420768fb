"""The AsyncExactCache contract: every backend answers these calls the same way."""

from __future__ import annotations

import logging
import pickle
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import BaseModel

import aiocache_llm.backends.redis.exact_cache as exact_cache_module
from aiocache_llm import (
    AsyncExactCache,
    InvalidInputError,
    InvalidInputTypeError,
    LLMResponse,
    MemoryExactCache,
    RecordedStream,
    RedisExactCache,
    Usage,
    ValueTooLargeError,
    signature,
)
from aiocache_llm.backends.redis.cluster import scan_keys
from tests.conftest import ALL_BACKENDS, Backend, open_backend

QUERY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0.0,
}
OTHER = {**QUERY, "messages": [{"role": "user", "content": "And of Spain?"}]}

Factory = Callable[..., AsyncExactCache]


class Completion(BaseModel):
    """A user-declared response type, as an SDK's completion object would be."""

    id: str
    choices: list[dict[str, Any]]


@pytest.fixture(params=ALL_BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """This suite also runs on a Redis Cluster and on a Sentinel-managed primary."""
    async with open_backend(request) as opened:
        yield opened


@pytest.fixture
async def make_cache(backend: Backend) -> AsyncIterator[Factory]:
    """Builds caches of the backend under test; every one built shares its storage."""
    made: list[AsyncExactCache] = []

    def make(**kwargs: Any) -> AsyncExactCache:
        cache: AsyncExactCache
        if backend.redis is None:
            kwargs.setdefault("max_size", 0)
            cache = MemoryExactCache(clock=backend.clock, **kwargs)
        else:
            prefix = backend.redis.prefix
            if backend.kind == "cluster" and kwargs.get("max_size"):
                prefix = "{" + prefix + "}"  # a bounded cache's keys share one slot
            cache = RedisExactCache(client=backend.redis.client, key_prefix=prefix, **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


@pytest.fixture
def cache(make_cache: Factory) -> AsyncExactCache:
    return make_cache()


async def test_is_an_async_exact_cache(cache: AsyncExactCache) -> None:
    assert isinstance(cache, AsyncExactCache)


async def test_miss_then_hit(cache: AsyncExactCache) -> None:
    assert await cache.get(QUERY) is None
    await cache.put(QUERY, "Paris")
    assert await cache.get(QUERY) == "Paris"
    assert await cache.get(OTHER) is None
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.size) == (1, 2, 1)
    assert stats.hit_rate == pytest.approx(1 / 3)


async def test_key_order_and_ignored_fields_do_not_change_the_key(cache: AsyncExactCache) -> None:
    await cache.put(QUERY, "Paris")
    reordered = {"temperature": 0.0, "messages": QUERY["messages"], "model": "gpt-4o-mini"}
    assert await cache.get({**reordered, "user": "alice", "stream": False}) == "Paris"
    assert await cache.get({**QUERY, "temperature": 0.7}) is None


async def test_str_query_means_one_user_message(cache: AsyncExactCache) -> None:
    await cache.put("hello", "hi")
    assert await cache.get({"messages": [{"role": "user", "content": "hello"}]}) == "hi"


@pytest.mark.parametrize(
    "value",
    [
        "plain text ✓ with unicode \u2028 and \x00",
        "",
        {"choices": [{"message": {"content": "Paris"}}], "n": 1, "ok": True, "x": None},
        [1, 2.5, "three", {"four": [4]}],
        LLMResponse(content="Paris", model="m", usage=Usage(total_tokens=3), tool_calls=[{"a": 1}]),
    ],
    ids=["str", "empty-str", "dict", "list", "llm-response"],
)
async def test_values_round_trip_to_the_same_type(cache: AsyncExactCache, value: Any) -> None:
    await cache.put(QUERY, value)
    got = await cache.get(QUERY)
    assert type(got) is type(value)
    assert got == value


async def test_declared_model_type_round_trips(make_cache: Factory, backend: Backend) -> None:
    writer = make_cache(value_types=[Completion])
    # on Redis, the reader stands for another process that declared the type
    reader = writer if backend.is_memory else make_cache(value_types=[Completion])
    value = Completion(id="c1", choices=[{"text": "Paris"}])
    await writer.put(QUERY, value)
    got = await reader.get(QUERY)
    assert isinstance(got, Completion)
    assert got == value


async def test_a_type_the_reader_did_not_declare_is_said_so_not_called_corrupt(
    make_cache: Factory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    if backend.is_memory:
        pytest.skip("Redis backends only: a memory cache knows every type it stored")
    writer = make_cache(value_types=[Completion])
    reader = make_cache()  # another process that forgot value_types=
    await writer.put(QUERY, Completion(id="c1", choices=[]))
    with caplog.at_level(logging.WARNING, logger="aiocache_llm.codec"):
        assert await reader.get(QUERY) is None
        assert await reader.get(QUERY) is None
    stats = await reader.stats()
    assert (stats.undeclared_entries, stats.corrupt_entries, stats.misses) == (2, 0, 2)
    warnings = [r.getMessage() for r in caplog.records if "not declared" in r.getMessage()]
    assert len(warnings) == 1  # said once per type, not per read
    assert "Completion" in warnings[0]
    assert await writer.get(QUERY) == Completion(id="c1", choices=[])


async def test_recorded_streams_round_trip_in_order_with_their_types(
    make_cache: Factory, backend: Backend
) -> None:
    writer = make_cache(value_types=[Completion])
    reader = writer if backend.is_memory else make_cache(value_types=[Completion])
    chunks = ["Par", {"delta": "is"}, Completion(id="c1", choices=[]), 7, ""]
    await writer.put(QUERY, RecordedStream(chunks))
    got = await reader.get(QUERY)
    assert type(got) is RecordedStream
    assert [type(chunk) for chunk in got] == [type(chunk) for chunk in chunks]
    assert got == RecordedStream(chunks)
    got.chunks[1]["delta"] = "mutated"
    assert await reader.get(QUERY) == RecordedStream(chunks)


async def test_a_recording_of_text_chunks_comes_back_whole_after_a_caller_edits_it(
    cache: AsyncExactCache,
) -> None:
    await cache.put(QUERY, RecordedStream(["Par", "is"]))
    got = await cache.get(QUERY)
    got.chunks.append("!")
    got.chunks[0] = "Lyon"
    assert await cache.get(QUERY) == RecordedStream(["Par", "is"])


async def test_mutating_a_hit_does_not_change_the_cache(cache: AsyncExactCache) -> None:
    await cache.put(QUERY, {"answer": ["Paris"]})
    first = await cache.get(QUERY)
    first["answer"].append("Lyon")
    first["extra"] = 1
    assert await cache.get(QUERY) == {"answer": ["Paris"]}


async def test_mutating_the_stored_object_after_put_does_not_change_the_cache(
    cache: AsyncExactCache,
) -> None:
    value = {"answer": ["Paris"]}
    await cache.put(QUERY, value)
    value["answer"].append("Lyon")
    assert await cache.get(QUERY) == {"answer": ["Paris"]}


async def test_put_replaces(cache: AsyncExactCache) -> None:
    await cache.put(QUERY, "Paris")
    await cache.put(QUERY, "Paris, France")
    assert await cache.get(QUERY) == "Paris, France"
    assert (await cache.stats()).size == 1


async def test_invalidate(cache: AsyncExactCache) -> None:
    await cache.put(QUERY, "Paris")
    await cache.put(OTHER, "Madrid")
    assert await cache.invalidate(QUERY) is True
    assert await cache.invalidate(QUERY) is False
    assert await cache.get(QUERY) is None
    assert await cache.get(OTHER) == "Madrid"


async def test_clear(cache: AsyncExactCache) -> None:
    await cache.put(QUERY, "Paris")
    await cache.put(OTHER, "Madrid")
    await cache.clear()
    assert await cache.get(QUERY) is None
    assert await cache.get(OTHER) is None
    assert (await cache.stats()).size == 0


async def test_default_ttl_expires(make_cache: Factory, backend: Backend) -> None:
    cache = make_cache(ttl_seconds=0.2)
    await cache.put(QUERY, "Paris")
    assert await cache.get(QUERY) == "Paris"
    await backend.wait(0.35)
    assert await cache.get(QUERY) is None
    assert (await cache.stats()).size == 0


async def test_per_put_ttl_overrides_default(make_cache: Factory, backend: Backend) -> None:
    cache = make_cache(ttl_seconds=100)
    await cache.put(QUERY, "short", ttl_seconds=0.2)
    await cache.put(OTHER, "long")
    await backend.wait(0.35)
    assert await cache.get(QUERY) is None
    assert await cache.get(OTHER) == "long"


async def test_invalidate_of_an_expired_entry_is_false(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache()
    await cache.put(QUERY, "Paris", ttl_seconds=0.2)
    await backend.wait(0.35)
    assert await cache.invalidate(QUERY) is False


async def test_max_size_evicts_least_recently_used(make_cache: Factory) -> None:
    cache = make_cache(max_size=2)
    queries = [f"question {i}" for i in range(3)]
    await cache.put(queries[0], "a0")
    await cache.put(queries[1], "a1")
    assert await cache.get(queries[0]) == "a0"  # now queries[1] is the least recent
    await cache.put(queries[2], "a2")
    assert await cache.get(queries[1]) is None
    assert await cache.get(queries[0]) == "a0"
    assert await cache.get(queries[2]) == "a2"
    stats = await cache.stats()
    assert (stats.size, stats.evictions) == (2, 1)


async def test_unbounded_cache_keeps_everything(make_cache: Factory) -> None:
    cache = make_cache(max_size=0)
    for i in range(50):
        await cache.put(f"q{i}", f"a{i}")
    assert all([await cache.get(f"q{i}") == f"a{i}" for i in range(50)])
    assert (await cache.stats()).size == 50


async def test_entries_are_shared_by_instances_on_the_same_storage(
    make_cache: Factory, backend: Backend
) -> None:
    if backend.is_memory:
        pytest.skip("memory caches are private to their object")
    writer, reader = make_cache(), make_cache()
    await writer.put(QUERY, "Paris")
    assert await reader.get(QUERY) == "Paris"


async def test_custom_normalize_hook(make_cache: Factory) -> None:
    def lowercase(request: dict[str, Any]) -> dict[str, Any]:
        messages = [{**m, "content": m["content"].lower()} for m in request["messages"]]
        return {**request, "messages": messages}

    cache = make_cache(normalize=lowercase)
    await cache.put("What Is Redis?", "a store")
    assert await cache.get("what is redis?") == "a store"


@pytest.mark.parametrize(
    ("bad_value", "error"),
    [
        (object(), InvalidInputTypeError),
        ({"x": float("nan")}, InvalidInputError),
        ({"x": float("inf")}, InvalidInputError),
        ({"x": (1, 2)}, InvalidInputError),
        ({1: "non-str key"}, InvalidInputTypeError),
        ({"x": {1, 2}}, InvalidInputTypeError),
        (b"bytes", InvalidInputTypeError),
        (None, InvalidInputTypeError),
        ("lone \ud800 surrogate", InvalidInputError),
    ],
    ids=["object", "nan", "inf", "tuple", "int-key", "set", "bytes", "none", "surrogate"],
)
async def test_unserializable_value_raises_and_keeps_what_was_stored(
    cache: AsyncExactCache, bad_value: Any, error: type[Exception]
) -> None:
    await cache.put(QUERY, "Paris")
    with pytest.raises(error):
        await cache.put(QUERY, bad_value)
    assert await cache.get(QUERY) == "Paris"


@pytest.mark.parametrize(
    ("bad_query", "error"),
    [
        ("", InvalidInputError),
        ({}, InvalidInputError),
        (42, InvalidInputTypeError),
        (None, InvalidInputTypeError),
        ({"messages": [], "temperature": float("nan")}, InvalidInputError),
        ({"messages": [], "x": object()}, InvalidInputTypeError),
    ],
    ids=["empty-str", "empty-dict", "int", "none", "nan", "object"],
)
async def test_bad_query_raises_on_every_method(
    cache: AsyncExactCache, bad_query: Any, error: type[Exception]
) -> None:
    await cache.put(QUERY, "Paris")
    with pytest.raises(error):
        await cache.get(bad_query)
    with pytest.raises(error):
        await cache.put(bad_query, "x")
    with pytest.raises(error):
        await cache.invalidate(bad_query)
    assert await cache.get(QUERY) == "Paris"


async def test_bad_ttl_raises_and_keeps_what_was_stored(cache: AsyncExactCache) -> None:
    await cache.put(QUERY, "Paris")
    for ttl in (0, -1, float("nan")):
        with pytest.raises(InvalidInputError, match="ttl_seconds"):
            await cache.put(QUERY, "other", ttl_seconds=ttl)
    assert await cache.get(QUERY) == "Paris"


async def test_oversized_value_raises_value_too_large(make_cache: Factory) -> None:
    cache = make_cache(max_value_bytes=100)
    await cache.put(QUERY, "small")
    with pytest.raises(ValueTooLargeError, match="max_value_bytes"):
        await cache.put(QUERY, "x" * 200)
    assert await cache.get(QUERY) == "small"


@pytest.mark.parametrize(
    "kwargs",
    [{"max_size": -1}, {"max_size": 1.5}, {"ttl_seconds": 0}, {"ttl_seconds": "1"}],
    ids=["negative-size", "float-size", "zero-ttl", "str-ttl"],
)
async def test_bad_config_fails_at_construction(make_cache: Factory, kwargs: Any) -> None:
    with pytest.raises((InvalidInputError, InvalidInputTypeError)):
        make_cache(**kwargs)


async def test_repr_is_informative(cache: AsyncExactCache) -> None:
    await cache.put(QUERY, "Paris")
    await cache.get(QUERY)
    text = repr(cache)
    assert type(cache).__name__ in text
    assert "hits=1" in text


async def test_closed_cache_refuses_calls(make_cache: Factory) -> None:
    from aiocache_llm import ClosedResourceError

    cache = make_cache()
    async with cache:
        await cache.put(QUERY, "Paris")
    with pytest.raises(ClosedResourceError):
        await cache.get(QUERY)


# Redis only: what other writers may leave under our keys.


@pytest.fixture
def redis_cache(make_cache: Factory, backend: Backend) -> RedisExactCache:
    if backend.is_memory:
        pytest.skip("Redis backends only")
    cache = make_cache()
    assert isinstance(cache, RedisExactCache)
    return cache


class _Explodes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (pytest.fail, ("a pickle stored in Redis was unpickled",))


async def test_a_pickle_under_our_key_is_never_unpickled(
    redis_cache: RedisExactCache, backend: Backend
) -> None:
    assert backend.redis is not None
    await backend.redis.client.set(redis_cache.key(QUERY), pickle.dumps(_Explodes()))
    assert await redis_cache.get(QUERY) is None
    stats = await redis_cache.stats()
    assert (stats.misses, stats.corrupt_entries) == (1, 1)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xff\xfe garbage", b"acl\x01j{not json", b"acl\x01mos.system\n{}", b"acl\x01s\xff"],
    ids=["empty", "binary", "bad-json", "unknown-model", "bad-utf8"],
)
async def test_foreign_data_under_our_key_is_a_counted_miss(
    redis_cache: RedisExactCache, backend: Backend, garbage: bytes
) -> None:
    assert backend.redis is not None
    await backend.redis.client.set(redis_cache.key(QUERY), garbage)
    assert await redis_cache.get(QUERY) is None
    assert (await redis_cache.stats()).corrupt_entries == 1
    await redis_cache.put(QUERY, "Paris")
    assert await redis_cache.get(QUERY) == "Paris"


async def test_keys_are_prefix_colon_signature(
    redis_cache: RedisExactCache, backend: Backend
) -> None:
    assert backend.redis is not None
    await redis_cache.put(QUERY, "Paris")
    expected = f"{backend.redis.prefix}:{signature(QUERY)}"
    assert redis_cache.key(QUERY) == expected
    assert await backend.redis.client.exists(expected) == 1


async def test_clear_leaves_keys_outside_its_prefix_alone(
    make_cache: Factory, backend: Backend
) -> None:
    if backend.redis is None:
        pytest.skip("Redis backends only")
    client, prefix = backend.redis.client, backend.redis.prefix
    mine = make_cache()
    # a sibling shares the prefix's text but not the prefix
    sibling = RedisExactCache(client=client, key_prefix=f"{prefix}x")
    nested = RedisExactCache(client=client, key_prefix=f"{prefix}:other")
    await mine.put(QUERY, "mine")
    await sibling.put(QUERY, "sibling")
    await nested.put(QUERY, "nested")
    await client.set(f"{prefix}-unrelated", b"keep")
    await client.set(f"{prefix}:not-an-entry", b"keep")
    await mine.clear()
    assert await mine.get(QUERY) is None
    assert await sibling.get(QUERY) == "sibling"
    assert await nested.get(QUERY) == "nested"
    assert await client.get(f"{prefix}-unrelated") == b"keep"
    assert await client.get(f"{prefix}:not-an-entry") == b"keep"
    for other in (sibling, nested):
        await other.clear()
        await other.aclose()
    await client.unlink(f"{prefix}-unrelated", f"{prefix}:not-an-entry")


async def test_redis_constructor_requires_exactly_one_connection(backend: Backend) -> None:
    if backend.redis is None:
        pytest.skip("Redis backends only")
    with pytest.raises(InvalidInputError, match="exactly one"):
        RedisExactCache()
    with pytest.raises(InvalidInputError, match="exactly one"):
        RedisExactCache(url="redis://localhost", client=backend.redis.client)
    with pytest.raises(InvalidInputError, match="glob"):
        RedisExactCache(client=backend.redis.client, key_prefix="app*")


# Issue 10, items 12-14: bounded caches and clear() answer alike on every backend.


async def test_a_bounded_put_drops_expired_entries_before_evicting_a_live_one(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache(max_size=2)
    await cache.put("live, least recently used", "kept")
    await cache.put("short-lived", "gone", ttl_seconds=0.2)
    await backend.wait(0.35)
    # the expired entry holds a slot: it goes, not the live one
    await cache.put("newest", "kept too")
    assert await cache.get("live, least recently used") == "kept"
    assert await cache.get("newest") == "kept too"
    stats = await cache.stats()
    assert (stats.size, stats.evictions) == (2, 0)


async def test_a_bounded_cache_counts_only_live_entries(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache(max_size=10)
    await cache.put("long-lived", "a")
    await cache.put("short-lived", "b", ttl_seconds=0.2)
    await backend.wait(0.35)
    assert (await cache.stats()).size == 1


async def test_clear_never_deletes_another_objects_keys_that_look_like_entries(
    make_cache: Factory, backend: Backend
) -> None:
    """A chat memory on ``{prefix}:chat`` with a 59-character conversation id writes
    ``{prefix}:chat:<59 characters>``: 64 characters after the prefix, like an entry."""
    if backend.redis is None:
        pytest.skip("Redis backends only")
    from aiocache_llm import RedisChatMemory

    client, prefix = backend.redis.client, backend.redis.prefix
    memory = RedisChatMemory(client=client, key_prefix=f"{prefix}:chat")
    conversation = "c" * 59
    assert len(memory.key(conversation)) == len(prefix) + 1 + 64
    await memory.append(conversation, "user", "remember me")
    for bounded in (0, 10):
        cache = make_cache(max_size=bounded)
        await cache.put(QUERY, "Paris")
        assert (await cache.stats()).size == 1  # the conversation is not an entry
        await cache.clear()
        assert await memory.get_history(conversation) == [
            {"role": "user", "content": "remember me"}
        ]
        assert (await cache.stats()).size == 0
    await memory.clear(conversation)
    await memory.aclose()


async def test_puts_racing_clear_leave_no_entry_outside_the_bound(
    make_cache: Factory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries put while clear() runs either go or stay counted and evictable.

    Another process's puts are made to land at the worst moments: while clear()
    scans (after its first key) and once its scan is over.
    """
    if backend.redis is None:
        pytest.skip("Redis backends only: a memory clear() never yields")
    client = backend.redis.client
    cache = make_cache(max_size=50)
    writer = make_cache(max_size=50)  # another process on the same keys
    prefix = cache.key_prefix  # type: ignore[attr-defined]
    for i in range(50):
        await cache.put(f"before {i}", i)
    written = 0

    async def put_some() -> None:
        nonlocal written
        for _ in range(5):
            await writer.put(f"during {written}", written)
            written += 1

    async def racing_scan(*args: Any, **kwargs: Any) -> Any:
        first = True
        async for keys in scan_keys(*args, **kwargs):
            for key in keys:
                yield [key]
                if first:
                    first = False
                    await put_some()
        await put_some()

    monkeypatch.setattr(exact_cache_module, "scan_keys", racing_scan)
    await cache.clear()
    monkeypatch.undo()
    assert written >= 5
    for i in range(60):
        await cache.put(f"after {i}", i)
    stored = [
        key
        async for keys in scan_keys(client, f"{prefix}:*")
        for key in keys
        if len(key) == len(prefix) + 1 + 64 and b":lru" not in key
    ]
    assert (await cache.stats()).size == len(stored) == 50


@pytest.mark.parametrize("kind", ["string", "list", "hash", "set"])
async def test_an_expiry_index_of_another_type_never_fails_a_call(
    make_cache: Factory, backend: Backend, kind: str
) -> None:
    if backend.redis is None:
        pytest.skip("Redis backends only")
    client = backend.redis.client
    cache = make_cache(max_size=4)
    prefix = cache.key_prefix  # type: ignore[attr-defined]
    await cache.put(QUERY, "Paris", ttl_seconds=60)
    key = f"{prefix}:lru:exp"
    await client.unlink(key)
    writes = {
        "string": lambda: client.set(key, b"garbage"),
        "list": lambda: client.rpush(key, b"x"),
        "hash": lambda: client.hset(key, "f", "v"),
        "set": lambda: client.sadd(key, b"x"),
    }
    await writes[kind]()
    assert await cache.get(QUERY) == "Paris"
    assert await cache.invalidate(OTHER) is False
    await cache.put(OTHER, "Madrid", ttl_seconds=60)  # replaces the foreign key
    assert (await client.type(key)).decode() == "zset"
    for i in range(6):
        await cache.put(f"question {i}", i)
    assert (await cache.stats()).size == 4
    await cache.clear()
    assert [k async for k in scan_keys(client, f"{prefix}*")] == []
