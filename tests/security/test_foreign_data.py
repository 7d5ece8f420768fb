"""Whatever someone else left under our keys is a counted miss, never code, never a crash.

Every Redis key a backend uses is overwritten with data it did not write: keys of
another Redis type (WRONGTYPE), random bytes, truncated entries, another library's
pickles and JSON. Caches must answer such an entry as a miss, count it in
``corrupt_entries`` and heal on the next put; chat memory must raise a
:class:`CorruptEntryError` naming the conversation (dropping messages silently would
be worse); nothing read from Redis may ever be unpickled; and no operation may raise
anything but the library's own errors. The rate limiter's behaviour is recorded too
(it belongs to another module: a garbage key there is a clear BackendError).
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from aiocache_llm import (
    BackendError,
    CorruptEntryError,
    LLMResponse,
    RateLimitConfig,
    RedisChatMemory,
    RedisExactCache,
    RedisRateLimiter,
    RedisSemanticCache,
)
from aiocache_llm.embedders import HashingEmbedder
from tests.conftest import REDIS_BACKENDS, RedisTarget, open_redis_target

pytestmark = pytest.mark.timeout(60)

QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}
PARAPHRASE = {"model": "m", "messages": [{"role": "user", "content": "capital of france"}]}


class Explodes:
    """A pickle that fails the test if anybody ever unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (pytest.fail, ("data read from Redis was unpickled",))


PICKLE = pickle.dumps(Explodes())
# what other libraries keep in Redis: aiocache's pickled values, LangChain-style JSON
# generations, a bare JSON document, and a value in this library's own format from a
# model class this process never registered
FOREIGN_VALUES = {
    "pickle": PICKLE,
    "pickled-dict": pickle.dumps({"content": "Paris"}),
    "langchain-json": orjson.dumps([{"text": "Paris", "type": "Generation"}]),
    "json-object": b'{"content": "Paris"}',
    "unregistered-model": b"acl\x01mthirdparty.Answer\n{}",
    "empty": b"",
}


async def _set_wrong_type(client: Redis, key: str, kind: str) -> None:
    await client.unlink(key)
    if kind == "string":
        await client.set(key, b"\x00not ours")
    elif kind == "list":
        await client.rpush(key, b"x")
    elif kind == "hash":
        await client.hset(key, "field", b"x")
    elif kind == "set":
        await client.sadd(key, b"x")
    elif kind == "zset":
        await client.zadd(key, {b"x": 1.0})
    else:
        await client.xadd(key, {"f": b"x"})


OTHER_TYPES = ["list", "hash", "set", "zset", "stream"]


@pytest.fixture(params=REDIS_BACKENDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param) as target:
        yield target


def _exact(target: RedisTarget, bounded: bool) -> RedisExactCache:
    return RedisExactCache(
        client=target.client, key_prefix=f"{target.prefix}:x", max_size=8 if bounded else 0
    )


# -- exact cache -----------------------------------------------------------------------


@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "bounded"])
@pytest.mark.parametrize("kind", OTHER_TYPES)
async def test_exact_entry_of_another_redis_type_is_a_counted_miss(
    target: RedisTarget, kind: str, bounded: bool
) -> None:
    cache = _exact(target, bounded)
    await _set_wrong_type(target.client, cache.key(QUERY), kind)
    assert await cache.get(QUERY) is None
    stats = await cache.stats()
    assert (stats.misses, stats.corrupt_entries, stats.hits) == (1, 1, 0)
    # the foreign key is left alone by reads, replaced by the next put
    assert (await target.client.type(cache.key(QUERY))).decode() == kind
    await cache.put(QUERY, "Paris")
    assert await cache.get(QUERY) == "Paris"
    assert await cache.invalidate(QUERY) is True


@pytest.mark.parametrize(
    ("index_key", "kind"),
    [("lru", kind) for kind in ["string", "list", "hash", "set", "stream"]]
    + [("lru:tick", kind) for kind in ["string", *OTHER_TYPES]],  # string: not a number
)
async def test_exact_index_keys_holding_foreign_data_never_fail_a_call(
    target: RedisTarget, index_key: str, kind: str
) -> None:
    cache = _exact(target, bounded=True)
    await cache.put(QUERY, "Paris")
    await _set_wrong_type(target.client, f"{cache.key_prefix}:{index_key}", kind)
    assert await cache.get(QUERY) == "Paris"  # the touch is skipped, the value served
    await cache.put("another question", "another answer")  # replaces the foreign key
    assert await cache.invalidate("another question") is True
    for i in range(12):  # the bound holds again
        await cache.put(f"question {i}", i)
    assert (await cache.stats()).size == 8
    assert await cache.get("question 11") == 11


async def test_exact_eviction_never_deletes_keys_outside_the_cache(target: RedisTarget) -> None:
    """Members someone wrote into the recency index name keys the cache must not touch."""
    cache = _exact(target, bounded=True)
    outsider, sibling = f"{target.prefix}-other-app:data", f"{cache.key_prefix}:lru"
    await target.client.set(outsider, b"keep")
    await target.client.zadd(f"{cache.key_prefix}:lru", {outsider: 0, sibling: 0})
    for i in range(12):
        await cache.put(f"question {i}", i)
    assert await target.client.get(outsider) == b"keep"
    assert await cache.get("question 11") == 11
    await target.client.unlink(outsider)


@pytest.mark.parametrize("foreign", list(FOREIGN_VALUES))
@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "bounded"])
async def test_exact_foreign_values_are_counted_misses_never_unpickled(
    target: RedisTarget, foreign: str, bounded: bool
) -> None:
    cache = _exact(target, bounded)
    await target.client.set(cache.key(QUERY), FOREIGN_VALUES[foreign])
    assert await cache.get(QUERY) is None
    assert (await cache.stats()).corrupt_entries == 1


@pytest.mark.parametrize(
    "value",
    [{"answer": "Paris", "sources": [1, 2]}, ["a", "b"], LLMResponse(content="Paris")],
    ids=["dict", "list", "model"],
)
async def test_exact_truncated_container_entries_are_counted_misses(
    target: RedisTarget, value: Any
) -> None:
    cache = _exact(target, bounded=False)
    await cache.put(QUERY, value)
    stored = await target.client.get(cache.key(QUERY))
    for cut in range(1, len(stored)):
        await target.client.set(cache.key(QUERY), stored[:cut])
        assert await cache.get(QUERY) is None, f"a {cut}-byte prefix decoded"
    assert (await cache.stats()).corrupt_entries == len(stored) - 1


async def test_exact_truncated_text_entries_are_counted_misses(target: RedisTarget) -> None:
    cache = _exact(target, bounded=False)
    await cache.put(QUERY, "Paris, the capital")
    stored = await target.client.get(cache.key(QUERY))
    await target.client.set(cache.key(QUERY), stored[:-8])
    assert await cache.get(QUERY) is None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(max_size=300) | st.builds(lambda b: b"acl\x01" + b, st.binary()))
async def test_exact_random_bytes_are_a_miss_or_decode_as_data(
    target: RedisTarget, garbage: bytes
) -> None:
    cache = _exact(target, bounded=False)
    await target.client.set(cache.key(QUERY), garbage)
    before = await cache.stats()
    value = await cache.get(QUERY)
    after = await cache.stats()
    if value is None:
        assert after.corrupt_entries == before.corrupt_entries + 1
    else:  # bytes that happen to be a valid entry: plain data, never an object they name
        assert type(value) in (str, int, float, bool, list, dict) or isinstance(value, LLMResponse)
        assert after.hits == before.hits + 1


# -- semantic cache --------------------------------------------------------------------


async def _semantic_keys(target: RedisTarget, cache: RedisSemanticCache) -> list[str]:
    found = [k.decode() async for k in target.client.scan_iter(match=f"{cache.key_prefix}:*")]
    return sorted(found)


async def _stats_or_backend_error(cache: RedisSemanticCache) -> None:
    """stats() reads the recency index as is: a foreign one is a BackendError, nothing worse."""
    try:
        await cache.stats()
    except BackendError as exc:
        assert "WRONGTYPE" in str(exc)  # noqa: PT017 - any other error fails the test


def _semantic(target: RedisTarget, bounded: bool) -> RedisSemanticCache:
    return RedisSemanticCache(
        HashingEmbedder(dimension=32),
        client=target.client,
        key_prefix=f"{target.prefix}:s",
        similarity_threshold=0.8,
        max_size=8 if bounded else None,
        ttl_seconds=600,  # every key kind exists, the expiry index included
        embed_in_thread=False,
    )


@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "bounded"])
async def test_every_semantic_key_holding_foreign_data_is_survived(
    target: RedisTarget, bounded: bool
) -> None:
    """Each key the cache uses, in turn, holds another type: no call ever raises."""
    writer = _semantic(target, bounded)
    await writer.put(QUERY, "Paris")
    keys = await _semantic_keys(target, writer)
    assert len(keys) >= 4  # vectors, values, log, dimension at least
    for key in keys:
        for kind in ["string", *OTHER_TYPES]:
            await writer.clear()
            await writer.put(QUERY, "Paris")
            if (await target.client.type(key)).decode() == kind:
                continue
            await _set_wrong_type(target.client, key, kind)
            reader = _semantic(target, bounded)  # a process with no mirror yet
            for cache in (reader, writer):
                answers = [await cache.get(QUERY), await cache.get(PARAPHRASE)]
                assert set(answers) <= {"Paris", None}, (key, kind)
                await _stats_or_backend_error(cache)
            await writer.invalidate(QUERY)
            await writer.put(QUERY, "Lyon")
            assert await reader.get(QUERY) == "Lyon", (key, kind)
            assert await reader.get(PARAPHRASE) == "Lyon", (key, kind)
            await reader.aclose()
    await writer.clear()


@pytest.mark.parametrize("foreign", list(FOREIGN_VALUES))
async def test_semantic_foreign_values_are_counted_misses_never_unpickled(
    target: RedisTarget, foreign: str
) -> None:
    cache = _semantic(target, bounded=False)
    await cache.put(QUERY, "Paris")
    value_keys = [
        k for k in await _semantic_keys(target, cache) if (await target.client.type(k)) == b"string"
    ]
    for key in value_keys:
        if not key.endswith(":dim"):
            await target.client.set(key, FOREIGN_VALUES[foreign])
    assert await cache.get(QUERY) is None
    assert await cache.get(PARAPHRASE) is None
    assert (await cache.stats()).corrupt_entries >= 1


# -- chat memory -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["string", "hash", "set", "zset", "stream"])
async def test_a_chat_key_of_another_type_is_a_corrupt_entry_error_for_reads_and_appends(
    target: RedisTarget, kind: str
) -> None:
    memory = RedisChatMemory(client=target.client, key_prefix=f"{target.prefix}:c")
    await _set_wrong_type(target.client, memory.key("conv"), kind)
    with pytest.raises(CorruptEntryError, match="'conv'"):
        await memory.append("conv", "user", "hello")
    with pytest.raises(CorruptEntryError, match="'conv'"):
        await memory.get_history("conv")
    assert (await target.client.type(memory.key("conv"))).decode() == kind  # not destroyed
    await memory.clear("conv")  # the one way out: an explicit clear
    await memory.append("conv", "user", "hello")
    assert await memory.get_history("conv") == [{"role": "user", "content": "hello"}]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(max_size=200) | st.sampled_from(list(FOREIGN_VALUES.values())))
async def test_a_foreign_chat_element_is_reported_never_skipped_or_executed(
    target: RedisTarget, garbage: bytes
) -> None:
    memory = RedisChatMemory(client=target.client, key_prefix=f"{target.prefix}:c")
    await memory.clear("conv")
    await memory.append("conv", "user", "before")
    await target.client.rpush(memory.key("conv"), garbage)
    await memory.append("conv", "assistant", "after")
    if not _is_chat_message(garbage):
        with pytest.raises(CorruptEntryError, match=r"'conv'.*position 1"):
            await memory.get_history("conv")
        return
    # bytes that happen to be a valid message are a message, and nothing is dropped
    history = await memory.get_history("conv")
    assert len(history) == 3
    assert history[1] == orjson.loads(garbage)
    assert [history[0]["content"], history[2]["content"]] == ["before", "after"]


def _is_chat_message(data: bytes) -> bool:
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return (
        type(message) is dict
        and message.keys() == {"role", "content"}
        and type(message["role"]) is str
        and type(message["content"]) in (str, list, dict)
    )


# -- rate limiter (another helper's module: behaviour recorded, never a crash) ---------


@pytest.mark.parametrize("which", ["grants", "meta"])
@pytest.mark.parametrize("kind", ["string", "list", "hash", "set", "zset", "stream"])
async def test_limiter_keys_of_another_type_fail_as_backend_errors(
    target: RedisTarget, which: str, kind: str
) -> None:
    limiter = RedisRateLimiter(
        client=target.client,
        key_prefix=f"{target.prefix}:r",
        config=RateLimitConfig(100),
        failure_mode="raise",
        breaker_threshold=100,  # this test is about the errors, not the breaker
    )
    grants, meta = limiter.keys("user")
    key = grants if which == "grants" else meta
    expected_type = "zset" if which == "grants" else "hash"
    if kind == expected_type:
        return  # the right type: nothing foreign about it
    await _set_wrong_type(target.client, key.decode(), kind)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: limiter.check_and_consume("user", 1),
        lambda: limiter.get_remaining("user"),
        lambda: limiter.refund("user", 1),
    ]
    errors = []
    for call in calls:
        try:
            await call()
        except BackendError as exc:  # the only failure allowed
            errors.append(str(exc))
    assert all("WRONGTYPE" in error for error in errors)
    await limiter.reset("user")  # deleting both keys always works and heals the user
    assert await limiter.check_and_consume("user", 1) is True
    await limiter.aclose()


async def test_a_foreign_member_in_a_grant_log_does_not_break_the_user(
    target: RedisTarget,
) -> None:
    limiter = RedisRateLimiter(
        client=target.client,
        key_prefix=f"{target.prefix}:r",
        config=RateLimitConfig(100),
        failure_mode="raise",
    )
    grants, _ = limiter.keys("user")
    await target.client.zadd(grants, {b"not-a-grant": 1e18})
    try:
        assert await limiter.check_and_consume("user", 1) is True
    finally:
        await limiter.aclose()


async def test_one_users_foreign_key_does_not_trip_the_limiter_for_everyone(
    target: RedisTarget,
) -> None:
    limiter = RedisRateLimiter(
        client=target.client,
        key_prefix=f"{target.prefix}:r",
        config=RateLimitConfig(100),
        failure_mode="closed",
    )
    grants, _ = limiter.keys("mallory")
    await target.client.set(grants, b"not a grant log")
    try:
        for _ in range(5):
            await limiter.check_and_consume("mallory", 1)
        assert await limiter.check_and_consume("alice", 1) is True
    finally:
        await limiter.aclose()


def test_the_pickle_trap_fails_whoever_unpickles_it() -> None:
    """The planted pickles prove something only if unpickling them would be noticed."""
    with pytest.raises(pytest.fail.Exception, match="unpickled"):
        pickle.loads(PICKLE)


async def test_concurrent_reads_of_foreign_typed_entries_are_misses(target: RedisTarget) -> None:
    """Concurrent gets share one MGET, which answers nil for a key of another type."""
    cache = _exact(target, bounded=False)
    queries = [f"question {i}" for i in range(20)]
    for i, query in enumerate(queries):
        if i % 2:
            await cache.put(query, i)
        else:
            await _set_wrong_type(target.client, cache.key(query), OTHER_TYPES[i % 5])
    answers = await asyncio.gather(*(cache.get(query) for query in queries))
    assert answers == [i if i % 2 else None for i in range(20)]
    stats = await cache.stats()
    assert (stats.hits, stats.misses) == (10, 10)
    assert stats.corrupt_entries <= 10  # the lone first read counts; batched ones cannot
