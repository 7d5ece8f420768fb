"""A primary of a real cluster dies (SIGKILL) or freezes (SIGSTOP) under load; so does
a Sentinel-managed primary.

Limiter checks and chat appends run for users and conversations on every primary
while one primary fails; its replica is promoted by the cluster (node timeout 1 s).
What must hold: calls whose keys live on healthy primaries all succeed; calls on the
failed primary fail fast with the library's errors (never a driver exception) and
succeed again once the replica is promoted; every acknowledged chat message is
still there afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aiocache_llm import (
    BackendError,
    ChatMemoryConfig,
    RateLimitConfig,
    RedisChatMemory,
    RedisRateLimiter,
)
from aiocache_llm.backends.redis.cluster import key_slot_of
from tests.support.redis_cluster import LocalCluster, cli
from tests.support.redis_sentinel import LocalSentinel

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

USERS = [f"user-{i}" for i in range(24)]
RECOVERY_BOUND = 12.0
"""Seconds from the failure until a replica is promoted (node timeout 1 s)."""
FAILING_CALL_BOUND = 5.5
"""Seconds a failing call takes at most: the 5 s socket timeout of a ``url=`` client."""


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A cluster of its own: these tests kill one of its nodes."""
    own = LocalCluster(node_timeout_ms=1000).start()
    try:
        yield own
    finally:
        own.stop()


def slot_owner(cluster: LocalCluster, slot: int, *, ask: int | None = None) -> int:
    """The port of the primary serving ``slot`` now, as node ``ask`` (or the first) sees it."""
    for line in cli("CLUSTER", "NODES", port=ask or cluster.ports[0]).splitlines():
        fields = line.split()
        if "master" not in fields[2]:  # a failed primary serves its slots until replaced
            continue
        for span in fields[8:]:
            if span.startswith("["):
                continue
            first, _, last = span.partition("-")
            if int(first) <= slot <= int(last or first):
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
    raise AssertionError(f"no primary serves slot {slot}")


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_a_failed_primary_fails_only_its_own_users(cluster: LocalCluster, fault: str) -> None:
    prefix = "test:failover"
    limiter = RedisRateLimiter(
        url=cluster.url,
        config=RateLimitConfig(1_000_000),
        key_prefix=prefix,
        failure_mode="raise",
        operation_timeout=0.5,
        breaker_reset_after=0.5,
    )
    chat = RedisChatMemory(
        url=cluster.url, key_prefix=prefix, config=ChatMemoryConfig(max_turns=10_000)
    )
    victim = slot_owner(cluster, key_slot_of(limiter.keys(USERS[0])[0]))
    on_victim = {
        user for user in USERS if slot_owner(cluster, key_slot_of(limiter.keys(user)[0])) == victim
    }
    chat_on_victim = {
        user for user in USERS if slot_owner(cluster, key_slot_of(chat.key(user))) == victim
    }
    assert 0 < len(on_victim) < len(USERS)
    assert 0 < len(chat_on_victim) < len(USERS)
    acknowledged: dict[str, list[str]] = {user: [] for user in USERS}
    failures: list[tuple[str, float, BaseException]] = []  # (call, sent at, error)
    durations: list[float] = []  # how long each failing call took
    loop = asyncio.get_running_loop()
    started = loop.time()
    failed_at: float | None = None
    stop = asyncio.Event()

    async def worker(user: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent = loop.time()
            try:
                assert await limiter.check_and_consume(user)
            except BackendError as exc:
                failures.append((f"limit:{user}", sent, exc))
                durations.append(loop.time() - sent)
            sent = loop.time()
            try:
                await chat.append(user, "user", f"m{n}")
                acknowledged[user].append(f"m{n}")
            except BackendError as exc:
                failures.append((f"chat:{user}", sent, exc))
                durations.append(loop.time() - sent)
            await asyncio.sleep(0.01)

    workers = [asyncio.ensure_future(worker(user)) for user in USERS]
    node = cluster.node(victim)
    observer = next(port for port in cluster.ports if port != victim)
    try:
        await asyncio.sleep(1.0)
        failed_at = loop.time()
        if fault == "kill":
            node.kill()
        else:
            node.freeze()
        # wait for the promotion (asking a live node, off the event loop), then more traffic
        deadline = time.monotonic() + RECOVERY_BOUND
        slot = key_slot_of(limiter.keys(USERS[0])[0])
        while await asyncio.to_thread(slot_owner, cluster, slot, ask=observer) == victim:
            assert time.monotonic() < deadline, "no replica promoted in time"
            await asyncio.sleep(0.2)
        promoted_at = loop.time()
        await asyncio.sleep(3.0)
    finally:
        stop.set()
        await asyncio.wait(workers, timeout=5)
        for task in workers:
            task.cancel()
        if fault == "freeze":
            node.thaw()

    healthy = [
        f
        for f in failures
        if f[0].split(":", 1)[1] not in (on_victim if f[0].startswith("limit") else chat_on_victim)
    ]
    assert healthy == [], f"calls on healthy primaries failed: {healthy[:3]}"
    assert all(isinstance(f[2], BackendError) for f in failures)
    late = [f for f in failures if f[1] > promoted_at + 2.0]
    assert late == [], f"calls sent 2 s after the promotion failed: {late[:3]}"
    # the limiter gives up at its deadline (0.5 s); chat waits at most the socket timeout
    assert max(durations) < FAILING_CALL_BOUND
    # every acknowledged append is there, in order (async replication lost nothing:
    # the replica had every acknowledged write before its primary failed); an append
    # that failed may or may not have been applied, as its error says
    for user in USERS:
        history = iter(m["content"] for m in await chat.get_history(user))
        assert all(message in history for message in acknowledged[user]), (
            f"{user}: acknowledged messages lost"
        )
    summary: dict[str, Any] = {
        "fault": fault,
        "failures_on_failed_primary": len(failures),
        "longest_failing_call_s": round(max(durations), 2),
        "promotion_s": round(promoted_at - failed_at, 2),
        "run_s": round(loop.time() - started, 2),
    }
    print(summary)
    for user in USERS:
        await limiter.reset(user)
        await chat.clear(user)
    await limiter.aclose()
    await chat.aclose()


@pytest.fixture
def sentinel_setup() -> Iterator[LocalSentinel]:
    """A primary, replica and sentinel of their own: the test kills the primary."""
    own = LocalSentinel(down_after_ms=1500).start()
    try:
        yield own
    finally:
        own.stop()


async def test_a_sentinel_url_follows_the_promoted_replica(sentinel_setup: LocalSentinel) -> None:
    prefix = "test:sentinel-failover"
    chat = RedisChatMemory(url=sentinel_setup.url, key_prefix=prefix)
    limiter = RedisRateLimiter(
        url=sentinel_setup.url,
        config=RateLimitConfig(1000),
        key_prefix=prefix,
        failure_mode="raise",
    )
    acknowledged = []
    for n in range(20):
        await chat.append("c", "user", f"m{n}")
        acknowledged.append(f"m{n}")
    assert await limiter.check_and_consume("u", 5)
    # the node the sentinel names now (a loaded machine may have failed over already),
    # once the other one holds every acknowledged append
    primary, replica = sentinel_setup.current_primary(), sentinel_setup.current_replica()
    deadline = time.monotonic() + 5
    while cli("LLEN", chat.key("c"), port=replica.port).strip() != "20":
        assert time.monotonic() < deadline, "the replica never received the appends"
        await asyncio.sleep(0.05)
    primary.kill()
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    errors = 0
    while True:
        assert loop.time() - killed_at < RECOVERY_BOUND, "no promoted primary in time"
        try:
            await chat.append("c", "user", "after")
            break
        except BackendError:
            errors += 1
            await asyncio.sleep(0.2)
    recovered_s = loop.time() - killed_at
    history = [m["content"] for m in await chat.get_history("c")]
    assert history[:20] == acknowledged
    assert history[-1] == "after"
    assert await limiter.check_and_consume("u", 5)
    assert await limiter.get_remaining("u") in (990, 995)  # the first grant if replicated
    print({"sentinel_failover_s": round(recovered_s, 2), "failed_calls": errors})
    await chat.clear("c")
    await limiter.reset("u")
    await chat.aclose()
    await limiter.aclose()
