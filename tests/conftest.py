"""Shared fixtures: the three backends every contract suite runs on, and a fake clock.

``backend`` is ``"memory"``, ``"fakeredis"`` or ``"redis"`` (the real server at
``AIOCACHE_LLM_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``). Real-server
tests carry the ``redis`` marker. They skip when the server is unreachable, except
when ``AIOCACHE_LLM_REQUIRE_REDIS=1`` (set by ``.ci/run``): then they fail.
Every Redis test writes under its own random key prefix and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import fakeredis
import pytest
from redis.asyncio import Redis

# LiteLLM downloads a price list from the internet when imported unless told not to; any
# test (or a library it imports) may be the first to import it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

REDIS_URL = os.environ.get("AIOCACHE_LLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("AIOCACHE_LLM_REQUIRE_REDIS") == "1"

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("fakeredis", id="fakeredis"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]
REDIS_BACKENDS = BACKENDS[1:]


def _redis_reachable() -> bool:
    parsed = urlparse(REDIS_URL)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), 1.0):
            return True
    except OSError:
        return False


_REACHABLE: bool | None = None


def require_real_redis() -> None:
    """Skip (or, in CI, fail) the current test when the real server is unreachable."""
    global _REACHABLE
    if _REACHABLE is None:
        _REACHABLE = _redis_reachable()
    if not _REACHABLE:
        message = f"real Redis not reachable at {REDIS_URL}"
        if REQUIRE_REDIS:
            pytest.fail(message + " (AIOCACHE_LLM_REQUIRE_REDIS=1)")
        pytest.skip(message)


@dataclass
class RedisTarget:
    """A client and a key prefix private to one test."""

    client: Redis
    prefix: str
    url: str | None


async def _delete_prefix(client: Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.unlink(*keys)


@asynccontextmanager
async def open_redis_target(kind: str) -> AsyncIterator[RedisTarget]:
    """A client and a private prefix on ``"fakeredis"`` or ``"redis"``, cleaned up on exit."""
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    if kind == "fakeredis":
        fake: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        try:
            yield RedisTarget(fake, prefix, None)
        finally:
            await fake.aclose()
        return
    require_real_redis()
    client = Redis.from_url(REDIS_URL)
    try:
        yield RedisTarget(client, prefix, REDIS_URL)
    finally:
        await _delete_prefix(client, prefix)
        await client.aclose()


@pytest.fixture
async def real_redis() -> AsyncIterator[RedisTarget]:
    """The real server only (for multi-process and fault tests)."""
    async with open_redis_target("redis") as target:
        yield target


@dataclass
class Backend:
    """One of the three places a contract test runs: ``kind`` is memory/fakeredis/redis.

    ``clock`` drives the memory backends; Redis backends follow the server's clock,
    so ``wait()`` moves the fake clock for memory and really sleeps for Redis.
    """

    kind: str
    clock: FakeClock
    redis: RedisTarget | None

    @property
    def is_memory(self) -> bool:
        return self.kind == "memory"

    async def wait(self, seconds: float) -> None:
        if self.is_memory:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Parametrizes a test over memory, fakeredis and the real Redis."""
    clock = FakeClock()
    if request.param == "memory":
        yield Backend("memory", clock, None)
        return
    async with open_redis_target(request.param) as target:
        yield Backend(request.param, clock, target)


class FakeClock:
    """A monotonic clock that moves only when told: ``clock.advance(seconds)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
