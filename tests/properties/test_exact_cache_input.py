"""Exact caches under hostile keys and values: round-trip exactly, or refuse cleanly.

For any query and any value, a put either stores something a get gives back with
the same type at every depth, or raises :class:`InvalidInputError` /
:class:`InvalidInputTypeError` and leaves what was stored before untouched. Nothing
else is ever raised (no ``RecursionError``, no driver or orjson error), and the
memory and Redis caches answer every input the same way (they are drop-in twins).
Memory and fakeredis run many examples, the real server fewer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from aiocache_llm import (
    AsyncExactCache,
    InvalidInputError,
    LLMResponse,
    MemoryExactCache,
    RedisExactCache,
)
from tests.conftest import RedisTarget
from tests.properties.checks import FAST, REAL, REFUSED, assert_identical, fresh_query
from tests.properties.strategies import (
    any_text,
    deep_trees,
    hostile_trees,
    huge_values,
    nested,
    storable_text,
    storable_trees,
)

pytestmark = pytest.mark.timeout(120)

surrogate_text = st.tuples(storable_text, st.characters(categories=["Cs"]), storable_text).map(
    "".join
)
models = st.builds(
    LLMResponse,
    content=st.none() | any_text,
    model=st.none() | storable_text,
    metadata=st.dictionaries(storable_text, hostile_trees, max_size=3),
)
any_value = hostile_trees | any_text | deep_trees | models
queries = st.one_of(
    any_text,
    hostile_trees,
    deep_trees,
    st.dictionaries(any_text, hostile_trees, max_size=4),
    st.fixed_dictionaries(
        {
            "model": any_text,
            "messages": st.lists(
                st.fixed_dictionaries({"role": any_text, "content": hostile_trees}), max_size=3
            ),
            "temperature": st.floats(),
        }
    ),
)


@pytest.fixture(params=["memory", "fakeredis"])
async def fast_cache(request: pytest.FixtureRequest) -> AsyncIterator[AsyncExactCache]:
    cache: AsyncExactCache
    if request.param == "memory":
        cache = MemoryExactCache(max_size=0)
    else:
        cache = RedisExactCache(client=fakeredis.FakeAsyncRedis(), key_prefix="props")
    async with cache:
        yield cache


@pytest.fixture
async def real_cache(real_redis: RedisTarget) -> AsyncIterator[AsyncExactCache]:
    async with RedisExactCache(client=real_redis.client, key_prefix=real_redis.prefix) as cache:
        yield cache


@pytest.fixture
async def twins() -> AsyncIterator[tuple[MemoryExactCache, RedisExactCache]]:
    memory = MemoryExactCache(max_size=0)
    redis = RedisExactCache(client=fakeredis.FakeAsyncRedis(), key_prefix="twin")
    async with memory, redis:
        yield memory, redis


async def check_value(cache: AsyncExactCache, value: Any) -> str:
    """Store ``value`` over a known one: it comes back identical, or nothing changed."""
    query = fresh_query()
    await cache.put(query, "before")
    try:
        await cache.put(query, value)
    except REFUSED:
        assert await cache.get(query) == "before", "a refused put changed the stored value"
        return "refused"
    got = await cache.get(query)
    if isinstance(value, BaseModel):
        assert type(got) is type(value)
        assert got == value
    else:
        assert_identical(got, value)
    return "stored"


async def check_key(cache: AsyncExactCache, query: Any) -> str:
    """A query is usable for every call, or refused the same way by every call."""
    try:
        await cache.put(query, "v")
    except REFUSED as exc:
        for call in (cache.get, cache.invalidate):
            with pytest.raises(type(exc)):
                await call(query)
        return "refused"
    assert await cache.get(query) == "v"
    return "stored"


@FAST
@given(value=any_value)
async def test_any_value_round_trips_exactly_or_is_refused(
    fast_cache: AsyncExactCache, value: Any
) -> None:
    await check_value(fast_cache, value)


@pytest.mark.redis
@REAL
@given(value=any_value)
async def test_any_value_round_trips_exactly_or_is_refused_on_real_redis(
    real_cache: AsyncExactCache, value: Any
) -> None:
    await check_value(real_cache, value)


@FAST
@given(value=storable_trees.filter(lambda v: v is not None) | storable_text)
async def test_json_and_text_are_never_refused(fast_cache: AsyncExactCache, value: Any) -> None:
    assert await check_value(fast_cache, value) == "stored"


@FAST
@given(value=surrogate_text)
async def test_text_with_lone_surrogates_is_refused_as_invalid(
    fast_cache: AsyncExactCache, value: str
) -> None:
    with pytest.raises(InvalidInputError, match="Unicode"):
        await fast_cache.put(fresh_query(), value)
    with pytest.raises(InvalidInputError, match="Unicode"):
        await fast_cache.put({"messages": [{"role": "user", "content": value}]}, "v")


@FAST
@given(query=queries)
async def test_any_query_is_usable_or_refused_by_every_call(
    fast_cache: AsyncExactCache, query: Any
) -> None:
    await check_key(fast_cache, query)


@pytest.mark.redis
@REAL
@given(query=queries)
async def test_any_query_is_usable_or_refused_on_real_redis(
    real_cache: AsyncExactCache, query: Any
) -> None:
    await check_key(real_cache, query)


@FAST
@given(query=queries, value=any_value)
async def test_memory_and_redis_answer_every_input_the_same_way(
    twins: tuple[MemoryExactCache, RedisExactCache], query: Any, value: Any
) -> None:
    outcomes = []
    for cache in twins:
        outcome: list[Any] = []
        for call in (lambda c=cache: c.put(query, value), lambda c=cache: c.get(query)):
            try:
                outcome.append(await call())
            except REFUSED as exc:
                outcome.append(type(exc))
        outcomes.append(outcome)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("as_dict", [False, True], ids=["lists", "dicts"])
@pytest.mark.parametrize("depth", [254, 255, 1000, 100_000])
async def test_deep_nesting_is_stored_or_refused_clearly_never_a_recursion_error(
    fast_cache: AsyncExactCache, depth: int, as_dict: bool
) -> None:
    value = nested(depth, as_dict=as_dict)
    query = {"messages": [{"role": "user", "content": "deep"}], "extra": value}
    if depth <= 254:
        assert await check_value(fast_cache, value) == "stored"
        assert await check_key(fast_cache, {"messages": [], "extra": nested(depth - 1)}) == "stored"
        return
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        await fast_cache.put(fresh_query(), value)
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        await fast_cache.get(query)


class Deep(BaseModel):
    data: Any = None


@pytest.mark.parametrize("depth", [100, 300, 5000])
async def test_a_deeply_nested_pydantic_value_or_query_is_refused_clearly(depth: int) -> None:
    cache = MemoryExactCache(value_types=[Deep])
    value = Deep(data=nested(depth))
    if depth == 100:
        await cache.put("q", value)
        assert await cache.get("q") == value
        return
    with pytest.raises(InvalidInputError, match="Deep"):
        await cache.put("q", value)
    with pytest.raises(InvalidInputError, match="Deep"):
        await cache.get(value)  # the model as a query


@pytest.mark.parametrize(
    ("query", "twin"),
    [
        (Deep(data=[float("nan")]), Deep(data=[None])),
        (Deep(data=[1.0, float("inf")]), Deep(data=[1.0, None])),
        (Deep(data={"temperature": float("-inf")}), Deep(data={"temperature": None})),
    ],
    ids=["nan", "inf-in-list", "inf-in-dict"],
)
async def test_non_finite_floats_in_untyped_fields_of_a_pydantic_query_are_refused(
    query: Deep, twin: Deep
) -> None:
    """JSON mode writes them as null: the key would be that of the ``None`` twin."""
    cache = MemoryExactCache()
    await cache.put(twin, "answer for another request")
    with pytest.raises(InvalidInputError, match="non-finite"):
        await cache.get(query)


@pytest.mark.parametrize("data", [object(), b"\xff\xfe"], ids=["object", "bad-utf8"])
async def test_a_pydantic_query_pydantic_cannot_serialize_is_refused(data: Any) -> None:
    class Loose(BaseModel, arbitrary_types_allowed=True):
        data: Any

    with pytest.raises(REFUSED, match="Loose"):
        await MemoryExactCache().get(Loose(data=data))


@settings(FAST, max_examples=6)
@given(value=huge_values)
async def test_huge_values_below_the_bound_round_trip(
    fast_cache: AsyncExactCache, value: str
) -> None:
    assert await check_value(fast_cache, value) == "stored"


@pytest.mark.redis
@REAL
@given(value=st.integers(min_value=2**63, max_value=2**64 - 1) | st.just(2**64))
async def test_big_integers_round_trip_up_to_64_bits_on_real_redis(
    real_cache: AsyncExactCache, value: int
) -> None:
    outcome = await check_value(real_cache, value)
    assert outcome == ("stored" if value < 2**64 else "refused")
