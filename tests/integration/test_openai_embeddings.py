"""The embeddings path over the real SDK and real HTTP: ``OpenAIEmbedder`` (batched
``embeddings.create``), ``CachedEmbedder`` in front of it (memory and Redis), and a
semantic cache hit through ``wrap_openai`` on vectors from the local server."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import openai
import pytest
from redis.asyncio import Redis

from aiocache_llm import (
    AiocacheLLMError,
    CachedEmbedder,
    HashingEmbedder,
    InvalidInputError,
    InvalidInputTypeError,
    MemorySemanticCache,
)
from aiocache_llm.integrations.openai import OpenAIEmbedder, wrap_openai
from tests.conftest import REDIS_URL, RedisTarget
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(60)

MODEL = "text-embedding-test"


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


def question(text: str) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}]}


async def test_the_server_answers_in_the_api_shape(server: FakeOpenAIServer) -> None:
    client = server.client()
    floats = await client.embeddings.with_raw_response.create(
        input=["alpha beta", "gamma"], model=MODEL, encoding_format="float"
    )
    body = json.loads(floats.text)
    assert set(body) == {"object", "data", "model", "usage"}
    assert (body["object"], body["model"]) == ("list", MODEL)
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}  # 15 characters // 4 + 1
    assert [set(item) for item in body["data"]] == [{"object", "index", "embedding"}] * 2
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in body["data"])
    packed = await client.embeddings.with_raw_response.create(
        input="gamma", model=MODEL, encoding_format="base64", dimensions=8
    )
    [item] = json.loads(packed.text)["data"]
    vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, HashingEmbedder(8)("gamma"))
    assert server.embedding_requests == 2
    assert server.embedding_inputs == [["alpha beta", "gamma"], ["gamma"]]
    assert server.bodies == []  # chat requests only
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(input=[""], model=MODEL)


async def test_one_loop_turn_of_calls_is_one_request(server: FakeOpenAIServer) -> None:
    embed = OpenAIEmbedder(server.client(), model=MODEL)
    vectors = await asyncio.gather(embed("alpha"), embed("beta"), embed("alpha"))
    assert server.embedding_requests == 1
    assert server.embedding_inputs == [["alpha", "beta"]]  # each distinct text once
    np.testing.assert_array_equal(vectors[0], HashingEmbedder(64)("alpha"))
    np.testing.assert_array_equal(vectors[1], HashingEmbedder(64)("beta"))
    np.testing.assert_array_equal(vectors[2], vectors[0])
    assert vectors[0] is not vectors[2]
    assert all(vector.dtype == np.float32 for vector in vectors)
    await embed("gamma")  # a later turn: a request of its own
    assert server.embedding_inputs[-1] == ["gamma"]


async def test_batches_are_cut_at_max_batch_and_dimensions_reach_the_api(
    server: FakeOpenAIServer,
) -> None:
    embed = OpenAIEmbedder(server.client(), model=MODEL, dimensions=16, max_batch=2)
    vectors = await asyncio.gather(*(embed(f"text {i}") for i in range(5)))
    assert [len(batch) for batch in server.embedding_inputs] == [2, 2, 1]
    assert all(vector.shape == (16,) for vector in vectors)
    assert embed.model_id.endswith(f":{MODEL}:16")
    assert "test" not in embed.model_id.replace(MODEL, "")  # the API key is not in it


async def test_an_api_error_reaches_every_caller_of_the_batch(server: FakeOpenAIServer) -> None:
    embed = OpenAIEmbedder(server.client(), model=MODEL)
    server.status_error = 429
    results = await asyncio.gather(embed("a"), embed("b"), return_exceptions=True)
    assert all(isinstance(result, openai.RateLimitError) for result in results)
    assert server.embedding_requests == 1


async def test_cancelled_callers_leave_the_batch_to_the_others(server: FakeOpenAIServer) -> None:
    embed = OpenAIEmbedder(server.client(), model=MODEL)
    first = asyncio.create_task(embed("alpha"))
    second = asyncio.create_task(embed("beta"))
    await asyncio.sleep(0)  # both have joined the batch; it is sent on the next turn
    first.cancel()
    np.testing.assert_array_equal(await second, HashingEmbedder(64)("beta"))
    assert first.cancelled()
    assert server.embedding_inputs == [["beta"]]  # alpha's only caller had given up
    # a batch whose every caller gave up is never sent
    gone = [asyncio.create_task(embed(text)) for text in ("x", "y")]
    await asyncio.sleep(0)
    for task in gone:
        task.cancel()
    await embed("gamma")
    assert server.embedding_inputs == [["beta"], ["gamma"]]


async def test_bad_arguments_raise_before_any_request(server: FakeOpenAIServer) -> None:
    client = server.client()
    with pytest.raises(InvalidInputTypeError):
        OpenAIEmbedder(object(), model=MODEL)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        OpenAIEmbedder(client, model="")
    with pytest.raises(InvalidInputError, match="drop encoding_format"):
        OpenAIEmbedder(client, model=MODEL, encoding_format="float")
    embed = OpenAIEmbedder(client, model=MODEL)
    with pytest.raises(InvalidInputError, match="empty"):
        await embed("")
    with pytest.raises(InvalidInputTypeError):
        await embed(3)  # type: ignore[arg-type]
    assert server.requests == 0


async def test_a_malformed_response_is_a_library_error(server: FakeOpenAIServer) -> None:
    embed = OpenAIEmbedder(server.client(), model=MODEL)
    original = server.embeddings_for

    def one_short(body: dict[str, Any]) -> dict[str, Any] | None:
        answer = original(body)
        assert answer is not None
        answer["data"] = answer["data"][:-1]
        return answer

    server.embeddings_for = one_short  # type: ignore[method-assign]
    with pytest.raises(AiocacheLLMError, match="does not hold 2 embeddings"):
        await asyncio.gather(embed("a"), embed("b"))


async def test_two_semantic_lookups_of_one_text_make_one_embeddings_request(
    server: FakeOpenAIServer,
) -> None:
    async with (
        CachedEmbedder(OpenAIEmbedder(server.client(), model=MODEL)) as embed,
        MemorySemanticCache(embed_fn=embed) as semantic,
    ):
        await semantic.put(question("how tall is the Eiffel tower"), "330 m")
        for _ in range(2):
            assert await semantic.get(question("what is the capital of France")) is None
        await semantic.put(question("what is the capital of France"), "Paris")
        assert await semantic.get(question("what is the capital of France")) == "Paris"
        assert server.embedding_inputs == [
            ["how tall is the Eiffel tower"],
            ["what is the capital of France"],
        ]
        assert embed.stats().embedded == 2


@pytest.mark.redis
async def test_a_new_embedder_on_redis_makes_no_request(
    server: FakeOpenAIServer, real_redis: RedisTarget
) -> None:
    client = server.client()
    async with CachedEmbedder(
        OpenAIEmbedder(client, model=MODEL), client=real_redis.client, key_prefix=real_redis.prefix
    ) as first:
        vector = await first("what is the capital of France")
    assert server.embedding_requests == 1
    # as another process would: its own connection, its own memory
    other = Redis.from_url(REDIS_URL)
    try:
        async with CachedEmbedder(
            OpenAIEmbedder(client, model=MODEL), client=other, key_prefix=real_redis.prefix
        ) as second:
            np.testing.assert_array_equal(await second("what is the capital of France"), vector)
            assert second.stats().redis_hits == 1
    finally:
        await other.aclose()
    assert server.embedding_requests == 1
    keys = [key async for key in real_redis.client.scan_iter(match=f"{real_redis.prefix}*")]
    assert len(keys) == 1
    assert b"api" not in keys[0].lower()
    assert await real_redis.client.get(keys[0]) == vector.astype("<f4").tobytes()


async def test_a_paraphrase_is_a_semantic_hit_through_the_wrapped_client(
    server: FakeOpenAIServer,
) -> None:
    client = server.client()
    embed = CachedEmbedder(OpenAIEmbedder(client, model=MODEL))
    semantic = MemorySemanticCache(embed_fn=embed, similarity_threshold=0.8)
    async with wrap_openai(client, semantic_cache=semantic) as wrapped:
        first = await wrapped.chat.completions.create(**question("What is the capital of France?"))
        second = await wrapped.chat.completions.create(**question("what's the capital of france"))
        again = await wrapped.chat.completions.create(**question("what's the capital of france"))
        assert server.bodies == [question("What is the capital of France?")]  # one chat request
        assert second.choices[0].message.content == first.choices[0].message.content
        assert again == second
        assert wrapped.gateway.stats().semantic_hits == 1
        # the first text: embedded once for the lookup, never again for the put
        assert (
            sum(batch.count("What is the capital of France?") for batch in server.embedding_inputs)
            == 1
        )
    await semantic.aclose()
    await embed.aclose()
