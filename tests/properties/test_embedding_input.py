"""Semantic caches under hostile embeddings: a clean refusal, or a vector that works.

Whatever ``embed_fn`` returns (NaN, infinities, zeros, the wrong dimension, huge or
subnormal magnitudes, strings, ``None``, booleans, complex numbers, nested or ragged
sequences, integers beyond 64 bits, numpy arrays of any dtype), a put is accepted
exactly when the vector is a usable direction (finite, real, not all zero, of the
cache's dimension), and then the entry answers its exact repeat and a paraphrase
embedded to the same direction; otherwise it raises :class:`InvalidInputError` /
:class:`InvalidInputTypeError`, lookups with that vector raise the same way, and
nothing stored changes, and no numpy warning escapes. Values of any kind are stored
exactly or refused, as in the exact caches.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocache_llm import AsyncSemanticCache, MemorySemanticCache, RedisSemanticCache
from tests.conftest import RedisTarget
from tests.properties.checks import FAST, REAL, REFUSED, assert_identical
from tests.properties.strategies import any_text, hostile_trees

# numpy warnings would be exceptions in applications that run with -W error
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("error::RuntimeWarning")]

DIMENSION = 8
SEED_VECTOR = [1.0] + [0.0] * (DIMENSION - 1)

_magnitudes = st.one_of(
    st.floats(),  # NaN and infinities included
    st.floats(min_value=1e300, max_value=1.7976931348623157e308),
    st.floats(min_value=-1e-307, max_value=1e-307),  # subnormals and zeros
    st.sampled_from([0.0, -0.0, 5e-324, 1e-45, 3.4e38, 3.5e38]),  # float32's edges
    st.integers(min_value=-(2**70), max_value=2**70),
)


def _as_array(values: list[Any], dtype: str) -> Any:
    with np.errstate(all="ignore"):  # NaN cast to int, overflow to inf: intended here
        return np.array(values, dtype=np.float64).astype(dtype)


_floats = st.lists(_magnitudes, min_size=DIMENSION, max_size=DIMENSION)
_dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "int64", "uint8",
                           "complex64", "bool", "object"])  # fmt: skip
embeddings = st.one_of(
    _floats,
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2 * DIMENSION),
    st.just([0.0] * DIMENSION),
    st.builds(_as_array, _floats, _dtypes),
    st.builds(lambda v: np.array([v, v]), _floats),  # 2-D
    st.lists(
        st.sampled_from([True, False, None, "1.0", 1j, [1.0]]),
        min_size=DIMENSION,
        max_size=DIMENSION,
    ),
    st.none() | any_text | st.binary(max_size=8) | st.dictionaries(any_text, st.floats()),
    st.builds(lambda v: (x for x in v), _floats),  # a generator: not a sequence
)


def usable(raw: Any) -> bool:
    """The specification: a finite, real, non-zero 1-D vector of the cache's dimension."""
    if isinstance(raw, (str, bytes, dict)) or raw is None or not hasattr(raw, "__len__"):
        return False
    try:
        array = np.asarray(raw)
    except ValueError:
        return False
    if array.dtype.kind not in "iuf" or array.shape != (DIMENSION,):
        return False
    values = array.astype(np.float64)
    return bool(np.isfinite(values).all() and values.any())


class Embedder:
    """``seed`` -> the seed vector; any other text -> ``vector`` (set per example)."""

    def __init__(self) -> None:
        self.vector: Any = None

    def __call__(self, text: str) -> Any:
        return SEED_VECTOR if text == "seed" else self.vector


def ask(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


@pytest.fixture(params=["memory", "fakeredis"])
async def fast(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[AsyncSemanticCache, Embedder]]:
    embedder = Embedder()
    cache: AsyncSemanticCache
    if request.param == "memory":
        cache = MemorySemanticCache(embedder, max_size=0, embed_in_thread=False)
    else:
        cache = RedisSemanticCache(
            embedder, client=fakeredis.FakeAsyncRedis(), key_prefix="props", embed_in_thread=False
        )
    async with cache:
        await cache.put(ask("seed"), "seed answer")
        yield cache, embedder


@pytest.fixture
async def real(real_redis: RedisTarget) -> AsyncIterator[tuple[AsyncSemanticCache, Embedder]]:
    embedder = Embedder()
    cache = RedisSemanticCache(
        embedder, client=real_redis.client, key_prefix=real_redis.prefix, embed_in_thread=False
    )
    async with cache:
        await cache.put(ask("seed"), "seed answer")
        yield cache, embedder


async def check_embedding(cache: AsyncSemanticCache, embedder: Embedder, raw: Any) -> None:
    embedder.vector = raw
    await cache.invalidate(ask("probe"))
    size = (await cache.stats()).size
    valid = usable(raw)
    if not valid:
        with pytest.raises(REFUSED):
            await cache.put(ask("probe"), "probe answer")
        with pytest.raises(REFUSED):
            await cache.get(ask("another probe"))  # the scope has the seed: it embeds
        assert (await cache.stats()).size == size
        assert await cache.get(ask("seed")) == "seed answer"
        return
    await cache.put(ask("probe"), "probe answer")
    assert await cache.get(ask("probe")) == "probe answer"
    # another text embedded to the same direction is a hit at similarity 1 (the seed
    # may tie with it when both point the same way)
    answer = await cache.get(ask("another probe"), similarity_threshold=0.999)
    parallel = _cosine(raw, SEED_VECTOR) > 0.999
    assert answer == "probe answer" or (parallel and answer == "seed answer")
    assert await cache.get(ask("seed")) in {"seed answer", "probe answer" if parallel else None}


def _cosine(raw: Any, other: list[float]) -> float:
    a = np.asarray(raw).astype(np.float64)
    a = a / np.abs(a).max()
    b = np.asarray(other)
    return float(a @ b / math.sqrt(float(a @ a)) / math.sqrt(float(b @ b)))


@FAST
@given(raw=embeddings)
async def test_an_embedding_is_used_exactly_when_it_is_a_usable_direction(
    fast: tuple[AsyncSemanticCache, Embedder], raw: Any
) -> None:
    await check_embedding(*fast, raw)


@pytest.mark.redis
@REAL
@given(raw=embeddings)
async def test_an_embedding_is_used_exactly_when_usable_on_real_redis(
    real: tuple[AsyncSemanticCache, Embedder], raw: Any
) -> None:
    await check_embedding(*real, raw)


@FAST
@given(value=hostile_trees | any_text)
async def test_any_semantic_value_round_trips_exactly_or_is_refused(
    fast: tuple[AsyncSemanticCache, Embedder], value: Any
) -> None:
    cache, embedder = fast
    embedder.vector = [0.0, 1.0] + [0.0] * (DIMENSION - 2)
    await cache.put(ask("probe"), "before")
    try:
        await cache.put(ask("probe"), value)
    except REFUSED:
        assert await cache.get(ask("probe")) == "before"
        return
    assert_identical(await cache.get(ask("probe")), value)
