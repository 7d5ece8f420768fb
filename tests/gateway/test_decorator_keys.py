"""@cached_completion keys carry the type of every argument: equal JSON is not equal arguments."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from collections import OrderedDict, namedtuple
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from aiocache_llm import InvalidInputError, InvalidInputTypeError, cached_completion
from aiocache_llm.core.query import typed_key
from tests.conftest import Backend


@dataclasses.dataclass(frozen=True)
class Celsius:
    degrees: float


@dataclasses.dataclass(frozen=True)
class Fahrenheit:
    degrees: float


class Unit(enum.Enum):
    CELSIUS = "celsius"
    KELVIN = "kelvin"


class Scale(str, enum.Enum):
    CELSIUS = "celsius"


class Level(enum.IntEnum):
    LOW = 1


class Reading(BaseModel):
    value: float
    unit: Unit


class OtherReading(BaseModel):
    value: float
    unit: Unit


class Name(str):
    pass


Point = namedtuple("Point", "x y")


def counted() -> tuple[Any, list[Any]]:
    seen: list[Any] = []

    @cached_completion()
    async def describe(value: Any) -> str:
        seen.append(value)
        return f"{type(value).__name__}:{value!r}"

    return describe, seen


async def test_dataclasses_of_different_types_get_different_keys() -> None:
    @cached_completion()
    async def to_kelvin(temperature: Celsius | Fahrenheit) -> float:
        if isinstance(temperature, Fahrenheit):
            return (temperature.degrees - 32) * 5 / 9 + 273.15
        return temperature.degrees + 273.15

    assert await to_kelvin(Celsius(100)) == pytest.approx(373.15)
    assert await to_kelvin(Fahrenheit(100)) == pytest.approx(310.928, abs=1e-3)
    assert await to_kelvin(Celsius(100)) == pytest.approx(373.15)
    assert to_kelvin.gateway.stats().provider_calls == 2


EQUAL_AS_JSON = [
    (Celsius(1.0), {"degrees": 1.0}),
    (Unit.CELSIUS, "celsius"),
    (Scale.CELSIUS, "celsius"),
    (Scale.CELSIUS, Unit.CELSIUS),
    (Level.LOW, 1),
    (datetime.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05"),
    (datetime.date(2024, 1, 2), "2024-01-02"),
    (datetime.time(3, 4), "03:04:00"),
    (uuid.UUID(int=7), str(uuid.UUID(int=7))),
    ((1, 2), [1, 2]),
    (Point(1, 2), (1, 2)),
    (Name("x"), "x"),
    (OrderedDict(a=1), {"a": 1}),
    (Reading(value=1, unit=Unit.CELSIUS), OtherReading(value=1, unit=Unit.CELSIUS)),
    (Reading(value=1, unit=Unit.CELSIUS), {"value": 1.0, "unit": "celsius"}),
    ({"\x00type": "tuple", "\x00value": [1]}, (1,)),
    (frozenset({1}), {1}),
    (b"ab", "ab"),
    (decimal.Decimal("1.5"), 1.5),
]


@pytest.mark.parametrize(("first", "second"), EQUAL_AS_JSON)
async def test_values_that_serialize_alike_but_differ_in_type_get_different_keys(
    first: Any, second: Any
) -> None:
    describe, seen = counted()
    await describe(first)
    await describe(second)
    await describe(first)
    assert seen == [first, second]
    assert describe.cache_query(first) != describe.cache_query(second)


async def test_equal_typed_values_share_one_entry() -> None:
    describe, seen = counted()
    for _ in range(2):
        await describe(Celsius(1.0))
        await describe({"when": datetime.date(2024, 1, 2), "ids": (uuid.UUID(int=7),)})
        await describe(Reading(value=1, unit=Unit.CELSIUS))
        await describe({2, 1, 3})
    assert len(seen) == 4
    assert await describe.invalidate(Celsius(1.0)) is True


async def test_plain_json_arguments_keep_their_keys() -> None:
    """Keys of str/number/bool/None/list/dict arguments are what they were before types."""
    describe, _ = counted()
    value = {"prompt": "hi", "n": [1, 2.5, True, None]}
    assert describe.cache_query(value)["arguments"] == {"value": value}


@pytest.mark.parametrize(
    "value",
    [object(), lambda: 1, {1: "int key"}, {Name("k"): 1}],
    ids=["object", "function", "int-key", "str-subclass-key"],
)
async def test_values_without_a_faithful_key_are_refused(value: Any) -> None:
    describe, seen = counted()
    with pytest.raises(InvalidInputTypeError, match="pass key="):
        await describe(value)
    assert seen == []


async def test_non_finite_and_cyclic_values_are_refused() -> None:
    describe, _ = counted()
    with pytest.raises(InvalidInputError, match="non-finite"):
        await describe(Celsius(float("nan")))
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        await describe(cycle)


async def test_a_key_function_result_is_typed_too() -> None:
    calls = 0

    @cached_completion(key=lambda temperature: temperature)
    async def show(temperature: Any) -> str:
        nonlocal calls
        calls += 1
        return repr(temperature)

    await show(Celsius(1))
    await show(Fahrenheit(1))
    assert calls == 2


async def test_async_generators_key_typed_arguments_the_same_way() -> None:
    runs: list[Any] = []

    @cached_completion()
    async def spell(temperature: Any) -> AsyncIterator[str]:
        runs.append(temperature)
        yield type(temperature).__name__
        yield str(temperature.degrees)

    assert [c async for c in spell(Celsius(5))] == ["Celsius", "5"]
    assert [c async for c in spell(Fahrenheit(5))] == ["Fahrenheit", "5"]
    assert [c async for c in spell(Celsius(5))] == ["Celsius", "5"]
    assert runs == [Celsius(5), Fahrenheit(5)]
    assert await spell.invalidate(Fahrenheit(5)) is True
    assert await spell.invalidate(Fahrenheit(5)) is False


async def test_typed_keys_hold_on_every_backend(backend: Backend) -> None:
    from aiocache_llm import MemoryExactCache, RedisExactCache

    cache: Any = (
        MemoryExactCache(clock=backend.clock)
        if backend.redis is None
        else RedisExactCache(client=backend.redis.client, key_prefix=backend.redis.prefix)
    )
    calls: list[Any] = []

    @cached_completion(cache)
    async def to_kelvin(temperature: Any) -> float:
        calls.append(temperature)
        return 1.0 if isinstance(temperature, Celsius) else 2.0

    assert [await to_kelvin(t) for t in (Celsius(100), Fahrenheit(100), Celsius(100))] == [
        1.0,
        2.0,
        1.0,
    ]
    assert calls == [Celsius(100), Fahrenheit(100)]
    await to_kelvin.gateway.aclose()
    await cache.aclose()


def test_typed_key_marks_only_what_json_cannot_tell_apart() -> None:
    assert typed_key({"a": [1, "x", None, 2.5, True]}) == {"a": [1, "x", None, 2.5, True]}
    tagged = typed_key(Celsius(1.0))
    assert tagged != typed_key(Fahrenheit(1.0))
    assert typed_key({"\x00type": 1}) == {"\x00\x00type": 1}  # escaped: never a tag
