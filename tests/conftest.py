"""Shared fixtures: the backends the contract suites run on, and a fake clock.

``backend`` is ``"memory"``, ``"fakeredis"`` or ``"redis"`` (the real server at
``AIOCACHE_LLM_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``). Real-server
tests carry the ``redis`` marker. They skip when the server is unreachable, except
when ``AIOCACHE_LLM_REQUIRE_REDIS=1`` (set by ``.ci/run``): then they fail.
Every Redis test writes under its own random key prefix and deletes it afterwards.

Two more backends, ``"cluster"`` (a private 6-node Redis Cluster started once per
session from ``redis-server`` processes, see ``tests/support/redis_cluster.py``) and
``"sentinel"`` (a primary, a replica and a sentinel, ``tests/support/redis_sentinel.py``),
are in ``CLUSTER_BACKENDS``: the suites whose objects run there add them with their
own ``backend`` fixture (:func:`open_backend`). They carry the ``cluster`` marker and
skip when the binaries are missing (fail with ``AIOCACHE_LLM_REQUIRE_REDIS=1``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from aiocache_llm.backends.redis.cluster import scan_keys, unlink_keys
from tests.support.redis_cluster import LocalCluster, running_cluster
from tests.support.redis_sentinel import SERVICE, LocalSentinel, running_sentinel

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
CLUSTER_BACKENDS = [
    pytest.param("cluster", id="cluster", marks=pytest.mark.cluster),
    pytest.param("sentinel", id="sentinel", marks=pytest.mark.cluster),
]
ALL_BACKENDS = BACKENDS + CLUSTER_BACKENDS
"""memory, fakeredis, redis, cluster and sentinel: for suites whose objects run on all."""
ALL_REDIS_BACKENDS = REDIS_BACKENDS + CLUSTER_BACKENDS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cluster: runs on a private Redis Cluster or Sentinel setup started from "
        "redis-server processes (skipped when the binaries are missing)",
    )


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


async def _delete_prefix(client: Redis | RedisCluster, prefix: str) -> None:
    # every primary of a cluster; keys of a prefix with no hash tag span its slots
    async for keys in scan_keys(client, f"{prefix}*", count=1000):
        await unlink_keys(client, keys)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A private 6-node Redis Cluster (3 primaries, 3 replicas) for the whole session."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A private primary + replica + sentinel for the whole session."""
    with running_sentinel() as setup:
        yield setup


@asynccontextmanager
async def open_redis_target(
    kind: str, request: pytest.FixtureRequest | None = None
) -> AsyncIterator[RedisTarget]:
    """A client and a private prefix on ``"fakeredis"``, ``"redis"``, ``"cluster"`` or
    ``"sentinel"`` (these two need the test's ``request``), cleaned up on exit."""
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    if kind in ("cluster", "sentinel"):
        assert request is not None, f"a {kind} target needs the test's request"
        client: Any
        if kind == "cluster":
            cluster: LocalCluster = request.getfixturevalue("redis_cluster")
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes]
            )
            await client.initialize()
            url = cluster.url
        else:
            setup: LocalSentinel = request.getfixturevalue("redis_sentinel")
            sentinel = Sentinel([("127.0.0.1", setup.sentinel_port)])
            client = sentinel.master_for(SERVICE)
            url = setup.url
        try:
            yield RedisTarget(cast(Redis, client), prefix, url)
        finally:
            await _delete_prefix(client, prefix)
            await _delete_prefix(client, "{" + prefix + "}")  # a hash-tagged form of it
            await client.aclose()
        return
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


@asynccontextmanager
async def open_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The :class:`Backend` named by ``request.param`` (any of ``ALL_BACKENDS``)."""
    clock = FakeClock()
    if request.param == "memory":
        yield Backend("memory", clock, None)
        return
    async with open_redis_target(request.param, request) as target:
        yield Backend(request.param, clock, target)


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Parametrizes a test over memory, fakeredis and the real Redis."""
    async with open_backend(request) as backend:
        yield backend


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
