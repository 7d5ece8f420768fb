"""API keys never reach Redis (keys or values) or the logs through the integrations the
SDK-wrapper tests do not cover: the embeddings path (``OpenAIEmbedder`` behind a Redis
``CachedEmbedder``), LiteLLM (a key in the provider's defaults) and LangChain
(``ChatOpenAI`` with a key, over a Redis ``LangChainCache``). Real Redis, local servers."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from langchain_core.globals import set_llm_cache
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from aiocache_llm import CachedEmbedder, InferenceGateway, RedisExactCache
from aiocache_llm.integrations.langchain import LangChainCache
from aiocache_llm.integrations.litellm import LiteLLMProvider
from aiocache_llm.integrations.openai import OpenAIEmbedder
from tests.conftest import REDIS_URL, RedisTarget
from tests.support.openai_server import FakeOpenAIServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.redis]

QUERY: dict[str, Any] = {
    "model": "openai/gpt-test",
    "messages": [{"role": "user", "content": "what is the capital of France"}],
}


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def secret() -> str:
    return f"sk-SECRET-{uuid.uuid4().hex}"


@pytest.fixture(autouse=True)
def _quiet_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(name, raising=False)
    yield
    set_llm_cache(None)


async def redis_blob(redis: RedisTarget) -> bytes:
    """Every key under the test's prefix and every value it holds, as bytes."""
    client: Any = redis.client
    stored: list[bytes] = []
    async for key in client.scan_iter(match=f"{redis.prefix}*"):
        stored.append(key)
        kind = (await client.type(key)).decode()
        if kind == "string":
            stored.append(await client.get(key))
        elif kind == "zset":
            stored.extend(await client.zrange(key, 0, -1))
        elif kind == "hash":
            stored.extend(b"%s=%s" % item for item in (await client.hgetall(key)).items())
        else:
            stored.append(repr(await client.dump(key)).encode())
    return b"\n".join(stored)


def all_logged(caplog: pytest.LogCaptureFixture) -> str:
    return caplog.text + "\n".join(record.getMessage() for record in caplog.records)


async def test_the_embeddings_path_keeps_the_key_out_of_redis_and_logs(
    server: FakeOpenAIServer,
    real_redis: RedisTarget,
    secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    embed = OpenAIEmbedder(server.client(api_key=secret), model="text-embedding-test")
    assert secret not in embed.model_id
    async with CachedEmbedder(
        embed, client=real_redis.client, key_prefix=real_redis.prefix
    ) as cached:
        await cached("what is the capital of France")
        assert secret not in repr(cached)
    blob = await redis_blob(real_redis)
    assert len(blob) > 64 * 4  # the vector was stored
    assert secret.encode() not in blob
    assert b"capital" not in blob  # nor the text: only its sha256
    assert any(record.name.startswith("openai") for record in caplog.records)  # captured
    assert secret not in all_logged(caplog)


async def test_a_litellm_key_in_the_defaults_stays_out_of_redis_and_logs(
    server: FakeOpenAIServer,
    real_redis: RedisTarget,
    secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = LiteLLMProvider(api_base=server.base_url, api_key=secret)
    cache = RedisExactCache(
        client=real_redis.client, key_prefix=real_redis.prefix, value_types=provider.value_types
    )
    async with InferenceGateway(provider, cache) as gateway:
        first = await gateway.resolve(QUERY)
        second = await gateway.resolve(QUERY)
        assert gateway.stats().exact_hits == 1
        assert secret not in repr(gateway)
    await cache.aclose()
    assert second.choices[0].message.content == first.choices[0].message.content
    assert len(server.bodies) == 1
    blob = await redis_blob(real_redis)
    assert b"Echo: what is the capital of France" in blob  # the answer was read
    assert secret.encode() not in blob
    assert secret not in all_logged(caplog)


async def test_chat_openai_keys_stay_out_of_a_redis_langchain_cache(
    server: FakeOpenAIServer,
    real_redis: RedisTarget,
    secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sync_http = openai.DefaultHttpxClient(trust_env=False)
    async_http = openai.DefaultAsyncHttpxClient(trust_env=False)
    model = ChatOpenAI(
        model="gpt-test",
        base_url=server.base_url,
        api_key=SecretStr(secret),
        max_retries=0,
        timeout=10,
        http_client=sync_http,
        http_async_client=async_http,
    )
    try:
        async with LangChainCache(
            RedisExactCache(url=REDIS_URL, key_prefix=real_redis.prefix)
        ) as cache:
            set_llm_cache(cache)
            await model.ainvoke("what is the capital of France")
            await model.ainvoke("what is the capital of France")
    finally:
        sync_http.close()
        await async_http.aclose()
    assert server.requests == 1
    blob = await redis_blob(real_redis)
    assert b"Echo: what is the capital of France" in blob
    assert secret.encode() not in blob
    assert secret not in all_logged(caplog)
    assert os.environ.get("OPENAI_API_KEY") != secret  # it came from the argument only
