"""A FastAPI service that answers chat completions through an ``InferenceGateway``.

Concurrent identical questions cost one provider call, repeated ones none. With
``REDIS_URL`` set, the cache (and the coalescing) is shared by every worker and
every replica that uses the same Redis and ``KEY_PREFIX``; without it, everything
stays in this process.

Run (from the repository root, after ``pip install -e '.[dev]'``, which brings
fastapi, uvicorn and the ``prometheus`` extra)::

    uvicorn examples.fastapi_app:app            # or: python examples/fastapi_app.py
    curl -s localhost:8000/v1/chat -H 'content-type: application/json' \\
        -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}'
    curl -sN localhost:8000/v1/chat/stream -H 'content-type: application/json' \\
        -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}'
    curl -s localhost:8000/stats

``POST /v1/chat/stream`` answers the same request as Server-Sent Events (``data:
{chunk}`` lines, then ``data: [DONE]``): concurrent identical streams share one provider
stream, and a repeated one is replayed from the cache. ``GET /metrics`` serves the
gateway's counters to Prometheus.

Environment: ``REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/0``), ``KEY_PREFIX``
(default ``fastapi-demo``), ``FAKE_LLM_LATENCY`` (seconds, default 0.1),
``RATE_LIMIT_TOKENS_PER_MINUTE`` (a per-user budget; unset = no limit), ``HOST``
and ``PORT`` (``python examples/fastapi_app.py`` only; ``PORT=0`` picks a free one).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict

from aiocache_llm import (
    AsyncExactCache,
    AsyncRateLimiter,
    ChunkStream,
    InferenceGateway,
    InvalidInputError,
    LLMResponse,
    MemoryExactCache,
    MemoryRateLimiter,
    RateLimitConfig,
    RateLimitExceeded,
    RedisExactCache,
    RedisRateLimiter,
    Usage,
)
from aiocache_llm.metrics.prometheus import register_gateway_metrics, unregister_gateway_metrics

# a private registry: /metrics shows this gateway only, whatever else the process registers
METRICS = CollectorRegistry()


class FakeLLM:
    """Stands in for a real provider SDK: answers after ``latency`` seconds, counts calls.

    ``stream`` answers word by word, in OpenAI's chunk shape, the last chunk carrying the
    usage (as OpenAI's does with ``stream_options={"include_usage": True}``).
    """

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.calls = 0

    async def complete(self, query: dict[str, Any]) -> LLMResponse:
        self.calls += 1
        await asyncio.sleep(self.latency)
        question = query["messages"][-1]["content"]
        prompt_tokens = len(question) // 4 + 1
        return LLMResponse(
            content=f"You asked: {question}",
            model=query["model"],
            finish_reason="stop",
            # the gateway charges the rate limiter what the answer reports it used
            usage=Usage(
                prompt_tokens=prompt_tokens, completion_tokens=8, total_tokens=prompt_tokens + 8
            ),
        )

    async def stream(self, query: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        question = query["messages"][-1]["content"]
        words = f"You asked: {question}".split(" ")
        for index, word in enumerate(words):
            await asyncio.sleep(self.latency / len(words))
            piece = word if index == 0 else f" {word}"
            yield {"choices": [{"index": 0, "delta": {"content": piece}}]}
        prompt_tokens = len(question) // 4 + 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words)}
        usage["total_tokens"] = prompt_tokens + len(words)
        yield {"choices": [], "usage": usage}


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    """The part of a chat-completion request this demo reads; other fields are kept."""

    # unknown parameters (top_p, seed, ...) change answers, so they stay in the key
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage]
    temperature: float | None = None
    max_tokens: int | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # read at startup, not import, so one module serves every configuration
    redis_url = os.environ.get("REDIS_URL")
    prefix = os.environ.get("KEY_PREFIX", "fastapi-demo")
    budget = os.environ.get("RATE_LIMIT_TOKENS_PER_MINUTE")
    llm = FakeLLM(latency=float(os.environ.get("FAKE_LLM_LATENCY", "0.1")))

    async with AsyncExitStack() as stack:
        cache: AsyncExactCache
        limiter: AsyncRateLimiter | None = None
        if redis_url:
            cache = RedisExactCache(url=redis_url, key_prefix=f"{prefix}:exact", ttl_seconds=3600)
            await stack.enter_async_context(cache)
            if budget:
                limiter = RedisRateLimiter(
                    url=redis_url,
                    config=RateLimitConfig(int(budget)),
                    key_prefix=f"{prefix}:ratelimit",
                )
        else:
            cache = MemoryExactCache(max_size=10_000, ttl_seconds=3600)
            await stack.enter_async_context(cache)
            if budget:
                limiter = MemoryRateLimiter(RateLimitConfig(int(budget)))
        if limiter is not None:
            await stack.enter_async_context(limiter)
        # entered last so it closes first, while the backends it uses are still open
        gateway = InferenceGateway(llm, exact_cache=cache, rate_limiter=limiter)
        app.state.gateway = await stack.enter_async_context(gateway)
        register_gateway_metrics(gateway, registry=METRICS)
        stack.callback(unregister_gateway_metrics, registry=METRICS)
        app.state.llm = llm
        app.state.backend = "redis" if redis_url else "memory"
        yield


app = FastAPI(title="aiocache_llm demo", lifespan=lifespan)


def get_gateway(request: Request) -> InferenceGateway:
    gateway: InferenceGateway = request.app.state.gateway
    return gateway


Gateway = Annotated[InferenceGateway, Depends(get_gateway)]


def retry_after(exc: RateLimitExceeded) -> dict[str, str]:
    if exc.retry_after is None:
        return {}
    return {"Retry-After": str(max(1, round(exc.retry_after)))}


@app.post("/v1/chat")
async def chat(
    body: ChatRequest, gateway: Gateway, x_user_id: Annotated[str | None, Header()] = None
) -> LLMResponse:
    # the user picks the token budget, never the cache entry: everyone shares answers
    try:
        answer: LLMResponse = await gateway.resolve(
            body.model_dump(exclude_none=True), user_id=x_user_id
        )
    except RateLimitExceeded as exc:
        raise HTTPException(429, str(exc), headers=retry_after(exc)) from exc
    except InvalidInputError as exc:
        raise HTTPException(422, str(exc)) from exc
    return answer


@app.post("/v1/chat/stream")
async def chat_stream(
    body: ChatRequest, gateway: Gateway, x_user_id: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    try:
        # awaiting resolve() waits for the first chunk: a refusal is still an HTTP status
        chunks: ChunkStream = await gateway.resolve(
            {**body.model_dump(exclude_none=True), "stream": True}, user_id=x_user_id
        )
    except RateLimitExceeded as exc:
        raise HTTPException(429, str(exc), headers=retry_after(exc)) from exc
    except InvalidInputError as exc:
        raise HTTPException(422, str(exc)) from exc

    async def events() -> AsyncIterator[bytes]:
        # a client that disconnects cancels this generator: its consumer leaves the
        # shared stream (the others go on) and the provider stops once nobody reads
        async with chunks:
            try:
                async for chunk in chunks:
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            except Exception as exc:  # headers are sent: report it in the stream
                error = {"error": {"type": type(exc).__name__, "message": str(exc)}}
                yield b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
                return
            yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/stats")
async def stats(request: Request, gateway: Gateway) -> dict[str, Any]:
    return {
        "backend": request.app.state.backend,
        # counted by the provider itself: the ground truth the gateway's stats must match
        "provider_calls": request.app.state.llm.calls,
        "gateway": gateway.stats().model_dump(),
    }


@app.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(METRICS), media_type=CONTENT_TYPE_LATEST)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
    )
