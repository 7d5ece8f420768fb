"""Failover under load: 30 workers keep checking limits and appending chat messages on
every primary of a real cluster while one primary is SIGKILLed, or SIGSTOPped.

Each worker owns one user and one conversation (their hash tags spread them over the
three primaries) and loops: ``check_and_consume`` then ``append``, for about 8 s in
all. One primary (of this test's own cluster, stopped by its pid only) fails 1.5 s in;
its replica is promoted (``cluster-node-timeout`` 1 s); the load goes on 2.5 s more.

What must hold, and is asserted:

- keys on healthy primaries: every call succeeds. The limiter runs with
  ``failure_mode="raise"`` so a failure cannot hide as a fail-open grant, and every
  True it returned is a grant recorded on the server (``budget - get_remaining`` is
  exactly the number of Trues): none was answered by a policy instead of Redis;
- keys on the failed primary: a call either succeeds or raises the library's
  :class:`BackendError` (never a driver exception), and returns within a stated bound
  (the limiter's 0.5 s deadline; chat, which has no deadline of its own, the 5 s socket
  timeout of a ``url=`` client); nothing sent 2 s after the promotion fails;
- no acknowledged chat append is lost: each conversation's history holds every
  append that returned normally, once each, in order (healthy conversations hold
  exactly those);
- after the promotion a check and an append on every formerly failed user succeed.

The figures (promotion time, failed calls per slot group, latencies) are printed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from aiocache_llm import (
    BackendError,
    ChatMemoryConfig,
    RateLimitConfig,
    RedisChatMemory,
    RedisRateLimiter,
)
from aiocache_llm.backends.redis.cluster import key_slot_of
from tests.cluster.test_cluster_failover import slot_owner
from tests.support.redis_cluster import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WORKERS = 30
BUDGET = 1_000_000
WARMUP_S = 1.5
AFTER_PROMOTION_S = 2.5
PROMOTION_BOUND = 10.0
"""Seconds from the failure until the cluster promotes the replica (node timeout 1 s)."""
LIMIT_CALL_BOUND = 1.0
"""Seconds a limiter check on the failed primary takes at most (0.5 s deadline + slack)."""
CHAT_CALL_BOUND = 6.0
"""Seconds an append on the failed primary takes at most: the 5 s socket timeout of a
``url=`` client, plus scheduling slack on a loaded machine."""
RECOVERED_AFTER = 2.0
"""Seconds after the promotion from which every call must succeed again."""


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A cluster of its own (one of its primaries fails); replicas promoted after 1 s."""
    own = LocalCluster(node_timeout_ms=1000).start()
    try:
        yield own
    finally:
        own.stop()


@dataclass
class Call:
    kind: str  # "limit" or "chat"
    worker: int
    sent: float
    took: float
    error: BaseException | None


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_failover_under_load_loses_nothing_and_spares_healthy_primaries(
    cluster: LocalCluster, fault: str
) -> None:
    prefix = f"test:failover-load:{fault}"
    limiter = RedisRateLimiter(
        url=cluster.url,
        config=RateLimitConfig(BUDGET, window_seconds=3600),
        key_prefix=prefix,
        failure_mode="raise",
        operation_timeout=0.5,
        breaker_reset_after=0.5,
    )
    chat = RedisChatMemory(
        url=cluster.url, key_prefix=prefix, config=ChatMemoryConfig(max_turns=100_000)
    )
    users = [f"user-{i}" for i in range(WORKERS)]
    convs = [f"conv-{i}" for i in range(WORKERS)]
    # each worker's limiter and chat keys, by the primary serving them before the fault
    limit_owner = [slot_owner(cluster, key_slot_of(limiter.keys(u)[0])) for u in users]
    chat_owner = [slot_owner(cluster, key_slot_of(chat.key(c))) for c in convs]
    primaries = sorted(set(limit_owner) | set(chat_owner))
    assert len(primaries) == 3, "the workers' keys must span all three primaries"
    victim = limit_owner[0]
    assert 0 < limit_owner.count(victim) < WORKERS
    assert 0 < chat_owner.count(victim) < WORKERS

    def on_victim(call: Call) -> bool:
        owner = limit_owner if call.kind == "limit" else chat_owner
        return owner[call.worker] == victim

    calls: list[Call] = []
    granted = [0] * WORKERS
    acknowledged: list[list[str]] = [[] for _ in range(WORKERS)]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent = loop.time()
            error: BaseException | None = None
            try:
                # "raise" mode: True is a real grant (the budget is never reached)
                assert await limiter.check_and_consume(users[i])
                granted[i] += 1
            except Exception as exc:  # any escape is recorded, judged below
                error = exc
            calls.append(Call("limit", i, sent, loop.time() - sent, error))
            sent = loop.time()
            error = None
            message = f"m{n}"
            try:
                await chat.append(convs[i], "user", message)
                acknowledged[i].append(message)
            except Exception as exc:
                error = exc
            calls.append(Call("chat", i, sent, loop.time() - sent, error))
            await asyncio.sleep(0.01)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(WORKERS)]
    node = cluster.node(victim)
    observer = next(port for port in cluster.ports if port != victim)
    slot = key_slot_of(limiter.keys(users[0])[0])
    started = loop.time()
    failed_at = promoted_at = None
    try:
        await asyncio.sleep(WARMUP_S)
        failed_at = loop.time()
        if fault == "kill":
            node.kill()
        else:
            node.freeze()
        deadline = time.monotonic() + PROMOTION_BOUND
        while await asyncio.to_thread(slot_owner, cluster, slot, ask=observer) == victim:
            assert time.monotonic() < deadline, "no replica promoted in time"
            await asyncio.sleep(0.1)
        promoted_at = loop.time()
        await asyncio.sleep(AFTER_PROMOTION_S)
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=CHAT_CALL_BOUND + 1)
        for task in tasks:
            task.cancel()
        if fault == "freeze":
            node.thaw()
    for task in tasks:
        assert task.done(), task
        assert task.exception() is None, task
    assert failed_at is not None
    assert promoted_at is not None

    healthy = [c for c in calls if not on_victim(c)]
    failed = [c for c in calls if on_victim(c)]
    healthy_errors = [c for c in healthy if c.error is not None]
    assert healthy_errors == [], f"calls on healthy primaries failed: {healthy_errors[:3]}"
    foreign = [c for c in calls if c.error is not None and not isinstance(c.error, BackendError)]
    assert foreign == [], f"errors other than the library's: {foreign[:3]}"
    late = [c for c in calls if c.error is not None and c.sent > promoted_at + RECOVERED_AFTER]
    assert late == [], f"calls sent {RECOVERED_AFTER} s after the promotion failed: {late[:3]}"
    slow_limit = [c for c in failed if c.kind == "limit" and c.took > LIMIT_CALL_BOUND]
    assert slow_limit == [], f"limiter checks over {LIMIT_CALL_BOUND} s: {slow_limit[:3]}"
    slow_chat = [c for c in failed if c.kind == "chat" and c.took > CHAT_CALL_BOUND]
    assert slow_chat == [], f"appends over {CHAT_CALL_BOUND} s: {slow_chat[:3]}"
    assert any(c.error is not None for c in failed), "the fault was never felt"

    # every True on a healthy primary is a grant Redis recorded (none answered by policy)
    for i, user in enumerate(users):
        if limit_owner[i] != victim:
            assert BUDGET - await limiter.get_remaining(user) == granted[i], user
    # no acknowledged append lost, duplicated or reordered
    for i, conv in enumerate(convs):
        history = [m["content"] for m in await chat.get_history(conv)]
        if chat_owner[i] != victim:
            assert history == acknowledged[i], f"{conv}: history differs"
            continue
        assert len(set(history)) == len(history), f"{conv}: a message stored twice"
        kept = iter(history)  # acknowledged must be a subsequence of the history
        assert all(m in kept for m in acknowledged[i]), f"{conv}: acknowledged messages lost"
    # after the promotion every formerly failed user and conversation works again
    for i in range(WORKERS):
        if limit_owner[i] == victim:
            assert await limiter.check_and_consume(users[i])
        if chat_owner[i] == victim:
            await chat.append(convs[i], "user", "after")
            assert (await chat.get_history(convs[i]))[-1]["content"] == "after"

    def group(call: Call) -> str:
        owner = limit_owner if call.kind == "limit" else chat_owner
        return "failed" if on_victim(call) else f"healthy:{owner[call.worker]}"

    by_group = Counter((group(c), c.kind) for c in calls if c.error is not None)
    errors = [c for c in failed if c.error is not None]
    figures = {
        "fault": fault,
        "promotion_s": round(promoted_at - failed_at, 2),
        "calls": len(calls),
        "calls_on_failed_primary": len(failed),
        "failed_calls_by_group": {f"{g}/{k}": n for (g, k), n in sorted(by_group.items())},
        "failed_calls_on_healthy": len(healthy_errors),
        "max_latency_healthy_s": round(max(c.took for c in healthy), 3),
        "max_latency_failed_primary_s": {
            kind: round(max((c.took for c in failed if c.kind == kind), default=0.0), 3)
            for kind in ("limit", "chat")
        },
        "max_failing_call_s": {
            kind: round(max((c.took for c in errors if c.kind == kind), default=0.0), 3)
            for kind in ("limit", "chat")
        },
        "failure_window_s": round(max(c.sent + c.took for c in errors) - failed_at, 2),
        "error_types": sorted({type(c.error).__name__ for c in errors}),
        "acknowledged_appends": sum(map(len, acknowledged)),
        "run_s": round(loop.time() - started, 2),
    }
    print(figures)
    for user, conv in zip(users, convs, strict=True):
        await limiter.reset(user)
        await chat.clear(conv)
    await limiter.aclose()
    await chat.aclose()
