"""The AsyncSemanticCache contract: every backend answers these calls the same way.

Most tests use :class:`TableEmbedder`, which maps each text to a chosen vector so
that similarities are exact (0.8 means 0.8); paraphrase tests use the built-in
:class:`HashingEmbedder`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from fakeredis import FakeAsyncRedis, FakeServer
from pydantic import BaseModel

from aiocache_llm import (
    AsyncSemanticCache,
    ClosedResourceError,
    InvalidInputError,
    InvalidInputTypeError,
    LLMResponse,
    MemoryExactCache,
    MemorySemanticCache,
    RedisExactCache,
    RedisSemanticCache,
    Usage,
)
from aiocache_llm.backends import vectors
from aiocache_llm.backends.promotion import PromotingSemanticCache
from aiocache_llm.core.query import QueryKeys
from aiocache_llm.embedders import HashingEmbedder
from tests.conftest import ALL_BACKENDS, Backend, open_backend

# Unit vectors in 4-D whose dot products with BASE are the numbers in the names.
BASE = [1.0, 0.0, 0.0, 0.0]
VECTORS: dict[str, Any] = {
    "capital of france": BASE,
    "same vector as base": BASE,
    "sim 0.96": [0.96, 0.28, 0.0, 0.0],
    "sim 0.8": [0.8, 0.6, 0.0, 0.0],
    "sim 0.6": [0.6, 0.8, 0.0, 0.0],
    "sim 0": [0.0, 0.0, 1.0, 0.0],
    "sim -1": [-1.0, 0.0, 0.0, 0.0],
    "other axis": [0.0, 0.0, 0.0, 1.0],
    "near other axis": [0.0, 0.0, 0.28, 0.96],
    "unnormalized base": [5.0, 0.0, 0.0, 0.0],
    # bad embeddings
    "nan": [float("nan"), 1.0, 0.0, 0.0],
    "inf": [float("inf"), 1.0, 0.0, 0.0],
    "zero": [0.0, 0.0, 0.0, 0.0],
    "too short": [1.0, 0.0, 0.0],
    "empty": [],
    "2-d": [[1.0, 0.0], [0.0, 1.0]],
    "a string": "1 0 0 0",
    "none": None,
    "strings": ["1", "0", "0", "0"],
    "booleans": [True, False, False, False],
}


class TableEmbedder:
    """A sync embed_fn that looks texts up in a table (an exception there is raised)."""

    def __init__(self, table: dict[str, Any] | None = None) -> None:
        self.table = dict(VECTORS if table is None else table)
        self.calls: list[str] = []
        self.threads: set[int] = set()

    def __call__(self, text: str) -> Any:
        self.calls.append(text)
        self.threads.add(threading.get_ident())
        vector = self.table[text]
        if isinstance(vector, BaseException):
            raise vector
        return vector


class AsyncTableEmbedder(TableEmbedder):
    async def __call__(self, text: str) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        return super().__call__(text)


def ask(text: Any, **fields: Any) -> dict[str, Any]:
    """A chat request whose last user message is ``text`` (a string or a list of parts)."""
    messages = fields.pop("messages", [])
    return {
        "model": "gpt-4o-mini",
        "messages": [*messages, {"role": "user", "content": text}],
        "temperature": 0.0,
        **fields,
    }


Factory = Callable[..., AsyncSemanticCache]


@pytest.fixture(params=ALL_BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """This suite also runs on a Redis Cluster and on a Sentinel-managed primary.

    On the cluster the prefix holds a hash tag (``{test:...}``): the whole cache lives
    in that tag's slot, as the cache requires there.
    """
    async with open_backend(request) as opened:
        if opened.kind == "cluster" and opened.redis is not None:
            tagged = dataclasses.replace(opened.redis, prefix="{" + opened.redis.prefix + "}")
            opened = dataclasses.replace(opened, redis=tagged)
        yield opened


@pytest.fixture
async def make_cache(backend: Backend) -> AsyncIterator[Factory]:
    """Builds caches of the backend under test; on Redis every one shares its storage."""
    made: list[AsyncSemanticCache] = []

    def make(embed_fn: Any = None, **kwargs: Any) -> AsyncSemanticCache:
        embed_fn = TableEmbedder() if embed_fn is None else embed_fn
        kwargs.setdefault("embed_in_thread", False)
        cache: AsyncSemanticCache
        if backend.redis is None:
            kwargs.setdefault("max_size", 0)
            cache = MemorySemanticCache(embed_fn, clock=backend.clock, **kwargs)
        else:
            cache = RedisSemanticCache(
                embed_fn, client=backend.redis.client, key_prefix=backend.redis.prefix, **kwargs
            )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


@pytest.fixture
def cache(make_cache: Factory) -> AsyncSemanticCache:
    return make_cache(similarity_threshold=0.9)


async def test_is_an_async_semantic_cache(cache: AsyncSemanticCache) -> None:
    assert isinstance(cache, AsyncSemanticCache)


async def test_paraphrase_hits_and_unrelated_question_misses(make_cache: Factory) -> None:
    cache = make_cache(HashingEmbedder(), similarity_threshold=0.8)
    await cache.put(ask("What is the capital of France?"), "Paris")
    assert await cache.get(ask("what's the capital of france")) == "Paris"
    assert await cache.get(ask("France: what is the capital?")) == "Paris"
    assert await cache.get(ask("How do I reverse a list in Python?")) is None
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.size) == (2, 1, 1)


async def test_similar_vector_hits_and_dissimilar_misses(cache: AsyncSemanticCache) -> None:
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"
    assert await cache.get(ask("sim 0.8")) is None
    assert await cache.get(ask("sim 0")) is None


async def test_exact_repeat_hits_without_calling_the_embedder(make_cache: Factory) -> None:
    embedder = TableEmbedder()
    cache = make_cache(embedder, similarity_threshold=1.0)
    await cache.put(ask("capital of france"), "Paris")
    calls = len(embedder.calls)
    assert await cache.get(ask("capital of france")) == "Paris"
    assert len(embedder.calls) == calls


async def test_a_scope_with_no_entries_misses_without_calling_the_embedder(
    make_cache: Factory,
) -> None:
    embedder = TableEmbedder()
    cache = make_cache(embedder, similarity_threshold=0.9)
    assert await cache.get(ask("capital of france")) is None
    await cache.put(ask("capital of france", model="other"), "Paris")
    await cache.invalidate(ask("capital of france", model="other"))
    calls = len(embedder.calls)
    assert await cache.get(ask("sim 0.96", model="other")) is None
    assert await cache.get(ask("sim 0.96", model="never used")) is None
    assert len(embedder.calls) == calls
    assert (await cache.stats()).misses == 3


async def test_identical_vectors_reach_threshold_one(make_cache: Factory) -> None:
    cache = make_cache(similarity_threshold=1.0)
    await cache.put(ask("capital of france"), "Paris")
    # another text, the same direction: similarity 1 despite float32 rounding
    assert await cache.get(ask("same vector as base")) == "Paris"
    assert await cache.get(ask("unnormalized base")) == "Paris"
    assert await cache.get(ask("sim 0.96")) is None


@pytest.mark.parametrize(
    "other",
    [
        ask("sim 0.96", model="gpt-4o"),
        ask("sim 0.96", messages=[{"role": "system", "content": "Answer in French."}]),
        ask(
            "sim 0.96",
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
        ),
        ask("sim 0.96", temperature=0.7),
        ask("sim 0.96", max_tokens=5),
    ],
    ids=["model", "system-prompt", "earlier-turns", "temperature", "max-tokens"],
)
async def test_a_paraphrase_in_another_scope_misses(
    cache: AsyncSemanticCache, other: dict[str, Any]
) -> None:
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(other) is None
    assert await cache.get(ask("sim 0.96")) == "Paris"


async def test_fields_left_out_of_the_key_do_not_change_the_scope(
    cache: AsyncSemanticCache,
) -> None:
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96", user="alice", stream=True)) == "Paris"


async def test_a_nearer_neighbour_in_another_scope_never_hides_a_match(
    make_cache: Factory,
) -> None:
    cache = make_cache(similarity_threshold=0.75)
    # the other scope holds the query's own vector; this scope only a farther one
    await cache.put(ask("same vector as base", model="other-model"), "other scope")
    for i in range(20):
        await cache.put(ask("same vector as base", model=f"filler-{i}"), f"filler {i}")
    await cache.put(ask("sim 0.8"), "this scope")
    assert await cache.get(ask("capital of france")) == "this scope"


async def test_the_most_similar_entry_of_the_scope_wins(make_cache: Factory) -> None:
    cache = make_cache(similarity_threshold=0.5)
    await cache.put(ask("sim 0.6"), "far")
    await cache.put(ask("sim 0.96"), "near")
    await cache.put(ask("sim 0.8"), "middle")
    assert await cache.get(ask("capital of france")) == "near"


async def test_similarity_equal_to_the_threshold_is_a_hit(make_cache: Factory) -> None:
    cache = make_cache(similarity_threshold=0.8)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.8")) == "Paris"
    assert await cache.get(ask("sim 0.8"), similarity_threshold=0.8001) is None
    assert await cache.get(ask("sim 0.6")) is None


async def test_per_call_threshold_overrides_the_default(make_cache: Factory) -> None:
    cache = make_cache()  # default 0.95
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"
    assert await cache.get(ask("sim 0.8")) is None
    assert await cache.get(ask("sim 0.8"), similarity_threshold=0.8) == "Paris"
    assert await cache.get(ask("sim 0.96"), similarity_threshold=0.97) is None
    # 0: orthogonal counts; -1: everything in the scope counts, the opposite included
    assert await cache.get(ask("sim 0"), similarity_threshold=0) == "Paris"
    assert await cache.get(ask("sim -1"), similarity_threshold=0) is None
    assert await cache.get(ask("sim -1"), similarity_threshold=-1) == "Paris"


@pytest.mark.parametrize(
    ("threshold", "error"),
    [
        (1.5, InvalidInputError),
        (-1.01, InvalidInputError),
        (float("nan"), InvalidInputError),
        ("0.9", InvalidInputTypeError),
        (True, InvalidInputTypeError),
    ],
    ids=["above-1", "below-minus-1", "nan", "str", "bool"],
)
async def test_bad_threshold_raises(
    make_cache: Factory, threshold: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="similarity_threshold"):
        make_cache(similarity_threshold=threshold)
    cache = make_cache()
    await cache.put(ask("capital of france"), "Paris")
    with pytest.raises(error, match="similarity_threshold"):
        await cache.get(ask("sim 0.96"), similarity_threshold=threshold)


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("nan", InvalidInputError, "NaN or infinite"),
        ("inf", InvalidInputError, "NaN or infinite"),
        ("zero", InvalidInputError, "all zeros"),
        ("too short", InvalidInputError, "dimension 3, expected 4"),
        ("empty", InvalidInputError, "empty"),
        ("2-d", InvalidInputError, "1-D"),
        ("a string", InvalidInputTypeError, "sequence of numbers"),
        ("none", InvalidInputTypeError, "sequence of numbers"),
        ("strings", InvalidInputTypeError, "real numbers"),
        ("booleans", InvalidInputTypeError, "real numbers"),
    ],
)
async def test_bad_embedding_raises_and_leaves_entries_unchanged(
    cache: AsyncSemanticCache, text: str, error: type[Exception], message: str
) -> None:
    await cache.put(ask("capital of france"), "Paris")
    await cache.put(ask("other axis"), "other")
    with pytest.raises(error, match=message):
        await cache.put(ask(text), "bad")
    with pytest.raises(error, match=message):
        await cache.get(ask(text))
    with pytest.raises(error, match=message):
        await cache.put(ask(text, model="fresh-scope"), "bad")
    assert await cache.get(ask(text, model="fresh-scope")) is None  # nothing to compare with
    assert await cache.get(ask("sim 0.96")) == "Paris"
    assert await cache.get(ask("other axis")) == "other"
    assert (await cache.stats()).size == 2


async def test_declared_dimension_is_enforced_from_the_first_put(make_cache: Factory) -> None:
    cache = make_cache(dimension=3)
    with pytest.raises(InvalidInputError, match="dimension 4, expected 3"):
        await cache.put(ask("capital of france"), "Paris")
    assert (await cache.stats()).size == 0


async def test_embedder_errors_propagate_and_store_nothing(make_cache: Factory) -> None:
    class Broken(RuntimeError):
        pass

    embedder = TableEmbedder({**VECTORS, "boom": Broken("model is down")})
    cache = make_cache(embedder, similarity_threshold=0.9)
    await cache.put(ask("capital of france"), "Paris")
    with pytest.raises(Broken):
        await cache.put(ask("boom"), "x")
    with pytest.raises(Broken):
        await cache.get(ask("boom"))
    assert await cache.get(ask("capital of france")) == "Paris"
    assert (await cache.stats()).size == 1


async def test_async_embed_fn_is_awaited(make_cache: Factory) -> None:
    embedder = AsyncTableEmbedder()
    cache = make_cache(embedder, similarity_threshold=0.9, embed_in_thread=True)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"
    assert embedder.threads == {threading.get_ident()}


async def test_sync_embed_fn_runs_in_a_worker_thread_by_default(make_cache: Factory) -> None:
    embedder = TableEmbedder()
    cache = make_cache(embedder, similarity_threshold=0.9, embed_in_thread=True)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"
    assert embedder.threads
    assert threading.get_ident() not in embedder.threads


async def test_sync_embed_fn_runs_inline_when_asked(make_cache: Factory) -> None:
    embedder = TableEmbedder()
    cache = make_cache(embedder, similarity_threshold=0.9, embed_in_thread=False)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"
    assert embedder.threads == {threading.get_ident()}


async def test_embedder_may_return_a_numpy_array(make_cache: Factory) -> None:
    table = {text: np.asarray(v, dtype=np.float64) for text, v in VECTORS.items() if "sim" in text}
    table["capital of france"] = np.asarray(BASE, dtype=np.float16)
    cache = make_cache(TableEmbedder(table), similarity_threshold=0.9)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"


async def test_default_ttl_expires(make_cache: Factory, backend: Backend) -> None:
    cache = make_cache(similarity_threshold=0.9, ttl_seconds=0.2)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"
    await backend.wait(0.35)
    assert await cache.get(ask("sim 0.96")) is None
    assert await cache.get(ask("capital of france")) is None
    assert (await cache.stats()).size == 0


async def test_per_put_ttl_overrides_the_default(make_cache: Factory, backend: Backend) -> None:
    cache = make_cache(similarity_threshold=0.9, ttl_seconds=100)
    await cache.put(ask("capital of france"), "short", ttl_seconds=0.2)
    await cache.put(ask("other axis"), "long")
    await backend.wait(0.35)
    assert await cache.get(ask("sim 0.96")) is None
    assert await cache.get(ask("other axis")) == "long"


async def test_an_expired_nearer_entry_never_hides_a_live_farther_one(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache(similarity_threshold=0.75)
    await cache.put(ask("same vector as base"), "expired", ttl_seconds=0.2)
    await cache.put(ask("sim 0.96"), "expired too", ttl_seconds=0.2)
    await cache.put(ask("sim 0.8"), "live")
    assert await cache.get(ask("capital of france")) == "expired"
    await backend.wait(0.35)
    assert await cache.get(ask("capital of france")) == "live"


async def test_bad_ttl_raises_and_keeps_what_was_stored(cache: AsyncSemanticCache) -> None:
    await cache.put(ask("capital of france"), "Paris")
    for ttl in (0, -1, float("nan")):
        with pytest.raises(InvalidInputError, match="ttl_seconds"):
            await cache.put(ask("capital of france"), "other", ttl_seconds=ttl)
    assert await cache.get(ask("sim 0.96")) == "Paris"


@pytest.mark.parametrize(
    "refresh_text", ["capital of france", "sim 0.96"], ids=["exact", "similar"]
)
async def test_max_size_evicts_least_recently_used_across_scopes(
    make_cache: Factory, refresh_text: str
) -> None:
    cache = make_cache(similarity_threshold=0.9, max_size=2)
    scopes = [f"model-{i}" for i in range(3)]
    await cache.put(ask("capital of france", model=scopes[0]), "a0")
    await cache.put(ask("capital of france", model=scopes[1]), "a1")
    # a hit, exact or by similarity, makes scopes[0] recent: scopes[1] is now the oldest
    assert await cache.get(ask(refresh_text, model=scopes[0])) == "a0"
    await cache.put(ask("capital of france", model=scopes[2]), "a2")
    assert await cache.get(ask("sim 0.96", model=scopes[1])) is None
    assert await cache.get(ask("sim 0.96", model=scopes[0])) == "a0"
    assert await cache.get(ask("sim 0.96", model=scopes[2])) == "a2"
    stats = await cache.stats()
    assert (stats.size, stats.evictions) == (2, 1)


async def test_unbounded_cache_keeps_everything(make_cache: Factory) -> None:
    cache = make_cache(HashingEmbedder(64), max_size=0, similarity_threshold=1.0)
    for i in range(40):
        await cache.put(ask(f"question number {i}"), f"a{i}")
    assert all([await cache.get(ask(f"question number {i}")) == f"a{i}" for i in range(40)])
    assert (await cache.stats()).size == 40


async def test_put_of_the_same_query_replaces_value_and_vector(make_cache: Factory) -> None:
    embedder = TableEmbedder()
    cache = make_cache(embedder, similarity_threshold=0.9)
    await cache.put(ask("capital of france"), "Paris")
    embedder.table["capital of france"] = VECTORS["other axis"]
    await cache.put(ask("capital of france"), "Paris, France")
    assert (await cache.stats()).size == 1
    assert await cache.get(ask("sim 0.96")) is None  # the old vector is gone
    assert await cache.get(ask("other axis")) == "Paris, France"


async def test_invalidate_removes_exactly_that_entry(cache: AsyncSemanticCache) -> None:
    await cache.put(ask("capital of france"), "Paris")
    await cache.put(ask("sim 0.96"), "Paris too")
    assert await cache.invalidate(ask("capital of france")) is True
    assert await cache.invalidate(ask("capital of france")) is False
    assert await cache.get(ask("capital of france")) == "Paris too"  # by similarity now
    assert await cache.invalidate(ask("sim 0.96")) is True
    assert await cache.get(ask("capital of france")) is None
    assert (await cache.stats()).size == 0


async def test_invalidate_of_an_expired_entry_is_false(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache()
    await cache.put(ask("capital of france"), "Paris", ttl_seconds=0.2)
    await backend.wait(0.35)
    assert await cache.invalidate(ask("capital of france")) is False


async def test_clear(cache: AsyncSemanticCache) -> None:
    await cache.put(ask("capital of france"), "Paris")
    await cache.put(ask("capital of france", model="other"), "Paris")
    await cache.clear()
    assert await cache.get(ask("capital of france")) is None
    assert await cache.get(ask("sim 0.96", model="other")) is None
    assert (await cache.stats()).size == 0
    await cache.put(ask("capital of france"), "again")
    assert await cache.get(ask("sim 0.96")) == "again"


class Completion(BaseModel):
    """A user-declared response type, as an SDK's completion object would be."""

    id: str
    choices: list[dict[str, Any]]


async def test_a_type_the_reader_did_not_declare_is_counted_apart(
    make_cache: Factory, backend: Backend
) -> None:
    if backend.redis is None:
        pytest.skip("Redis backends only: a memory cache knows every type it stored")
    writer = make_cache(similarity_threshold=0.9, value_types=[Completion])
    reader = make_cache(similarity_threshold=0.9)  # another process, no value_types=
    await writer.put(ask("capital of france"), Completion(id="c1", choices=[]))
    assert await reader.get(ask("capital of france")) is None
    stats = await reader.stats()
    assert (stats.undeclared_entries, stats.corrupt_entries) == (1, 0)


@pytest.mark.parametrize(
    "value",
    [
        "plain text ✓ with unicode \u2028 and \x00",
        {"choices": [{"message": {"content": "Paris"}}], "n": 1, "ok": True, "x": None},
        [1, 2.5, "three", {"four": [4]}],
        LLMResponse(content="Paris", model="m", usage=Usage(total_tokens=3)),
        Completion(id="c1", choices=[{"text": "Paris"}]),
    ],
    ids=["str", "dict", "list", "llm-response", "declared-model"],
)
async def test_values_round_trip_to_the_same_type(make_cache: Factory, value: Any) -> None:
    cache = make_cache(similarity_threshold=0.9, value_types=[Completion])
    await cache.put(ask("capital of france"), value)
    for text in ("capital of france", "sim 0.96"):  # exact and semantic hits
        got = await cache.get(ask(text))
        assert type(got) is type(value)
        assert got == value


async def test_mutating_a_hit_or_the_stored_object_does_not_change_the_cache(
    cache: AsyncSemanticCache,
) -> None:
    value = {"answer": ["Paris"]}
    await cache.put(ask("capital of france"), value)
    value["answer"].append("Lyon")
    first = await cache.get(ask("sim 0.96"))
    first["answer"].append("Marseille")
    assert await cache.get(ask("sim 0.96")) == {"answer": ["Paris"]}


async def test_unserializable_value_raises_and_keeps_what_was_stored(
    cache: AsyncSemanticCache,
) -> None:
    await cache.put(ask("capital of france"), "Paris")
    for bad in (object(), {"x": float("nan")}, b"bytes"):
        with pytest.raises((InvalidInputError, InvalidInputTypeError)):
            await cache.put(ask("capital of france"), bad)
    assert await cache.get(ask("capital of france")) == "Paris"


@pytest.mark.parametrize(
    ("bad_query", "error"),
    [
        ("", InvalidInputError),
        ({"model": "m"}, InvalidInputError),
        ({"messages": [{"role": "system", "content": "x"}]}, InvalidInputError),
        ({"messages": [{"role": "user", "content": "   "}]}, InvalidInputError),
        ({"messages": [{"role": "user", "content": []}]}, InvalidInputError),
        ({**ask("capital of france"), "temperature": float("nan")}, InvalidInputError),
        (42, InvalidInputTypeError),
    ],
    ids=["empty-str", "no-messages", "no-user-message", "blank-text", "no-parts", "nan", "int"],
)
async def test_bad_query_raises_on_every_method(
    cache: AsyncSemanticCache, bad_query: Any, error: type[Exception]
) -> None:
    await cache.put(ask("capital of france"), "Paris")
    with pytest.raises(error):
        await cache.get(bad_query)
    with pytest.raises(error):
        await cache.put(bad_query, "x")
    with pytest.raises(error):
        await cache.invalidate(bad_query)
    assert await cache.get(ask("capital of france")) == "Paris"


async def test_str_query_means_one_user_message(cache: AsyncSemanticCache) -> None:
    await cache.put("capital of france", "Paris")
    assert await cache.get({"messages": [{"role": "user", "content": "sim 0.96"}]}) == "Paris"


# provider shapes (issue 14): OpenAI text parts, Anthropic text blocks, tool results


def text_block(text: str) -> list[dict[str, Any]]:
    """``text`` as the content of one text part (OpenAI) or text block (Anthropic)."""
    return [{"type": "text", "text": text}]


def anthropic(content: Any, **fields: Any) -> dict[str, Any]:
    """An Anthropic Messages request whose last user message holds ``content``."""
    messages = fields.pop("messages", [])
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [*messages, {"role": "user", "content": content}],
        **fields,
    }


TOOL_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look that up."},
            {
                "type": "tool_use",
                "id": "toolu_01A09q90qw90lq917835lq9",
                "name": "get_weather",
                "input": {"location": "Paris, France"},
            },
        ],
    },
]


def tool_result(content: Any) -> list[dict[str, Any]]:
    return [
        {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": content}
    ]


@pytest.mark.parametrize("request_of", [ask, anthropic], ids=["openai", "anthropic"])
@pytest.mark.parametrize("stored_in_a_block", [False, True], ids=["str-stored", "block-stored"])
async def test_a_string_and_a_single_text_block_are_the_same_question(
    cache: AsyncSemanticCache, request_of: Callable[[Any], dict[str, Any]], stored_in_a_block: bool
) -> None:
    def stored(text: str) -> dict[str, Any]:
        return request_of(text_block(text) if stored_in_a_block else text)

    def other_form(text: str) -> dict[str, Any]:
        return request_of(text if stored_in_a_block else text_block(text))

    await cache.put(stored("capital of france"), "Paris")
    assert await cache.get(other_form("capital of france")) == "Paris"
    assert await cache.get(other_form("sim 0.96")) == "Paris"
    assert await cache.get(other_form("sim 0.8")) is None
    assert await cache.invalidate(other_form("capital of france")) is False  # another query
    assert (await cache.stats()).size == 1


async def test_several_plain_text_blocks_are_their_text_joined_by_newlines(
    make_cache: Factory,
) -> None:
    embedder = TableEmbedder({"capital of\nfrance": BASE})
    cache = make_cache(embedder, similarity_threshold=0.9)
    await cache.put(anthropic("capital of\nfrance"), "Paris")
    blocks = [*text_block("capital of"), *text_block("france")]
    assert await cache.get(anthropic(blocks)) == "Paris"
    assert embedder.calls == ["capital of\nfrance", "capital of\nfrance"]


async def test_a_text_block_with_more_to_it_than_text_is_another_scope(
    cache: AsyncSemanticCache,
) -> None:
    # cache_control (Anthropic prompt caching) and the like stay in the scope, as
    # every part of the last message but its text does
    await cache.put(anthropic("capital of france"), "Paris")
    marked = [{"type": "text", "text": "sim 0.96", "cache_control": {"type": "ephemeral"}}]
    assert await cache.get(anthropic(marked)) is None


@pytest.mark.parametrize(
    "system",
    ["Answer in French.", text_block("Answer in French.")],
    ids=["string", "text-blocks"],
)
async def test_anthropic_system_prompt_is_part_of_the_scope(
    cache: AsyncSemanticCache, system: Any
) -> None:
    await cache.put(anthropic("capital of france", system=system), "Paris")
    assert await cache.get(anthropic("sim 0.96", system=system)) == "Paris"
    assert await cache.get(anthropic("sim 0.96", system="Answer in German.")) is None
    assert await cache.get(anthropic("sim 0.96")) is None


@pytest.mark.parametrize(
    "content",
    [
        tool_result("15 degrees, sunny"),
        tool_result(text_block("15 degrees, sunny")),
        [{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}],
        [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
    ],
    ids=["tool-result", "tool-result-blocks", "anthropic-image", "openai-image"],
)
async def test_a_last_user_message_without_text_is_not_a_semantic_query(
    make_cache: Factory, content: Any
) -> None:
    embedder = TableEmbedder()
    cache = make_cache(embedder, similarity_threshold=0.9)
    query = anthropic(content, messages=TOOL_TURN)
    await cache.put(ask("capital of france"), "Paris")
    calls, before = len(embedder.calls), await cache.stats()
    await cache.put(query, "stored nowhere")
    assert await cache.get(query) is None
    assert await cache.get(query, similarity_threshold=-1.0) is None
    if isinstance(cache, PromotingSemanticCache):
        assert await cache.lookup(query) is None
    assert await cache.invalidate(query) is False
    after = await cache.stats()
    # neither a miss nor an entry, and no embedding: the cache was not asked anything
    assert (after.hits, after.misses, after.size) == (before.hits, before.misses, 1)
    assert len(embedder.calls) == calls
    assert await cache.get(ask("capital of france")) == "Paris"


async def test_a_tool_result_with_text_asks_the_text_within_the_tool_results_scope(
    cache: AsyncSemanticCache,
) -> None:
    def follow_up(result: str, text: str) -> dict[str, Any]:
        return anthropic([*tool_result(result), *text_block(text)], messages=TOOL_TURN)

    await cache.put(follow_up("15 degrees", "capital of france"), "Paris")
    assert await cache.get(follow_up("15 degrees", "sim 0.96")) == "Paris"
    assert await cache.get(follow_up("30 degrees", "sim 0.96")) is None


def test_scopes_of_string_content_are_those_entries_were_stored_under() -> None:
    # digests computed before issue 14: entries stored under them keep matching
    keys = QueryKeys()
    french = ask("capital?", messages=[{"role": "system", "content": "Answer in French."}])
    brief = anthropic("capital?", system="Be brief.")
    image = ask([
        {"type": "text", "text": "What is in"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ])  # fmt: skip
    assert [keys.semantic_parts(query)[0] for query in (french, brief, image, "Everest?")] == [
        "95091571725de8f4c23aaec33641324bc2788dce44d825d74f2730fe98ef8913",
        "ae02f6003f71255c3adc9f52356ca8d5bf5e5cac1f36cf16ca5c73f010ec4186",
        "4ce413b83e90785b37a33649cdbb400b2f6285f03f29089a67fa38faabec3a85",
        "c9f5412e813ec6317a6a7910633e503ea9956726405d75409573defe98c114d0",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"similarity_threshold": 2},
        {"max_size": -1},
        {"ttl_seconds": 0},
        {"dimension": 0},
        {"embed_fn": "not callable"},
        {"embed_in_thread": "yes"},
    ],
    ids=["threshold", "negative-size", "zero-ttl", "zero-dimension", "embed-fn", "in-thread"],
)
async def test_bad_config_fails_at_construction(make_cache: Factory, kwargs: Any) -> None:
    with pytest.raises((InvalidInputError, InvalidInputTypeError)):
        make_cache(**kwargs)


async def test_concurrent_calls_stay_consistent(make_cache: Factory) -> None:
    cache = make_cache(HashingEmbedder(64), similarity_threshold=1.0, embed_in_thread=True)
    questions = [ask(f"question {i}") for i in range(30)]

    async def put_then_get(query: dict[str, Any]) -> Any:
        await cache.put(query, query["messages"][-1]["content"])
        return await cache.get(query)

    got = await asyncio.gather(*(put_then_get(q) for q in questions))
    assert got == [f"question {i}" for i in range(30)]
    assert (await cache.stats()).size == 30


async def test_large_scopes_are_searched_in_a_worker_thread(
    make_cache: Factory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    offloaded: list[str] = []
    run_in_thread = vectors.run_in_thread

    async def spy(func: Callable[..., Any], *args: Any) -> Any:
        offloaded.append(getattr(func, "__name__", ""))
        return await run_in_thread(func, *args)

    monkeypatch.setattr(vectors, "OFFLOAD_MIN_FLOATS", 1)  # every scope counts as large
    monkeypatch.setattr(vectors, "run_in_thread", spy)
    writer = make_cache(similarity_threshold=0.75)
    await writer.put(ask("same vector as base"), "expired", ttl_seconds=0.2)
    await writer.put(ask("sim 0.6"), "far")
    await writer.put(ask("sim 0.8"), "middle")
    await backend.wait(0.35)
    reader = writer if backend.is_memory else make_cache(similarity_threshold=0.75)
    assert await reader.get(ask("capital of france")) == "middle"
    assert await reader.get(ask("capital of france"), similarity_threshold=0.9) is None
    assert len(offloaded) == 2  # each lookup searched its scope once, in a worker thread


async def test_repr_is_informative(cache: AsyncSemanticCache) -> None:
    await cache.put(ask("capital of france"), "Paris")
    await cache.get(ask("sim 0.96"))
    text = repr(cache)
    assert type(cache).__name__ in text
    assert "hits=1" in text
    assert "similarity_threshold=0.9" in text
    assert "TableEmbedder" in text


async def test_closed_cache_refuses_calls(make_cache: Factory) -> None:
    cache = make_cache()
    async with cache:
        await cache.put(ask("capital of france"), "Paris")
    with pytest.raises(ClosedResourceError):
        await cache.get(ask("capital of france"))
    with pytest.raises(ClosedResourceError):
        await cache.put(ask("capital of france"), "Paris")


async def test_a_bounded_put_drops_expired_entries_of_any_scope_before_evicting_a_live_one(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache(similarity_threshold=0.9, max_size=2)
    await cache.put(ask("capital of france", model="a"), "kept")
    await cache.put(ask("other axis", model="b"), "gone", ttl_seconds=0.2)
    await backend.wait(0.35)
    # the expired entry, of another scope, holds a slot: it goes, not the live one
    await cache.put(ask("sim 0", model="c"), "kept too")
    assert await cache.get(ask("capital of france", model="a")) == "kept"
    assert await cache.get(ask("sim 0", model="c")) == "kept too"
    stats = await cache.stats()
    assert (stats.size, stats.evictions) == (2, 0)


async def test_a_bounded_cache_counts_only_live_entries(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache(similarity_threshold=0.9, max_size=10)
    await cache.put(ask("capital of france"), "long-lived")
    await cache.put(ask("other axis", model="b"), "short-lived", ttl_seconds=0.2)
    await backend.wait(0.35)
    assert (await cache.stats()).size == 1


# Promotions: a semantic hit copied into an exact cache lives and dies with its entry.


@pytest.fixture
def make_exact(backend: Backend) -> Callable[..., Any]:
    """An exact cache in the same place as the semantic caches of ``make_cache``."""

    def make(**kwargs: Any) -> Any:
        if backend.redis is None:
            return MemoryExactCache(clock=backend.clock, **kwargs)
        return RedisExactCache(
            client=backend.redis.client, key_prefix=f"{backend.redis.prefix}:exact", **kwargs
        )

    return make


async def test_lookup_tells_the_entry_and_its_remaining_lifetime(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache(similarity_threshold=0.9)
    assert isinstance(cache, PromotingSemanticCache)
    assert await cache.lookup(ask("sim 0.96")) is None
    await cache.put(ask("capital of france"), "Paris", ttl_seconds=10)
    await cache.put(ask("other axis"), "forever")
    await backend.wait(0.25)
    for text in ("sim 0.96", "capital of france"):  # a search, then an exact repeat
        hit = await cache.lookup(ask(text))
        assert hit is not None
        assert hit.value == "Paris"
        assert hit.ttl_seconds is not None
        assert 9.0 < hit.ttl_seconds <= 9.75 + 0.01
    lasting = await cache.lookup(ask("near other axis"))
    assert lasting is not None
    assert (lasting.value, lasting.ttl_seconds) == ("forever", None)
    assert lasting.entry != hit.entry
    assert (await cache.stats()).hits == 3


async def test_a_promotion_expires_with_its_entry(
    make_cache: Factory, make_exact: Callable[..., Any], backend: Backend
) -> None:
    cache = make_cache(similarity_threshold=0.9)
    exact = make_exact(ttl_seconds=100)
    await cache.put(ask("capital of france"), "Paris", ttl_seconds=0.3)
    hit = await cache.lookup(ask("sim 0.96"))
    assert hit is not None
    digest = exact.signature(ask("sim 0.96"))
    assert await cache.promote(hit, exact, digest) is True
    assert await exact.get(ask("sim 0.96")) == "Paris"
    await backend.wait(0.45)
    assert await exact.get(ask("sim 0.96")) is None
    # an expired hit is not promoted at all
    await backend.wait(0.1)
    assert await cache.promote(hit, exact, digest) is False
    assert await exact.get(ask("sim 0.96")) is None
    await exact.aclose()


async def test_a_promotion_keeps_a_shorter_lifetime_asked_for(
    make_cache: Factory, make_exact: Callable[..., Any], backend: Backend
) -> None:
    cache = make_cache(similarity_threshold=0.9)
    exact = make_exact(ttl_seconds=0.2)
    await cache.put(ask("capital of france"), "Paris")
    hit = await cache.lookup(ask("sim 0.96"))
    assert hit is not None
    assert await cache.promote(hit, exact, exact.signature(ask("sim 0.96"))) is True
    await backend.wait(0.35)
    assert await exact.get(ask("sim 0.96")) is None  # the exact cache's default lifetime
    assert await cache.get(ask("capital of france")) == "Paris"
    await exact.aclose()


@pytest.mark.parametrize("removal", ["invalidate", "replace", "clear", "evict"])
async def test_a_promotion_dies_with_its_entry(
    make_cache: Factory, make_exact: Callable[..., Any], removal: str
) -> None:
    cache = make_cache(similarity_threshold=0.9, max_size=2)
    exact = make_exact(max_size=10)
    await cache.put(ask("capital of france"), "Paris")
    await cache.put(ask("other axis"), "elsewhere")
    hit = await cache.lookup(ask("sim 0.96"))
    assert hit is not None
    assert await cache.promote(hit, exact, exact.signature(ask("sim 0.96"))) is True
    assert await exact.get(ask("sim 0.96")) == "Paris"
    if removal == "invalidate":
        assert await cache.invalidate(ask("capital of france")) is True
    elif removal == "replace":
        await cache.put(ask("capital of france"), "Paris, France")
    elif removal == "clear":
        await cache.clear()
    else:
        await cache.get(ask("near other axis"))  # "capital of france" is now the LRU
        await cache.put(ask("sim 0"), "third")
    assert await exact.get(ask("sim 0.96")) is None
    assert (await exact.stats()).size == 0
    await exact.aclose()


async def test_promotion_into_an_exact_cache_elsewhere_stores_nothing(
    make_cache: Factory, backend: Backend
) -> None:
    cache = make_cache(similarity_threshold=0.9)
    await cache.put(ask("capital of france"), "Paris")
    hit = await cache.lookup(ask("sim 0.96"))
    assert hit is not None
    elsewhere: list[Any] = [None, "not a cache"]
    if backend.redis is None:
        elsewhere.append(
            RedisExactCache(client=FakeAsyncRedis(server=FakeServer()), key_prefix="x")
        )
    else:
        elsewhere.append(MemoryExactCache())
        other_server = FakeAsyncRedis(server=FakeServer())
        elsewhere.append(RedisExactCache(client=other_server, key_prefix="x"))
    for exact in elsewhere:
        assert await cache.promote(hit, exact, "d" * 64) is False
        if isinstance(exact, (MemoryExactCache, RedisExactCache)):
            assert (await exact.stats()).size == 0
            await exact.aclose()


# Redis only: several processes, and what other writers may leave under our keys.


@pytest.fixture
def redis_backend(backend: Backend) -> Backend:
    if backend.redis is None:
        pytest.skip("Redis backends only")
    return backend


async def test_instances_see_each_others_puts_invalidations_and_clears(
    make_cache: Factory, redis_backend: Backend
) -> None:
    writer = make_cache(similarity_threshold=0.9)
    reader = make_cache(similarity_threshold=0.9)  # another process: its own mirror
    assert await reader.get(ask("sim 0.96")) is None
    await writer.put(ask("capital of france"), "Paris")
    assert await reader.get(ask("sim 0.96")) == "Paris"
    await writer.put(ask("capital of france"), "Paris, France")
    assert await reader.get(ask("sim 0.96")) == "Paris, France"
    assert await writer.invalidate(ask("capital of france")) is True
    assert await reader.get(ask("sim 0.96")) is None
    await writer.put(ask("sim 0.8"), "farther")
    assert await reader.get(ask("sim 0.96"), similarity_threshold=0.5) == "farther"
    await writer.clear()
    assert await reader.get(ask("sim 0.96"), similarity_threshold=0.5) is None
    # a scope emptied and refilled at once must not be mistaken for the old one
    await writer.put(ask("capital of france"), "after clear")
    assert await reader.get(ask("sim 0.96")) == "after clear"
    await reader.invalidate(ask("capital of france"))
    await reader.put(ask("other axis"), "from the reader")
    assert await writer.get(ask("sim 0.96")) is None
    assert await writer.get(ask("other axis")) == "from the reader"


async def test_mirrors_resync_after_the_log_is_trimmed_or_deleted(
    make_cache: Factory, redis_backend: Backend
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    writer = make_cache(similarity_threshold=0.9)
    reader = make_cache(similarity_threshold=0.9)
    assert isinstance(writer, RedisSemanticCache)
    assert isinstance(reader, RedisSemanticCache)
    writer._log_floor = 1  # keep almost no history, as a long-idle reader would find it
    await writer.put(ask("sim 0.6"), "far")
    assert await reader.get(ask("capital of france")) is None
    snapshots = reader._mirrors.snapshots
    for i in range(150):  # replacements: the scope stays small while its log grows
        await writer.put(ask("capital of france"), f"v{i}")
    await writer.put(ask("sim 0.96"), "near")
    assert await reader.get(ask("same vector as base")) == "v149"
    assert reader._mirrors.snapshots == snapshots + 1
    assert await reader.get(ask("sim 0.8")) == "far"  # 0.96 to "sim 0.6", 0.94 to "sim 0.96"
    assert await writer.invalidate(ask("capital of france")) is True
    log_keys = [k async for k in client.scan_iter(match=f"{redis_backend.redis.prefix}:s:*:log")]
    assert len(log_keys) == 1
    await client.unlink(*log_keys)
    assert await reader.get(ask("same vector as base")) == "near"
    assert reader._mirrors.snapshots == snapshots + 2
    # the log was restarted by that snapshot: later changes arrive incrementally again
    await writer.put(ask("capital of france"), "back")
    assert await reader.get(ask("same vector as base")) == "back"
    assert reader._mirrors.snapshots == snapshots + 2


async def test_large_scopes_are_mirrored_by_scanning_and_replaying_the_log(
    make_cache: Factory, redis_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    writer = make_cache(similarity_threshold=0.9)
    reader = make_cache(similarity_threshold=0.9)
    assert isinstance(reader, RedisSemanticCache)
    reader._mirrors.inline_snapshot_bytes = 0  # every scope counts as too large for one reply
    for text in ("sim 0.6", "sim 0.8", "other axis"):
        await writer.put(ask(text), text)
    scan = client.hscan_iter
    scanned: list[bytes] = []

    async def scan_while_another_process_writes(*args: Any, **kwargs: Any) -> Any:
        async for field, blob in scan(*args, **kwargs):
            if not scanned:  # between two steps of the scan
                await writer.put(ask("sim 0.96"), "written during the scan")
                await writer.invalidate(ask("sim 0.8"))
            scanned.append(field)
            yield field, blob

    offloaded: list[str] = []
    run_in_thread = vectors.run_in_thread

    async def spy(func: Callable[..., Any], *args: Any) -> Any:
        offloaded.append(getattr(func, "__name__", ""))
        return await run_in_thread(func, *args)

    monkeypatch.setattr(vectors, "run_in_thread", spy)
    monkeypatch.setattr(client, "hscan_iter", scan_while_another_process_writes)
    assert await reader.get(ask("capital of france")) == "written during the scan"
    assert scanned
    assert offloaded == ["_Snapshot"]  # a large snapshot is parsed off the loop
    assert reader._mirrors.snapshots == 1
    assert await reader.get(ask("capital of france"), similarity_threshold=0.5) == (
        "written during the scan"
    )
    await writer.invalidate(ask("sim 0.96"))
    assert await reader.get(ask("capital of france"), similarity_threshold=0.5) == "sim 0.6"
    assert reader._mirrors.snapshots == 1  # later changes arrived incrementally
    (index,) = reader._mirrors.indexes()
    assert len(index) == 2  # "sim 0.6" and "other axis": nothing stale kept


async def test_a_log_restarted_in_the_same_millisecond_is_not_mistaken_for_the_old(
    make_cache: Factory, redis_backend: Backend
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    writer = make_cache(similarity_threshold=0.9)
    reader = make_cache(similarity_threshold=0.9)
    await writer.put(ask("capital of france"), "old")
    assert await reader.get(ask("sim 0.96")) == "old"
    (log_key,) = await _scope_keys(redis_backend, "log")
    [(cursor_id, _)] = await client.xrange(log_key)
    await writer.invalidate(ask("capital of france"))  # the scope empties: its log goes
    await writer.put(ask("other axis"), "new")
    # rewrite the new log as if it had restarted within the same millisecond:
    # its first entry then carries the very id the reader's cursor points at
    [(_, fields)] = await client.xrange(log_key)
    await client.unlink(log_key)
    await client.xadd(log_key, fields, id=cursor_id)
    assert await reader.get(ask("near other axis")) == "new"
    assert await reader.get(ask("sim 0.96")) is None


async def test_dimension_is_shared_by_every_instance(
    make_cache: Factory, redis_backend: Backend
) -> None:
    first = make_cache(similarity_threshold=0.9)
    await first.put(ask("capital of france"), "Paris")
    other = make_cache(TableEmbedder({"three": [1.0, 0.0, 0.0]}), similarity_threshold=0.9)
    with pytest.raises(InvalidInputError, match=r"dimension 3.*dimension 4"):
        await other.put(ask("three"), "x")
    with pytest.raises(InvalidInputError, match=r"dimension 3.*dimension 4"):
        await other.get(ask("three"))
    assert await first.get(ask("sim 0.96")) == "Paris"
    assert (await first.stats()).size == 1


async def test_a_get_writes_nothing(make_cache: Factory, redis_backend: Backend) -> None:
    assert redis_backend.redis is not None
    cache = make_cache(similarity_threshold=0.9, max_size=10)
    for text in ("capital of france", "sim 0.8", "other axis"):
        assert await cache.get(ask(text)) is None
    pattern = f"{redis_backend.redis.prefix}*"
    assert [k async for k in redis_backend.redis.client.scan_iter(match=pattern)] == []
    assert "mirrored_scopes=0" in repr(cache)


async def _scope_keys(backend: Backend, suffix: str) -> list[bytes]:
    assert backend.redis is not None
    pattern = f"{backend.redis.prefix}:s:*:{suffix}"
    return [k async for k in backend.redis.client.scan_iter(match=pattern)]


async def test_corrupt_vectors_are_counted_misses(
    make_cache: Factory, redis_backend: Backend
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    writer = make_cache(similarity_threshold=0.9)
    await writer.put(ask("other axis"), "valid")
    (vectors_key,) = await _scope_keys(redis_backend, "vec")
    bad_digest, nan_digest, junk = "a" * 64, "b" * 64, "not a digest"
    await client.hset(vectors_key, bad_digest, b"\x00\x01\x02")  # wrong length
    nan = np.array([np.nan, 1, 0, 0], dtype="<f4").tobytes()
    await client.hset(vectors_key, nan_digest, nan)
    await client.hset(vectors_key, junk, np.array(BASE, dtype="<f4").tobytes())
    reader = make_cache(similarity_threshold=0.9)  # a fresh mirror: a snapshot
    assert await reader.get(ask("capital of france")) is None
    assert (await reader.stats()).corrupt_entries == 3
    assert await reader.get(ask("other axis")) == "valid"


async def test_corrupt_log_entries_are_skipped_and_counted(
    make_cache: Factory, redis_backend: Backend
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    writer = make_cache(similarity_threshold=0.9)
    reader = make_cache(similarity_threshold=0.9)
    await writer.put(ask("other axis"), "valid")
    assert await reader.get(ask("capital of france")) is None  # mirror synced
    (log_key,) = await _scope_keys(redis_backend, "log")
    await client.xadd(log_key, {"u": "x", "o": "?"})
    await client.xadd(log_key, {"u": "x", "o": "a", "d": "c" * 64, "v": b"short", "x": "0"})
    await client.xadd(log_key, {"u": "x", "o": "a", "d": "nope", "v": b"", "x": "0"})
    await client.xadd(log_key, {"garbage": "only"})
    await writer.put(ask("sim 0.96"), "near")
    assert await reader.get(ask("capital of france")) == "near"
    assert (await reader.stats()).corrupt_entries == 4


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xff\xfe garbage", b"acl\x01j{not json", b"acl\x01mos.system\n{}"],
    ids=["empty", "binary", "bad-json", "unknown-model"],
)
async def test_corrupt_values_are_counted_misses(
    make_cache: Factory, redis_backend: Backend, garbage: bytes
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    cache = make_cache(similarity_threshold=0.9)
    await cache.put(ask("capital of france"), "Paris")
    (value_key,) = await _scope_keys(redis_backend, "v:*")
    await client.set(value_key, garbage)
    assert await cache.get(ask("sim 0.96")) is None  # semantic path
    assert await cache.get(ask("capital of france")) is None  # exact path
    stats = await cache.stats()
    assert (stats.corrupt_entries, stats.misses) == (2, 2)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("sim 0.96")) == "Paris"


async def test_keys_of_another_type_are_counted_misses_and_healed_by_a_put(
    make_cache: Factory, redis_backend: Backend
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    cache = make_cache(similarity_threshold=0.9, max_size=5)
    await cache.put(ask("capital of france"), "Paris")
    (value_key,) = await _scope_keys(redis_backend, "v:*")
    (vectors_key,) = await _scope_keys(redis_backend, "vec")
    await client.unlink(value_key)
    await client.rpush(value_key, b"not a string")
    assert await cache.get(ask("sim 0.96")) is None
    assert await cache.get(ask("capital of france")) is None
    await client.unlink(vectors_key)
    await client.set(vectors_key, b"not a hash")
    await client.set(f"{redis_backend.redis.prefix}:lru", b"not a zset")
    await client.set(f"{redis_backend.redis.prefix}:dim", b"garbage")
    assert await cache.get(ask("sim 0.96")) is None
    await cache.put(ask("capital of france"), "healed")
    assert await cache.get(ask("sim 0.96")) == "healed"
    stats = await cache.stats()
    assert (stats.corrupt_entries, stats.size) == (3, 1)


async def test_clear_leaves_keys_outside_its_own_alone(
    make_cache: Factory, redis_backend: Backend
) -> None:
    assert redis_backend.redis is not None
    client, prefix = redis_backend.redis.client, redis_backend.redis.prefix
    mine = make_cache(similarity_threshold=0.9, max_size=10)
    sibling = RedisSemanticCache(
        TableEmbedder(), client=client, key_prefix=f"{prefix}x", similarity_threshold=0.9
    )
    nested = RedisSemanticCache(
        TableEmbedder(), client=client, key_prefix=f"{prefix}:other", similarity_threshold=0.9
    )
    for cache in (mine, sibling, nested):
        await cache.put(ask("capital of france"), type(cache).__name__ + str(id(cache)))
    await client.set(f"{prefix}-unrelated", b"keep")
    await client.set(f"{prefix}:not-ours", b"keep")
    await mine.clear()
    assert await mine.get(ask("sim 0.96")) is None
    assert await sibling.get(ask("sim 0.96")) is not None
    assert await nested.get(ask("sim 0.96")) is not None
    assert await client.get(f"{prefix}-unrelated") == b"keep"
    assert await client.get(f"{prefix}:not-ours") == b"keep"
    left = {k async for k in client.scan_iter(match=f"{prefix}:*")}
    assert left
    assert all(
        k.startswith(f"{prefix}:other:".encode()) or k == f"{prefix}:not-ours".encode()
        for k in left
    )
    for other in (sibling, nested):
        await other.clear()
        await other.aclose()
    await client.unlink(f"{prefix}-unrelated", f"{prefix}:not-ours")


async def test_scope_keys_expire_with_their_longest_lived_entry(
    make_cache: Factory, redis_backend: Backend
) -> None:
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    cache = make_cache(similarity_threshold=0.9, ttl_seconds=5)
    await cache.put(ask("capital of france"), "Paris")
    await cache.put(ask("sim 0.8"), "longer", ttl_seconds=50)
    (vectors_key,) = await _scope_keys(redis_backend, "vec")
    assert 5_000 < await client.pttl(vectors_key) <= 50_000
    await cache.put(ask("sim 0.6"), "default ttl", ttl_seconds=None)
    assert 5_000 < await client.pttl(vectors_key) <= 50_000
    keeper = make_cache(similarity_threshold=0.9)  # no default TTL: entries never expire
    await keeper.put(ask("other axis"), "never expires")
    for suffix in ("vec", "log"):
        (key,) = await _scope_keys(redis_backend, suffix)
        assert await client.pttl(key) == -1


async def test_redis_constructor_requires_exactly_one_connection(redis_backend: Backend) -> None:
    assert redis_backend.redis is not None
    with pytest.raises(InvalidInputError, match="exactly one"):
        RedisSemanticCache(TableEmbedder())
    with pytest.raises(InvalidInputError, match="glob"):
        RedisSemanticCache(TableEmbedder(), client=redis_backend.redis.client, key_prefix="a*")


async def test_clear_leaves_other_objects_keys_under_the_scope_prefix_alone(
    make_cache: Factory, redis_backend: Backend
) -> None:
    """``{prefix}:s:<64 hex>:*`` is ours only for the suffixes the cache writes."""
    assert redis_backend.redis is not None
    client, prefix = redis_backend.redis.client, redis_backend.redis.prefix
    cache = make_cache(similarity_threshold=0.9, max_size=10)
    await cache.put(ask("capital of france"), "Paris")
    foreign = f"{prefix}:s:{'a' * 64}:{'b' * 64}"  # e.g. an exact cache nested there
    await client.set(foreign, b"keep")
    assert (await cache.stats()).size == 1
    await cache.clear()
    assert await client.get(foreign) == b"keep"
    assert [k async for k in client.scan_iter(match=f"{prefix}:*")] == [foreign.encode()]
    await client.unlink(foreign)


async def test_a_promotion_dies_when_another_process_invalidates_its_entry(
    make_cache: Factory, make_exact: Callable[..., Any], redis_backend: Backend
) -> None:
    promoter, other = make_cache(similarity_threshold=0.9), make_cache(similarity_threshold=0.9)
    exact = make_exact(max_size=10, ttl_seconds=60)
    await promoter.put(ask("capital of france"), "Paris", ttl_seconds=30)
    hit = await promoter.lookup(ask("sim 0.96"))
    assert hit is not None
    digest = exact.signature(ask("sim 0.96"))
    assert await promoter.promote(hit, exact, digest) is True
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    # trimmed to what the entry had left, in the key and in the exact cache's expiry index
    promoted_key = f"{redis_backend.redis.prefix}:exact:{digest}"
    assert 0 < await client.pttl(promoted_key) <= 30_000
    assert await client.zscore(f"{redis_backend.redis.prefix}:exact:lru:exp", promoted_key)
    assert await other.invalidate(ask("capital of france")) is True
    assert await exact.get(ask("sim 0.96")) is None
    assert (await exact.stats()).size == 0
    assert [k async for k in client.scan_iter(match=f"{redis_backend.redis.prefix}:s:*:pr:*")] == []
    await exact.aclose()


# --- verify=: candidates checked before they are served ------------------------------


class Judge:
    """A verifier that refuses the candidate texts it is told to, and records its calls."""

    def __init__(self, refuse: set[str] | None = None, raise_on: set[str] | None = None) -> None:
        self.refuse = refuse or set()
        self.raise_on = raise_on or set()
        self.calls: list[tuple[str, str, float]] = []

    def __call__(self, query_text: str, candidate_text: str, similarity: float) -> Any:
        self.calls.append((query_text, candidate_text, round(similarity, 4)))
        if candidate_text in self.raise_on:
            raise RuntimeError(f"cannot judge {candidate_text}")
        return candidate_text not in self.refuse


class AsyncJudge(Judge):
    async def __call__(self, query_text: str, candidate_text: str, similarity: float) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        return super().__call__(query_text, candidate_text, similarity)


async def _three_candidates(cache: AsyncSemanticCache) -> None:
    await cache.put(ask("sim 0.6"), "far")
    await cache.put(ask("sim 0.96"), "near")
    await cache.put(ask("sim 0.8"), "middle")


@pytest.mark.parametrize("judge_type", [Judge, AsyncJudge], ids=["sync", "async"])
async def test_verify_tries_candidates_best_first_and_serves_the_first_accepted(
    make_cache: Factory, judge_type: type[Judge]
) -> None:
    judge = judge_type(refuse={"sim 0.96"})
    cache = make_cache(similarity_threshold=0.5, verify=judge)
    await _three_candidates(cache)
    assert await cache.get(ask("capital of france")) == "middle"
    assert judge.calls == [
        ("capital of france", "sim 0.96", 0.96),
        ("capital of france", "sim 0.8", 0.8),
    ]
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.verifier_refusals, stats.verifier_errors) == (
        1,
        0,
        1,
        0,
    )


async def test_verify_is_asked_about_at_most_max_verify_candidates(make_cache: Factory) -> None:
    judge = Judge(refuse={"sim 0.96", "sim 0.8", "sim 0.6"})
    cache = make_cache(similarity_threshold=0.5, verify=judge, max_verify_candidates=2)
    await _three_candidates(cache)
    assert await cache.get(ask("capital of france")) is None
    assert [call[1] for call in judge.calls] == ["sim 0.96", "sim 0.8"]
    judge.refuse = {"sim 0.96", "sim 0.8"}
    # "sim 0.6" would be accepted, but it is beyond the bound
    assert await cache.get(ask("capital of france")) is None
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.verifier_refusals) == (0, 2, 4)


async def test_verify_is_never_asked_about_candidates_below_the_threshold(
    make_cache: Factory,
) -> None:
    judge = Judge(refuse={"sim 0.96"})
    cache = make_cache(similarity_threshold=0.7, verify=judge)
    await _three_candidates(cache)
    assert await cache.get(ask("capital of france")) == "middle"
    assert await cache.get(ask("capital of france"), similarity_threshold=0.9) is None
    assert [call[1] for call in judge.calls] == ["sim 0.96", "sim 0.8", "sim 0.96"]


async def test_an_exact_repeat_is_served_without_asking_verify(make_cache: Factory) -> None:
    judge = Judge(refuse={"capital of france"})
    cache = make_cache(similarity_threshold=0.9, verify=judge)
    await cache.put(ask("capital of france"), "Paris")
    assert await cache.get(ask("capital of france")) == "Paris"
    assert judge.calls == []
    # the same text in another query (a paraphrase's vector) is asked about
    assert await cache.get(ask("same vector as base")) is None
    assert judge.calls == [("same vector as base", "capital of france", 1.0)]


async def test_a_verifier_that_raises_refuses_and_never_fails_the_lookup(
    make_cache: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    judge = Judge(raise_on={"sim 0.96", "sim 0.8"})
    cache = make_cache(similarity_threshold=0.5, verify=judge)
    await _three_candidates(cache)
    with caplog.at_level("WARNING", logger="aiocache_llm.semantic"):
        assert await cache.get(ask("capital of france")) == "far"
        assert await cache.get(ask("capital of france")) == "far"
    stats = await cache.stats()
    assert (stats.hits, stats.verifier_refusals, stats.verifier_errors) == (2, 4, 4)
    warnings = [r for r in caplog.records if r.name == "aiocache_llm.semantic"]
    assert len(warnings) == 1  # logged once per cache
    assert "RuntimeError" in warnings[0].getMessage()
    assert "sim 0.96" not in warnings[0].getMessage()  # never the texts


@pytest.mark.parametrize("verdict", [None, 1, "yes"], ids=["none", "int", "str"])
async def test_a_verdict_that_is_not_a_bool_counts_as_an_error(
    make_cache: Factory, verdict: Any
) -> None:
    cache = make_cache(similarity_threshold=0.5, verify=lambda q, c, s: verdict)
    await cache.put(ask("sim 0.96"), "near")
    assert await cache.get(ask("capital of france")) is None
    stats = await cache.stats()
    assert (stats.misses, stats.verifier_refusals, stats.verifier_errors) == (1, 1, 1)


async def test_a_numpy_bool_verdict_is_a_verdict(make_cache: Factory) -> None:
    cache = make_cache(similarity_threshold=0.5, verify=lambda q, c, s: np.bool_(s > 0.9))
    await cache.put(ask("sim 0.96"), "near")
    assert await cache.get(ask("capital of france")) == "near"
    assert (await cache.stats()).verifier_errors == 0


async def test_verify_sees_the_text_another_instance_stored(
    make_cache: Factory, backend: Backend
) -> None:
    text = "ünïcödé question 🚀 \u2028 with\nnewlines"
    table = {**VECTORS, text: VECTORS["sim 0.96"]}
    judge = AsyncJudge()
    writer = make_cache(TableEmbedder(table), similarity_threshold=0.9, verify=judge)
    reader = (
        writer
        if backend.is_memory
        else make_cache(TableEmbedder(table), similarity_threshold=0.9, verify=judge)
    )
    await writer.put(ask(text), "answer")
    assert await reader.get(ask("capital of france")) == "answer"
    assert judge.calls == [("capital of france", text, 0.96)]


async def test_verify_applies_per_scope(make_cache: Factory) -> None:
    judge = Judge()
    cache = make_cache(similarity_threshold=0.5, verify=judge)
    await cache.put(ask("sim 0.96", model="other"), "other model")
    await cache.put(ask("sim 0.6"), "this model")
    assert await cache.get(ask("capital of france")) == "this model"
    assert [call[1] for call in judge.calls] == ["sim 0.6"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"verify": "not callable"},
        {"verify": Judge(), "max_verify_candidates": 0},
        {"verify": Judge(), "max_verify_candidates": 65},
        {"verify": Judge(), "max_verify_candidates": True},
        {"verify": Judge(), "max_verify_candidates": 2.0},
    ],
    ids=["verify", "zero", "too-many", "bool", "float"],
)
async def test_bad_verify_config_fails_at_construction(make_cache: Factory, kwargs: Any) -> None:
    with pytest.raises((InvalidInputError, InvalidInputTypeError)):
        make_cache(**kwargs)


async def test_verify_appears_in_the_repr(make_cache: Factory) -> None:
    cache = make_cache(verify=Judge(), max_verify_candidates=3)
    assert "verify=Judge, max_candidates=3" in repr(cache)


async def test_probe_reports_what_a_lookup_would_serve_without_serving_it(
    make_cache: Factory,
) -> None:
    judge = Judge(refuse={"sim 0.96"})
    cache = make_cache(similarity_threshold=0.7, verify=judge)
    assert await cache.probe(ask("capital of france")) == (  # type: ignore[attr-defined]
        "capital of france",
        None,
        None,
        0.7,
        None,
        False,
    )
    await _three_candidates(cache)
    probe = await cache.probe(ask("capital of france"))  # type: ignore[attr-defined]
    assert probe.candidate_text == "sim 0.8"
    assert probe.similarity == pytest.approx(0.8, abs=1e-5)
    assert (probe.verified, probe.would_hit) == (True, True)
    # below the threshold: still measured (for calibration), not a would-be hit
    probe = await cache.probe(ask("capital of france"), similarity_threshold=0.9)  # type: ignore[attr-defined]
    assert (probe.candidate_text, probe.verified, probe.would_hit) == ("sim 0.8", True, False)
    judge.refuse = {"sim 0.96", "sim 0.8", "sim 0.6"}
    probe = await cache.probe(ask("capital of france"))  # type: ignore[attr-defined]
    assert (probe.candidate_text, probe.verified, probe.would_hit) == ("sim 0.96", False, False)
    exact = await cache.probe(ask("sim 0.6"))  # type: ignore[attr-defined]
    assert (exact.candidate_text, exact.similarity, exact.would_hit) == ("sim 0.6", 1.0, True)
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.verifier_refusals) == (0, 0, 0)  # nothing counted


async def test_probe_without_a_verifier_reports_the_best_candidate(make_cache: Factory) -> None:
    cache = make_cache(similarity_threshold=0.9)
    await _three_candidates(cache)
    probe = await cache.probe(ask("capital of france"))  # type: ignore[attr-defined]
    assert (probe.candidate_text, probe.verified, probe.would_hit) == ("sim 0.96", None, True)
    no_text = anthropic(tool_result("18 C"), messages=TOOL_TURN)
    assert await cache.probe(no_text) is None  # type: ignore[attr-defined]


async def test_the_texts_go_with_their_entries(make_cache: Factory, redis_backend: Backend) -> None:
    cache = make_cache(similarity_threshold=0.5, verify=Judge())
    await cache.put(ask("sim 0.96"), "near")
    await cache.put(ask("sim 0.8"), "middle")
    (texts_key,) = await _scope_keys(redis_backend, "txt")
    assert redis_backend.redis is not None
    client = redis_backend.redis.client
    assert sorted(await client.hvals(texts_key)) == [b"sim 0.8", b"sim 0.96"]
    assert await cache.invalidate(ask("sim 0.96")) is True
    assert await client.hvals(texts_key) == [b"sim 0.8"]
    await cache.clear()
    assert await client.exists(texts_key) == 0


async def test_an_entry_without_a_stored_text_is_refused_unasked(
    make_cache: Factory, redis_backend: Backend
) -> None:
    """Entries written by a version that stored no text are never served through verify."""
    judge = Judge()
    cache = make_cache(similarity_threshold=0.5, verify=judge)
    await cache.put(ask("sim 0.96"), "near")
    await cache.put(ask("sim 0.8"), "middle")
    (texts_key,) = await _scope_keys(redis_backend, "txt")
    assert redis_backend.redis is not None
    await redis_backend.redis.client.hdel(
        texts_key, QueryKeys(None).semantic_parts(ask("sim 0.96"))[2]
    )
    assert await cache.get(ask("capital of france")) == "middle"
    assert [call[1] for call in judge.calls] == ["sim 0.8"]
    assert (await cache.stats()).verifier_refusals == 1


async def test_a_verified_lookup_fetches_the_candidates_texts_in_one_call(
    make_cache: Factory, redis_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The texts of every candidate come with the best one's value: no call per candidate."""
    judge = Judge(refuse={"sim 0.96"})
    cache = make_cache(similarity_threshold=0.5, verify=judge)
    await _three_candidates(cache)
    calls: list[str] = []
    assert isinstance(cache, RedisSemanticCache)
    for name in ("_fetch", "_fetch_texts"):
        script = getattr(cache, name)

        async def counted(*args: Any, _script: Any = script, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return await _script(*args, **kw)

        monkeypatch.setattr(cache, name, counted)
    judge.refuse = set()
    assert await cache.get(ask("capital of france")) == "near"
    assert calls == ["_fetch_texts"]  # the best accepted: its value came with the texts
    calls.clear()
    judge.refuse = {"sim 0.96", "sim 0.8"}
    assert await cache.get(ask("capital of france")) == "far"
    assert calls == ["_fetch_texts", "_fetch"]  # one more call for the third candidate
    assert [call[1] for call in judge.calls[-3:]] == ["sim 0.96", "sim 0.8", "sim 0.6"]


# --- Redis Cluster: the whole cache in its hash tag's slot ---------------------------


@pytest.fixture
def cluster_backend(backend: Backend) -> Backend:
    if backend.kind != "cluster":
        pytest.skip("Redis Cluster only")
    return backend


async def test_a_cluster_needs_a_hash_tagged_prefix(cluster_backend: Backend) -> None:
    assert cluster_backend.redis is not None
    untagged = cluster_backend.redis.prefix.strip("{}")
    with pytest.raises(InvalidInputError, match="hash tag"):
        RedisSemanticCache(
            TableEmbedder(), client=cluster_backend.redis.client, key_prefix=untagged
        )
    with pytest.raises(InvalidInputError, match="hash tag"):
        RedisSemanticCache(
            TableEmbedder(), client=cluster_backend.redis.client, key_prefix=untagged, max_size=5
        )


async def test_on_a_cluster_every_key_of_the_cache_shares_its_tags_slot(
    make_cache: Factory, make_exact: Callable[..., Any], cluster_backend: Backend
) -> None:
    from aiocache_llm.backends.redis.cluster import key_slot_of

    assert cluster_backend.redis is not None
    client, prefix = cluster_backend.redis.client, cluster_backend.redis.prefix
    cache = make_cache(similarity_threshold=0.9, max_size=10, ttl_seconds=60)
    exact = make_exact(max_size=10)
    await cache.put(ask("capital of france"), "Paris")
    await cache.put(ask("other axis", model="another"), "elsewhere")
    hit = await cache.lookup(ask("sim 0.96"))
    assert hit is not None
    assert await cache.promote(hit, exact, exact.signature(ask("sim 0.96"))) is True
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    assert len(keys) >= 10  # two scopes' keys, values, indexes, a promotion record
    assert {key_slot_of(k) for k in keys} == {key_slot_of(prefix)}
    await cache.clear()
    assert await exact.get(ask("sim 0.96")) is None
    assert [k async for k in client.scan_iter(match=f"{prefix}:s:*")] == []
    await exact.aclose()


async def test_on_a_cluster_a_promotion_goes_only_into_the_caches_slot(
    make_cache: Factory, cluster_backend: Backend
) -> None:
    assert cluster_backend.redis is not None
    client, prefix = cluster_backend.redis.client, cluster_backend.redis.prefix
    cache = make_cache(similarity_threshold=0.9)
    assert isinstance(cache, RedisSemanticCache)
    await cache.put(ask("capital of france"), "Paris")
    hit = await cache.lookup(ask("sim 0.96"))
    assert hit is not None
    untagged = prefix.strip("{}") + ":exact"  # its entries spread over every slot
    other_tag = "{" + prefix.strip("{}") + "-other}:exact"  # another slot
    same_tag = RedisExactCache(client=client, key_prefix=f"{prefix}:exact")
    assert cache.can_promote_into(same_tag)
    for exact_prefix in (untagged, other_tag):
        exact = RedisExactCache(client=client, key_prefix=exact_prefix)
        assert not cache.can_promote_into(exact)
        assert await cache.promote(hit, exact, exact.signature(ask("sim 0.96"))) is False
        assert await exact.get(ask("sim 0.96")) is None
        await exact.clear()
        await exact.aclose()
    assert await cache.promote(hit, same_tag, same_tag.signature(ask("sim 0.96"))) is True
    assert await same_tag.get(ask("sim 0.96")) == "Paris"
    await same_tag.aclose()
