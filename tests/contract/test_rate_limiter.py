"""The AsyncRateLimiter contract: every backend enforces the same exact sliding window.

Memory limiters run on the fake clock, or (for ``acquire``) on the event loop's clock
in virtual time with ``looptime``; Redis limiters follow the server's clock, so their
timed tests use short real windows.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, cast

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot

from aiocache_llm import (
    AsyncRateLimiter,
    BackendUnavailableError,
    ClosedResourceError,
    InvalidInputError,
    InvalidInputTypeError,
    MemoryRateLimiter,
    RateLimitConfig,
    RateLimitExceeded,
    RedisRateLimiter,
)
from aiocache_llm.backends.rate_limits import FailureMode
from aiocache_llm.backends.redis.connection import client_from_url
from aiocache_llm.protocols import Reservation
from tests.conftest import ALL_BACKENDS, REDIS_URL, Backend, FakeClock, open_backend

pytestmark = pytest.mark.timeout(30)

USER = "alice"

Factory = Callable[..., AsyncRateLimiter]

STRICT: dict[str, Any] = {"failure_mode": "raise", "operation_timeout": None}
"""Redis limiters of the contract tests: these check the window, not the outage policy, so a
shared server slowed down by other tests must slow them down, never make a check fail open."""


@pytest.fixture(params=ALL_BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """This suite also runs on a Redis Cluster and on a Sentinel-managed primary."""
    async with open_backend(request) as opened:
        yield opened


@pytest.fixture
async def make_limiter(backend: Backend) -> AsyncIterator[Factory]:
    """Builds limiters of the backend under test; Redis ones share the test's prefix.

    ``loop_clock=True`` gives a memory limiter the event loop's clock (for ``acquire``).
    """
    made: list[AsyncRateLimiter] = []

    def make(budget: int = 10, window: float = 60.0, *, loop_clock: bool = False) -> Any:
        config = RateLimitConfig(budget, window)
        limiter: AsyncRateLimiter
        if backend.redis is None:
            limiter = MemoryRateLimiter(config, clock=None if loop_clock else backend.clock)
        else:
            limiter = RedisRateLimiter(
                client=backend.redis.client,
                key_prefix=backend.redis.prefix,
                config=config,
                **STRICT,
            )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


@pytest.fixture
def limiter(make_limiter: Factory) -> AsyncRateLimiter:
    return make_limiter()


@dataclass
class Timing:
    """The window an ``acquire`` test uses and how late a wake-up may be.

    Memory runs in looptime's virtual time (exact, no real sleeping); Redis really
    waits, so its windows are short and its bounds loose.
    """

    window: float
    late: float
    virtual: bool


@pytest.fixture
def timing(backend: Backend, request: pytest.FixtureRequest) -> Timing:
    if backend.is_memory:
        request.node.add_marker(pytest.mark.looptime)
        return Timing(window=10.0, late=0.0, virtual=True)
    return Timing(window=0.5, late=0.25, virtual=False)


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_is_an_async_rate_limiter(limiter: AsyncRateLimiter) -> None:
    assert isinstance(limiter, AsyncRateLimiter)


async def test_grants_until_the_budget_then_refuses(limiter: AsyncRateLimiter) -> None:
    assert await limiter.get_remaining(USER) == 10
    for left in range(9, -1, -1):
        assert await limiter.check_and_consume(USER) is True
        assert await limiter.get_remaining(USER) == left
    assert await limiter.check_and_consume(USER) is False
    assert await limiter.get_remaining(USER) == 0


async def test_weighted_tokens(limiter: AsyncRateLimiter) -> None:
    assert await limiter.check_and_consume(USER, 7) is True
    assert await limiter.check_and_consume(USER, 4) is False
    assert await limiter.get_remaining(USER) == 3
    assert await limiter.check_and_consume(USER, 3) is True
    assert await limiter.get_remaining(USER) == 0


async def test_more_than_the_budget_is_refused_and_consumes_nothing(
    limiter: AsyncRateLimiter,
) -> None:
    assert await limiter.check_and_consume(USER, 11) is False
    assert await limiter.get_remaining(USER) == 10
    assert await limiter.check_and_consume(USER, 10) is True


async def test_the_window_slides(make_limiter: Factory, backend: Backend) -> None:
    # grants at 0 (6 tokens) and at `gap` (4 tokens); window w: 6 free up at w, 4 at w + gap
    w, gap = (10.0, 4.0) if backend.is_memory else (1.0, 0.4)
    limiter = make_limiter(10, w)
    assert await limiter.check_and_consume(USER, 6)
    await backend.wait(gap)
    assert await limiter.check_and_consume(USER, 4)
    assert not await limiter.check_and_consume(USER, 1)
    if backend.is_memory:
        backend.clock.advance(w - gap - 1e-6)  # a microsecond before the first grant expires
        assert not await limiter.check_and_consume(USER, 1)
        assert await limiter.get_remaining(USER) == 0
        backend.clock.advance(1e-6)  # exactly w after it
    else:
        await backend.wait(w - gap - 0.25)
        assert not await limiter.check_and_consume(USER, 1)
        await backend.wait(0.4)  # past w, still before w + gap
    assert await limiter.get_remaining(USER) == 6
    assert not await limiter.check_and_consume(USER, 7)
    assert await limiter.check_and_consume(USER, 6)
    await backend.wait(gap + (0 if backend.is_memory else 0.1))
    assert await limiter.get_remaining(USER) == 4


async def test_no_interval_of_one_window_holds_more_than_the_budget(
    make_limiter: Factory, backend: Backend
) -> None:
    # take one token whenever possible, at steps of a tenth of the window, and check
    # every window ending at a grant against the grant times of the backend's own clock
    w = 10.0 if backend.is_memory else 0.5
    limiter = make_limiter(3, w)
    grants: list[float] = []
    for _ in range(25):
        if await limiter.check_and_consume(USER):
            grants.append(await grant_time(limiter, backend))
        await backend.wait(w / 10)
    assert len(grants) >= 6  # the window slid at least twice
    for t in grants:
        assert sum(1 for g in grants if t - w < g <= t) <= 3


async def grant_time(limiter: AsyncRateLimiter, backend: Backend) -> float:
    """The time of the user's newest grant, on the clock the backend counts with."""
    if backend.redis is None:
        return backend.clock.now
    assert isinstance(limiter, RedisRateLimiter)
    newest = await backend.redis.client.zrange(limiter.keys(USER)[0], -1, -1, withscores=True)
    return float(newest[0][1]) / 1_000_000


async def test_reset_forgets_only_that_user(limiter: AsyncRateLimiter) -> None:
    assert await limiter.check_and_consume(USER, 10)
    assert await limiter.check_and_consume("bob", 4)
    await limiter.reset(USER)
    await limiter.reset("nobody")
    assert await limiter.get_remaining(USER) == 10
    assert await limiter.get_remaining("bob") == 6
    assert await limiter.check_and_consume(USER, 10)


@pytest.mark.parametrize(
    "other",
    ["bob", "alice ", "Alice", "alice:x", "ünïcødé {tag}", "a}b{", "\U0001f600"],
    ids=["bob", "space", "case", "colon", "unicode-braces", "braces", "emoji"],
)
async def test_users_are_isolated(limiter: AsyncRateLimiter, other: str) -> None:
    assert await limiter.check_and_consume(USER, 10)
    assert await limiter.get_remaining(other) == 10
    assert await limiter.check_and_consume(other, 3)
    assert await limiter.get_remaining(other) == 7
    assert await limiter.get_remaining(USER) == 0


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        (0, InvalidInputError),
        (-1, InvalidInputError),
        (1.5, InvalidInputTypeError),
        (True, InvalidInputTypeError),
        ("3", InvalidInputTypeError),
        (None, InvalidInputTypeError),
    ],
    ids=["zero", "negative", "float", "bool", "str", "none"],
)
async def test_bad_tokens_raise_and_consume_nothing(
    limiter: AsyncRateLimiter, tokens: Any, error: type[Exception]
) -> None:
    assert await limiter.check_and_consume(USER, 4)
    with pytest.raises(error, match="tokens"):
        await limiter.check_and_consume(USER, tokens)
    with pytest.raises(error, match="tokens"):
        await limiter.acquire(USER, tokens)
    assert await limiter.get_remaining(USER) == 6
    stats = await limiter.stats()
    assert (stats.granted, stats.refused) == (1, 0)


@pytest.mark.parametrize(
    ("user_id", "error"),
    [("", InvalidInputError), ("\ud800", InvalidInputError), (None, InvalidInputTypeError),
     (7, InvalidInputTypeError), (b"alice", InvalidInputTypeError)],
    ids=["empty", "lone-surrogate", "none", "int", "bytes"],
)  # fmt: skip
async def test_bad_user_id_raises_on_every_method(
    limiter: AsyncRateLimiter, user_id: Any, error: type[Exception]
) -> None:
    assert await limiter.check_and_consume(USER, 4)
    with pytest.raises(error, match="user_id"):
        await limiter.check_and_consume(user_id, 1)
    with pytest.raises(error, match="user_id"):
        await limiter.get_remaining(user_id)
    with pytest.raises(error, match="user_id"):
        await limiter.acquire(user_id, 1)
    with pytest.raises(error, match="user_id"):
        await limiter.reset(user_id)
    assert await limiter.get_remaining(USER) == 6


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, InvalidInputError),
        (-1, InvalidInputError),
        (math.nan, InvalidInputError),
        (math.inf, InvalidInputError),
        ("1", InvalidInputTypeError),
        (True, InvalidInputTypeError),
    ],
    ids=["zero", "negative", "nan", "inf", "str", "bool"],
)
async def test_bad_timeout_raises_and_consumes_nothing(
    limiter: AsyncRateLimiter, timeout: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="timeout"):
        await limiter.acquire(USER, 1, timeout=timeout)
    assert await limiter.get_remaining(USER) == 10


async def test_bad_config_fails_at_construction(backend: Backend) -> None:
    with pytest.raises(InvalidInputError, match="max_tokens_per_minute"):
        RateLimitConfig(0)
    with pytest.raises(InvalidInputError, match="window_seconds"):
        RateLimitConfig(10, window_seconds=0)
    bad: Any = {"max_tokens_per_minute": 10}
    client = None if backend.redis is None else backend.redis.client
    with pytest.raises(InvalidInputTypeError, match="config"):
        MemoryRateLimiter(bad) if client is None else RedisRateLimiter(client=client, config=bad)


async def test_concurrent_checks_grant_exactly_the_budget(
    make_limiter: Factory, backend: Backend
) -> None:
    # 200 calls at once; on Redis from 4 clients (as if 4 processes), 50 calls each,
    # since one client's pool holds at most 100 connections
    limiters = [make_limiter(50)]
    clients: list[Redis] = []
    if backend.redis is not None:
        for _ in range(3):
            client = another_client(backend)
            clients.append(client)
            limiters.append(
                RedisRateLimiter(
                    client=client,
                    key_prefix=backend.redis.prefix,
                    config=RateLimitConfig(50),
                    **STRICT,
                )
            )
    calls = [limiters[i % len(limiters)].check_and_consume(USER) for i in range(200)]
    results = await asyncio.gather(*calls)
    assert results.count(True) == 50
    assert await limiters[0].get_remaining(USER) == 0
    totals = [await limiter.stats() for limiter in limiters]
    assert sum(s.granted for s in totals) == sum(s.granted_tokens for s in totals) == 50
    assert sum(s.refused for s in totals) == 150
    for client in clients:
        await client.aclose()


def another_client(backend: Backend) -> Redis:
    """A second client of the backend's server (fakeredis: the same in-memory server)."""
    assert backend.redis is not None
    if backend.kind == "fakeredis":
        server = backend.redis.client.connection_pool.connection_kwargs["server"]
        return fakeredis.FakeAsyncRedis(server=server)
    if backend.kind in ("cluster", "sentinel"):
        assert backend.redis.url is not None
        return cast(Redis, client_from_url(backend.redis.url))
    return Redis.from_url(REDIS_URL)


async def test_stats_count_grants_and_refusals(limiter: AsyncRateLimiter) -> None:
    assert await limiter.check_and_consume(USER, 4)
    assert await limiter.check_and_consume(USER, 5)
    assert not await limiter.check_and_consume(USER, 5)
    assert not await limiter.check_and_consume(USER, 11)
    with pytest.raises(RateLimitExceeded):
        await limiter.acquire(USER, 11)
    stats = await limiter.stats()
    assert (stats.granted, stats.granted_tokens, stats.refused) == (2, 9, 3)
    assert stats.backend_errors == 0
    with pytest.raises(ValueError, match="frozen"):
        stats.granted = 0


async def test_repr_is_informative(limiter: AsyncRateLimiter) -> None:
    assert await limiter.check_and_consume(USER, 4)
    assert not await limiter.check_and_consume(USER, 40)
    text = repr(limiter)
    assert type(limiter).__name__ in text
    for part in ("budget=10", "window_seconds=60", "granted=1", "refused=1"):
        assert part in text


async def test_closed_limiter_refuses_calls(make_limiter: Factory) -> None:
    limiter = make_limiter()
    async with limiter:
        assert await limiter.check_and_consume(USER)
    for call in (
        limiter.check_and_consume(USER),
        limiter.get_remaining(USER),
        limiter.acquire(USER, 1),
        limiter.reset(USER),
    ):
        with pytest.raises(ClosedResourceError):
            await call


# acquire: memory in virtual time, Redis in short real windows


async def test_acquire_grants_at_once_when_the_tokens_fit(
    make_limiter: Factory, timing: Timing
) -> None:
    limiter = make_limiter(10, timing.window, loop_clock=True)
    start = now()
    await limiter.acquire(USER, 4)
    await limiter.acquire(USER, 6, timeout=1)
    assert now() - start < 0.2
    assert await limiter.get_remaining(USER) == 0


async def test_acquire_waits_until_the_tokens_fit(make_limiter: Factory, timing: Timing) -> None:
    limiter = make_limiter(10, timing.window, loop_clock=True)
    real_start = time.perf_counter()
    start = now()
    assert await limiter.check_and_consume(USER, 8)
    await limiter.acquire(USER, 5)
    waited = now() - start
    assert timing.window - 0.005 <= waited <= timing.window + timing.late
    if timing.virtual:
        assert waited == pytest.approx(timing.window, abs=1e-5)
        assert time.perf_counter() - real_start < 2.0  # looptime skipped the wait
    assert await limiter.get_remaining(USER) == 5
    stats = await limiter.stats()
    assert (stats.granted, stats.granted_tokens) == (2, 13)


async def test_acquire_timeout_raises_with_retry_after(
    make_limiter: Factory, timing: Timing
) -> None:
    w = timing.window
    limiter = make_limiter(10, w, loop_clock=True)
    start = now()
    assert await limiter.check_and_consume(USER, 10)
    with pytest.raises(RateLimitExceeded) as caught:
        await limiter.acquire(USER, 3, timeout=w * 0.4)
    waited = now() - start
    assert w * 0.4 - 0.005 <= waited <= w * 0.4 + timing.late
    retry_after = caught.value.retry_after
    assert retry_after is not None
    assert w * 0.6 - timing.late <= retry_after <= w * 0.6 + 0.01
    assert caught.value.user_id == USER
    assert await limiter.get_remaining(USER) == 0
    stats = await limiter.stats()
    assert (stats.granted, stats.refused) == (1, 1)


async def test_acquire_of_more_than_the_budget_raises_at_once(
    make_limiter: Factory, timing: Timing
) -> None:
    limiter = make_limiter(10, timing.window, loop_clock=True)
    start = now()
    with pytest.raises(RateLimitExceeded, match="never") as caught:
        await limiter.acquire(USER, 11, timeout=100)
    assert caught.value.retry_after is None
    assert now() - start < 0.1
    assert await limiter.get_remaining(USER) == 10


async def test_cancelled_acquire_consumes_nothing_and_the_next_waiter_is_served(
    make_limiter: Factory, timing: Timing
) -> None:
    w = timing.window
    limiter = make_limiter(10, w, loop_clock=True)
    start = now()
    assert await limiter.check_and_consume(USER, 10)
    first = asyncio.create_task(limiter.acquire(USER, 6))
    second = asyncio.create_task(limiter.acquire(USER, 7))
    await asyncio.sleep(w / 5)
    assert "waiting=2" in repr(limiter)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert "waiting=1" in repr(limiter)
    await second
    assert w - 0.005 <= now() - start <= w + timing.late
    assert await limiter.get_remaining(USER) == 3  # the cancelled call took nothing
    assert "waiting=0" in repr(limiter)
    stats = await limiter.stats()
    assert (stats.granted, stats.granted_tokens, stats.refused) == (2, 17, 0)


async def test_waiters_are_served_in_arrival_order(make_limiter: Factory, timing: Timing) -> None:
    w = timing.window
    limiter = make_limiter(10, w, loop_clock=True)
    start = now()
    assert await limiter.check_and_consume(USER, 5)
    served: list[tuple[int, float]] = []

    async def wait_for(tokens: int, label: int) -> None:
        await limiter.acquire(USER, tokens)
        served.append((label, now() - start))

    # 9 tokens wait for the first 5 to expire; the small calls behind would fit at
    # once but must not overtake it, nor may check_and_consume
    tasks = [asyncio.create_task(wait_for(tokens, i)) for i, tokens in enumerate([9, 1, 1])]
    await asyncio.sleep(w / 5)
    assert not await limiter.check_and_consume(USER, 1)
    assert await limiter.get_remaining(USER) == 5
    await asyncio.gather(*tasks)
    assert [label for label, _ in served] == [0, 1, 2]
    (_, first), (_, second), (_, third) = served
    assert w - 0.005 <= first <= second <= w + timing.late
    assert 2 * w - 0.005 <= third <= 2 * w + timing.late


async def test_a_queued_waiter_times_out_with_retry_after(
    make_limiter: Factory, timing: Timing
) -> None:
    w = timing.window
    limiter = make_limiter(10, w, loop_clock=True)
    assert await limiter.check_and_consume(USER, 10)
    head = asyncio.create_task(limiter.acquire(USER, 10))
    await asyncio.sleep(0)
    with pytest.raises(RateLimitExceeded) as caught:
        await limiter.acquire(USER, 2, timeout=w / 5)
    retry_after = caught.value.retry_after
    assert retry_after is not None
    assert w * 0.8 - timing.late <= retry_after <= w * 0.8 + 0.01
    await head
    assert await limiter.get_remaining(USER) == 0
    assert "waiting=0" in repr(limiter)


async def test_reset_wakes_a_waiting_acquire(make_limiter: Factory, timing: Timing) -> None:
    w = timing.window
    limiter = make_limiter(10, w, loop_clock=True)
    start = now()
    assert await limiter.check_and_consume(USER, 10)
    waiter = asyncio.create_task(limiter.acquire(USER, 4))
    await asyncio.sleep(w / 5)
    assert not waiter.done()
    await limiter.reset(USER)
    await waiter
    assert now() - start <= w / 5 + timing.late
    assert await limiter.get_remaining(USER) == 6


async def test_refund_gives_back_the_newest_grants(make_limiter: Factory, backend: Backend) -> None:
    limiter: Any = make_limiter(10, 1.0)
    assert await limiter.check_and_consume(USER, 3)
    await backend.wait(0.5)
    assert await limiter.check_and_consume(USER, 6)
    assert await limiter.refund(USER, 4) == 4  # the 6-token grant shrinks to 2
    assert await limiter.get_remaining(USER) == 5
    await backend.wait(0.6)  # the 3-token grant has expired; the shrunk one has not
    assert await limiter.get_remaining(USER) == 8
    assert await limiter.refund(USER, 50) == 2  # never more than what is held
    assert await limiter.get_remaining(USER) == 10
    assert await limiter.refund("nobody", 5) == 0
    assert (await limiter.stats()).refunded_tokens == 6
    assert await limiter.check_and_consume(USER, 10)


async def test_refund_spans_several_grants_and_keeps_the_window_exact(
    limiter: AsyncRateLimiter,
) -> None:
    refundable: Any = limiter
    for tokens in (2, 3, 4):
        assert await limiter.check_and_consume(USER, tokens)
    assert await refundable.refund(USER, 5) == 5  # the 4 and 1 of the 3
    assert await limiter.get_remaining(USER) == 6
    assert await limiter.check_and_consume(USER, 6)
    assert not await limiter.check_and_consume(USER, 1)


@pytest.mark.parametrize("tokens", [0, -1, 1.5, True])
async def test_bad_refund_raises_and_changes_nothing(
    limiter: AsyncRateLimiter, tokens: Any
) -> None:
    refundable: Any = limiter
    assert await limiter.check_and_consume(USER, 4)
    with pytest.raises((InvalidInputError, InvalidInputTypeError), match="tokens"):
        await refundable.refund(USER, tokens)
    with pytest.raises(InvalidInputError, match="user_id"):
        await refundable.refund("", 1)
    assert await limiter.get_remaining(USER) == 6


async def test_refund_wakes_a_waiting_acquire(make_limiter: Factory, timing: Timing) -> None:
    w = timing.window
    limiter: Any = make_limiter(10, w, loop_clock=True)
    start = now()
    assert await limiter.check_and_consume(USER, 10)
    waiter = asyncio.create_task(limiter.acquire(USER, 4))
    await asyncio.sleep(w / 5)
    assert not waiter.done()
    assert await limiter.refund(USER, 5) == 5
    await waiter
    assert now() - start <= w / 5 + timing.late
    assert await limiter.get_remaining(USER) == 1


async def test_aclose_fails_waiting_acquires(make_limiter: Factory, timing: Timing) -> None:
    limiter = make_limiter(10, timing.window, loop_clock=True)
    assert await limiter.check_and_consume(USER, 10)
    waiter = asyncio.create_task(limiter.acquire(USER, 4))
    await asyncio.sleep(timing.window / 5)
    closed_at = now()
    await limiter.aclose()
    with pytest.raises(ClosedResourceError):
        await waiter
    assert now() - closed_at < timing.window / 5  # woken by aclose, not by its timer


# Reservations, recorded usage, exact large counts (issue 10)


def waits(backend: Backend) -> float:
    """A window for tests moving time with ``backend.wait``: long in fake time, short in real."""
    return 10.0 if backend.is_memory else 0.6


async def test_a_refund_of_the_newest_grant_keeps_every_user_answerable(
    make_limiter: Factory, backend: Backend
) -> None:
    # the memory limiter kept users in the order of their newest grant and took it for
    # expiry order: a refund removing alice's newest grant, then her older one expiring
    # behind bob, made every later call of every user raise IndexError
    w = waits(backend)
    limiter: Any = make_limiter(10, w)
    assert await limiter.check_and_consume("alice", 2)
    await backend.wait(0.4 * w)
    assert await limiter.check_and_consume("bob", 1)
    await backend.wait(0.1 * w)
    assert await limiter.check_and_consume("alice", 3)
    assert await limiter.refund("alice", 3) == 3  # a failed call: its whole grant back
    await backend.wait(0.6 * w)  # alice's first grant has expired, bob's has not
    assert await limiter.get_remaining("alice") == 10
    assert await limiter.get_remaining("bob") == 9
    await backend.wait(0.4 * w)  # bob's has expired too
    for user in ("alice", "bob", "carol"):
        assert await limiter.get_remaining(user) == 10
    assert await limiter.check_and_consume("carol", 10)
    assert not await limiter.check_and_consume("carol", 1)


async def test_releasing_the_newest_reservation_keeps_every_user_answerable(
    make_limiter: Factory, backend: Backend
) -> None:
    w = waits(backend)
    limiter: Any = make_limiter(10, w)
    await limiter.reserve("alice", 2)
    await backend.wait(0.4 * w)
    await limiter.reserve("bob", 1)
    await backend.wait(0.1 * w)
    newest = await limiter.reserve("alice", 3)
    assert await limiter.release(newest) == 3
    await backend.wait(0.6 * w)
    assert await limiter.get_remaining("alice") == 10
    await backend.wait(0.4 * w)
    for user in ("alice", "bob", "carol"):
        assert await limiter.get_remaining(user) == 10
    assert await limiter.check_and_consume("carol", 10)
    assert not await limiter.check_and_consume("carol", 1)


async def test_release_gives_back_only_its_own_reservation(limiter: AsyncRateLimiter) -> None:
    reserving: Any = limiter
    first = await reserving.reserve(USER, 4)
    second = await reserving.reserve(USER, 5)
    assert (first.user_id, first.tokens) == (USER, 4)
    assert await reserving.release(first, 3) == 3  # the older call's grant, not the newest
    assert await limiter.get_remaining(USER) == 4
    assert await reserving.release(first) == 1  # None: all it still holds
    assert await reserving.release(first, 5) == 0  # never more than it was granted
    await reserving.record_usage(USER, 3)
    assert await reserving.release(second, 100) == 5  # never the recorded usage
    assert await limiter.get_remaining(USER) == 7
    stats = await limiter.stats()
    assert (stats.granted, stats.granted_tokens, stats.refunded_tokens) == (2, 9, 9)
    assert stats.recorded_tokens == 3


async def test_a_reservation_that_left_the_window_gives_nothing_back(
    make_limiter: Factory, backend: Backend
) -> None:
    # a provider slower than the window: the call's grant has expired (its tokens are
    # free already); giving back from the user's newest grant would wipe a live call's
    w = waits(backend)
    limiter: Any = make_limiter(10, w)
    slow = await limiter.reserve(USER, 6)
    await backend.wait(1.2 * w)
    live = await limiter.reserve(USER, 6)
    assert await limiter.release(slow, 5) == 0
    assert await limiter.get_remaining(USER) == 4
    assert not await limiter.check_and_consume(USER, 5)
    assert await limiter.release(live, 2) == 2
    assert await limiter.get_remaining(USER) == 6


async def test_a_reservation_made_before_a_reset_gives_nothing_back(
    limiter: AsyncRateLimiter,
) -> None:
    reserving: Any = limiter
    before = await reserving.reserve(USER, 6)
    await limiter.reset(USER)
    after = await reserving.reserve(USER, 7)
    assert await reserving.release(before) == 0
    assert await limiter.get_remaining(USER) == 3
    assert await reserving.release(after) == 7
    assert await limiter.get_remaining(USER) == 10


async def test_reserve_without_waiting_says_when_the_tokens_fit(
    make_limiter: Factory, backend: Backend
) -> None:
    w = waits(backend)
    limiter: Any = make_limiter(10, w)
    assert await limiter.check_and_consume(USER, 8)
    with pytest.raises(RateLimitExceeded, match="now") as caught:
        await limiter.reserve(USER, 5, timeout=0)
    retry_after = caught.value.retry_after
    assert retry_after is not None
    assert w - 0.25 <= retry_after <= w
    assert caught.value.user_id == USER
    with pytest.raises(RateLimitExceeded, match="never") as caught:
        await limiter.reserve(USER, 11, timeout=0)  # more than the whole budget
    assert caught.value.retry_after is None
    reservation = await limiter.reserve(USER, 2, timeout=0)
    assert reservation.tokens == 2
    assert await limiter.get_remaining(USER) == 0
    stats = await limiter.stats()
    assert (stats.granted, stats.granted_tokens, stats.refused) == (2, 10, 2)


async def test_reserve_waits_like_acquire(make_limiter: Factory, timing: Timing) -> None:
    limiter: Any = make_limiter(10, timing.window, loop_clock=True)
    start = now()
    assert await limiter.check_and_consume(USER, 8)
    reservation = await limiter.reserve(USER, 5, timeout=timing.window * 2)
    waited = now() - start
    assert timing.window - 0.005 <= waited <= timing.window + timing.late
    assert await limiter.release(reservation, 5) == 5
    assert await limiter.get_remaining(USER) == 10


async def test_recorded_usage_is_a_debt_the_next_requests_wait_out(
    make_limiter: Factory, timing: Timing
) -> None:
    w = timing.window
    limiter: Any = make_limiter(10, w, loop_clock=True)
    start = now()
    assert await limiter.check_and_consume(USER, 4)
    await asyncio.sleep(w / 2)
    await limiter.record_usage(USER, 25)  # far past the budget: recorded all the same
    assert await limiter.get_remaining(USER) == 0
    assert not await limiter.check_and_consume(USER, 1)
    # the debt is waited out: one window after it was recorded, not after the first grant
    await limiter.acquire(USER, 1)
    waited = now() - start
    assert 1.5 * w - 0.005 <= waited <= 1.5 * w + timing.late
    assert await limiter.get_remaining(USER) == 9
    stats = await limiter.stats()
    assert (stats.granted_tokens, stats.recorded_tokens) == (5, 25)


@pytest.mark.parametrize(
    ("tokens", "error"),
    [(0, InvalidInputError), (-3, InvalidInputError), (2**53, InvalidInputError),
     (2.0, InvalidInputTypeError), (True, InvalidInputTypeError), (None, InvalidInputTypeError)],
    ids=["zero", "negative", "2**53", "float", "bool", "none"],
)  # fmt: skip
async def test_bad_reservation_arguments_raise_and_change_nothing(
    limiter: AsyncRateLimiter, tokens: Any, error: type[Exception]
) -> None:
    reserving: Any = limiter
    reservation = await reserving.reserve(USER, 4)
    with pytest.raises(error, match="tokens"):
        await reserving.reserve(USER, tokens)
    with pytest.raises(error, match="tokens"):
        await reserving.record_usage(USER, tokens)
    if tokens is not None:
        with pytest.raises(error, match="tokens"):
            await reserving.release(reservation, tokens)
    with pytest.raises(InvalidInputError, match="user_id"):
        await reserving.record_usage("", 1)
    with pytest.raises(InvalidInputTypeError, match="reservation"):
        await reserving.release(USER, 1)
    with pytest.raises(InvalidInputError, match="not made by"):
        await reserving.release(Reservation(USER, 4, handle=object()), 1)
    for timeout in (-1, math.nan, math.inf, "1", True):
        with pytest.raises((InvalidInputError, InvalidInputTypeError), match="timeout"):
            await reserving.reserve(USER, 1, timeout=timeout)
    assert await limiter.get_remaining(USER) == 6
    stats = await limiter.stats()
    assert (stats.granted, stats.refused, stats.recorded_tokens) == (1, 0, 0)


async def test_a_reservation_of_another_kind_of_limiter_is_refused(clock: FakeClock) -> None:
    memory = MemoryRateLimiter(RateLimitConfig(10), clock=clock)
    redis = RedisRateLimiter(url=DEAD_URL, config=RateLimitConfig(10), failure_mode="raise")
    async with memory, redis:
        from_memory = await memory.reserve(USER, 3)
        with pytest.raises(InvalidInputError, match="not made by a RedisRateLimiter"):
            await redis.release(from_memory)
        # granted while a server could not answer (fail-open): nothing to give back, no I/O
        assert await memory.release(Reservation(USER, 3)) == 0
        assert await redis.release(Reservation(USER, 3)) == 0
        assert (await redis.stats()).backend_errors == 0


async def test_grants_of_a_quadrillion_tokens_expire_and_refund_exactly(
    make_limiter: Factory, backend: Backend
) -> None:
    # Lua wrote 10**15 as 1e+15 in the grant log: it then counted as 0 on expiry and refund
    w = waits(backend)
    budget = 3 * 10**15 + 7
    limiter: Any = make_limiter(budget, w)
    assert await limiter.check_and_consume(USER, 10**15)
    assert await limiter.check_and_consume(USER, 2 * 10**15)
    assert await limiter.get_remaining(USER) == 7
    assert await limiter.refund(USER, 10**15 + 1) == 10**15 + 1
    assert await limiter.get_remaining(USER) == 10**15 + 8
    await backend.wait(1.25 * w)
    assert await limiter.get_remaining(USER) == budget
    assert await limiter.check_and_consume(USER, budget)
    assert await limiter.refund(USER, budget) == budget
    assert await limiter.get_remaining(USER) == budget


async def test_token_counts_are_exact_up_to_2_to_the_53_and_refused_beyond(
    make_limiter: Factory, backend: Backend
) -> None:
    top = 2**53 - 1  # the largest integer a Redis Lua number holds exactly
    with pytest.raises(InvalidInputError, match="max_tokens_per_minute must be at most"):
        make_limiter(2**53)
    limiter: Any = make_limiter(top)
    assert await limiter.check_and_consume(USER, top)
    assert await limiter.get_remaining(USER) == 0
    assert await limiter.refund(USER, top - 1) == top - 1
    assert await limiter.get_remaining(USER) == top - 1
    reservation = await limiter.reserve(USER, top - 1)
    assert await limiter.release(reservation, top - 2) == top - 2
    assert await limiter.get_remaining(USER) == top - 2
    await limiter.reset(USER)
    await limiter.record_usage(USER, top)
    await limiter.record_usage(USER, top)  # the user's total saturates at 2**53 - 1
    assert await limiter.get_remaining(USER) == 0
    assert (await limiter.stats()).recorded_tokens == 2 * top
    calls = [
        lambda: limiter.check_and_consume(USER, top + 1),
        lambda: limiter.acquire(USER, top + 1),
        lambda: limiter.reserve(USER, top + 1, timeout=0),
        lambda: limiter.refund(USER, top + 1),
        lambda: limiter.record_usage(USER, top + 1),
        lambda: limiter.release(reservation, top + 1),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError, match=f"tokens must be at most {top}"):
            await call()


# Memory only: idle state and the exact model


async def test_idle_users_are_forgotten(clock: FakeClock) -> None:
    limiter = MemoryRateLimiter(RateLimitConfig(10, 5.0), clock=clock)
    for i in range(100):
        assert await limiter.check_and_consume(f"user-{i}", 3)
    assert "users=100" in repr(limiter)
    clock.advance(5.0)
    assert await limiter.check_and_consume("late", 1)
    assert "users=1," in repr(limiter)
    assert await limiter.get_remaining("user-0") == 10


Step = tuple[str, int, int]  # (operation, user, tokens or 64ths of a second to advance)

steps = st.lists(
    st.one_of(
        # 640/64 s is the window: land exactly on it, just before it and beyond it
        st.tuples(st.just("advance"), st.just(0), st.sampled_from([0, 1, 16, 100, 639, 640, 641])),
        st.tuples(st.just("consume"), st.integers(0, 1), st.integers(1, 12)),
        st.tuples(st.just("remaining"), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("reset"), st.integers(0, 1), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps)
async def test_memory_matches_a_brute_force_sliding_window(script: list[Step]) -> None:
    # 64ths of a second are exact in binary floating point, as the model's fractions are
    budget, window = 10, Fraction(10)
    clock = FakeClock(start=0.0)
    limiter = MemoryRateLimiter(RateLimitConfig(budget, float(window)), clock=clock)
    t = Fraction(0)
    granted: dict[int, list[tuple[Fraction, int]]] = {0: [], 1: []}

    def live(user: int) -> int:
        return sum(n for at, n in granted[user] if at > t - window)

    for operation, user, amount in script:
        if operation == "advance":
            t += Fraction(amount, 64)
            clock.now = float(t)
        elif operation == "consume":
            expected = live(user) + amount <= budget
            assert await limiter.check_and_consume(f"u{user}", amount) is expected
            if expected:
                granted[user].append((t, amount))
        elif operation == "remaining":
            assert await limiter.get_remaining(f"u{user}") == budget - live(user)
        else:
            await limiter.reset(f"u{user}")
            granted[user].clear()
    # the model is the definition: no grant ever saw more than the budget in its window
    for grants in granted.values():
        for at, _ in grants:
            assert sum(n for g, n in grants if at - window < g <= at) <= budget


ReservationStep = tuple[str, int, int]  # (operation, user, amount)

reservation_steps = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.just(0), st.sampled_from([0, 1, 16, 100, 639, 640, 641])),
        st.tuples(st.just("reserve"), st.integers(0, 2), st.integers(1, 12)),
        st.tuples(st.just("release"), st.integers(0, 7), st.integers(0, 12)),  # 0: all
        st.tuples(st.just("refund"), st.integers(0, 2), st.integers(1, 12)),
        st.tuples(st.just("record"), st.integers(0, 2), st.integers(1, 30)),
        st.tuples(st.just("remaining"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("reset"), st.integers(0, 2), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(reservation_steps)
async def test_memory_reservations_match_a_brute_force_sliding_window(
    script: list[ReservationStep],
) -> None:
    """Reservations, releases, refunds of the newest grants, debts and resets of three
    users, against a model that keeps every grant: the limiter never raises and answers
    as the model does."""
    budget, window = 10, Fraction(10)
    clock = FakeClock(start=0.0)
    limiter = MemoryRateLimiter(RateLimitConfig(budget, float(window)), clock=clock)
    t = Fraction(0)
    # per user: [time, tokens] of every grant since the last reset, oldest first
    grants: dict[int, list[list[Any]]] = {0: [], 1: [], 2: []}
    handles: list[tuple[Any, int, list[Any]]] = []  # (reservation, user, its model grant)

    def live(user: int) -> list[list[Any]]:
        return [g for g in grants[user] if g[0] > t - window]

    for operation, user, amount in script:
        if operation == "advance":
            t += Fraction(amount, 64)
            clock.now = float(t)
        elif operation == "reserve":
            used = sum(n for _, n in live(user))
            if used + amount <= budget:
                reservation = await limiter.reserve(f"u{user}", amount, timeout=0)
                grants[user].append(entry := [t, amount])
                handles.append((reservation, user, entry))
            else:
                with pytest.raises(RateLimitExceeded):
                    await limiter.reserve(f"u{user}", amount, timeout=0)
        elif operation == "release":
            if not handles:
                continue
            reservation, owner, entry = handles[user % len(handles)]
            alive = any(g is entry for g in live(owner))
            expected = min(amount or entry[1], entry[1]) if alive else 0
            assert await limiter.release(reservation, amount or None) == expected
            entry[1] -= expected
        elif operation == "refund":
            expected, left = 0, amount
            for entry in reversed(live(user)):
                taken = min(left, entry[1])
                entry[1] -= taken
                left -= taken
                expected += taken
            assert await limiter.refund(f"u{user}", amount) == expected
        elif operation == "record":
            await limiter.record_usage(f"u{user}", amount)
            grants[user].append([t, amount])
        elif operation == "remaining":
            used = sum(n for _, n in live(user))
            assert await limiter.get_remaining(f"u{user}") == max(0, budget - used)
        else:
            await limiter.reset(f"u{user}")
            for entry in grants[user]:
                entry[1] = 0  # what a reservation made before the reset can give back
            grants[user] = []
    for user in grants:
        used = sum(n for _, n in live(user))
        assert await limiter.get_remaining(f"u{user}") == max(0, budget - used)


# Redis only: layout on the server, sharing, failures


@pytest.fixture
def redis_limiter(make_limiter: Factory, backend: Backend) -> RedisRateLimiter:
    if backend.is_memory:
        pytest.skip("Redis backends only")
    limiter = make_limiter(10, 0.4)
    assert isinstance(limiter, RedisRateLimiter)
    return limiter


async def test_keys_share_a_cluster_slot_and_vanish_when_idle(
    redis_limiter: RedisRateLimiter, backend: Backend
) -> None:
    assert backend.redis is not None
    client, prefix = backend.redis.client, backend.redis.prefix
    log, meta = redis_limiter.keys(USER)
    assert (log, meta) == (
        f"{prefix}:{{alice}}:grants".encode(),
        f"{prefix}:{{alice}}:meta".encode(),
    )
    assert await redis_limiter.check_and_consume(USER, 3)
    assert await redis_limiter.check_and_consume(USER, 4)
    assert await client.zcard(log) == 2
    assert int(await client.hget(meta, "sum")) == 7
    assert 0 < await client.pttl(log) <= 400
    assert 0 < await client.pttl(meta) <= 400
    await asyncio.sleep(0.5)
    assert await client.exists(log, meta) == 0


ODD_IDS = ["}x", "{}", "a}b{", "%7D", "ünï%{", "plain"]


@pytest.mark.parametrize("user_id", ODD_IDS)
async def test_every_user_id_keeps_its_keys_in_one_slot(
    redis_limiter: RedisRateLimiter, user_id: str
) -> None:
    log, meta = redis_limiter.keys(user_id)
    assert key_slot(log) == key_slot(meta)
    assert await redis_limiter.check_and_consume(user_id, 10)
    assert await redis_limiter.get_remaining(user_id) == 0


async def test_escaping_keeps_distinct_user_ids_apart(redis_limiter: RedisRateLimiter) -> None:
    assert len({redis_limiter.keys(user_id) for user_id in ODD_IDS}) == len(ODD_IDS)
    assert redis_limiter.keys("a}b{")[0].endswith(b":{a%7Db%7B}:grants")


async def test_limiters_on_one_prefix_share_the_budget(
    redis_limiter: RedisRateLimiter, backend: Backend
) -> None:
    assert backend.redis is not None
    other = RedisRateLimiter(
        client=backend.redis.client,
        key_prefix=backend.redis.prefix,
        config=RateLimitConfig(10, 0.4),
        **STRICT,
    )
    async with other:
        assert await redis_limiter.check_and_consume(USER, 6)
        assert not await other.check_and_consume(USER, 5)
        assert await other.get_remaining(USER) == 4
        await other.reset(USER)
        assert await redis_limiter.get_remaining(USER) == 10


async def test_a_lost_meta_hash_is_rebuilt_from_the_log(
    redis_limiter: RedisRateLimiter, backend: Backend
) -> None:
    assert backend.redis is not None
    assert await redis_limiter.check_and_consume(USER, 6)
    await backend.redis.client.unlink(redis_limiter.keys(USER)[1])
    assert await redis_limiter.get_remaining(USER) == 4
    assert not await redis_limiter.check_and_consume(USER, 5)
    assert await redis_limiter.check_and_consume(USER, 4)


async def test_foreign_keys_of_one_user_leave_the_other_users_alone(backend: Backend) -> None:
    """A key of another type answers that user by the policy; it is no Redis failure."""
    if backend.redis is None:
        pytest.skip("Redis backends only")
    client = backend.redis.client
    limiter = RedisRateLimiter(
        client=client,
        key_prefix=backend.redis.prefix,
        config=RateLimitConfig(10),
        failure_mode="closed",
        breaker_threshold=2,
    )
    async with limiter:
        await client.set(limiter.keys("mallory")[0], b"not a grant log")
        for _ in range(5):
            assert await limiter.check_and_consume("mallory", 1) is False
        assert "breaker=closed" in repr(limiter)
        assert await limiter.check_and_consume(USER, 3) is True
        stats = await limiter.stats()
        assert (stats.granted, stats.refused, stats.backend_errors) == (1, 5, 5)
        await limiter.reset("mallory")  # deletes whatever is there: the user is healed
        assert await limiter.check_and_consume("mallory", 10) is True


async def test_log_members_that_are_not_grants_count_for_nothing(
    redis_limiter: RedisRateLimiter, backend: Backend
) -> None:
    assert backend.redis is not None
    log, _ = redis_limiter.keys(USER)
    await backend.redis.client.zadd(log, {b"not-a-grant": 1e18, b"12:x": 5})
    assert await redis_limiter.check_and_consume(USER, 4) is True
    assert await redis_limiter.get_remaining(USER) == 6
    assert await redis_limiter.refund(USER, 10) == 4  # the foreign members are dropped
    assert await backend.redis.client.zcard(log) == 0
    assert await redis_limiter.get_remaining(USER) == 10
    assert (await redis_limiter.stats()).backend_errors == 0


async def test_limiters_with_different_windows_on_one_prefix_each_keep_their_guarantee(
    backend: Backend,
) -> None:
    """A rolling deploy changing window_seconds: the short window used to purge the
    shared log, and the long one then granted its budget again and again."""
    if backend.redis is None:
        pytest.skip("Redis backends only")
    client, prefix = backend.redis.client, backend.redis.prefix

    def make(window: float) -> RedisRateLimiter:
        config = RateLimitConfig(10, window)
        return RedisRateLimiter(client=client, key_prefix=prefix, config=config, **STRICT)

    long, short = make(1.5), make(0.3)
    async with long, short:
        assert await long.check_and_consume(USER, 10)
        await asyncio.sleep(0.4)
        # the short window no longer counts the long one's grant...
        assert await short.get_remaining(USER) == 10
        # ...but never drops it: the long window still holds it
        assert not await long.check_and_consume(USER, 1)
        assert await long.get_remaining(USER) == 0
        assert await short.check_and_consume(USER, 10)
        assert not await short.check_and_consume(USER, 1)
        assert not await long.check_and_consume(USER, 1)
        log, _ = long.keys(USER)
        assert await client.pttl(log) > 700  # kept for the long window, not the short one
        await asyncio.sleep(0.4)
        assert await short.check_and_consume(USER, 4)  # its own window slid
        assert not await long.check_and_consume(USER, 1)
        assert await client.zcard(log) == 3
        # the long limiter's last grant is 1.5 s old: the log serves the short window alone
        await asyncio.sleep(1.2)
        assert await short.get_remaining(USER) == 10
        assert await client.zcard(log) == 0
        assert await long.get_remaining(USER) == 10


twin_steps = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(1, 12)),
        st.tuples(st.just("check"), st.integers(0, 1), st.integers(1, 12)),
        st.tuples(st.just("release"), st.integers(0, 7), st.integers(0, 12)),  # 0: all
        st.tuples(st.just("refund"), st.integers(0, 1), st.integers(1, 12)),
        st.tuples(st.just("record"), st.integers(0, 1), st.integers(1, 30)),
        st.tuples(st.just("remaining"), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("reset"), st.integers(0, 1), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(twin_steps)
async def test_the_redis_twin_answers_like_the_memory_twin(
    script: list[ReservationStep],
) -> None:
    """The same calls within one window, on memory and on fakeredis: the same answers."""
    config = RateLimitConfig(10)
    memory = MemoryRateLimiter(config, clock=FakeClock())
    client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    redis = RedisRateLimiter(client=client, config=config, key_prefix="twin", **STRICT)
    twins: list[Any] = [memory, redis]
    held: list[list[Any]] = []
    try:
        for operation, user, amount in script:
            answers = []
            for index, twin in enumerate(twins):
                name = f"u{user}"
                if operation == "reserve":
                    try:
                        reservation = await twin.reserve(name, amount, timeout=0)
                    except RateLimitExceeded:
                        answers.append("refused")
                        continue
                    if index == 0:
                        held.append([reservation])
                    else:
                        held[-1].append(reservation)
                    answers.append("granted")
                elif operation == "check":
                    answers.append(await twin.check_and_consume(name, amount))
                elif operation == "release":
                    pair = held[user % len(held)] if held else None
                    answers.append(pair and await twin.release(pair[index], amount or None))
                elif operation == "refund":
                    answers.append(await twin.refund(name, amount))
                elif operation == "record":
                    answers.append(await twin.record_usage(name, amount))
                elif operation == "remaining":
                    answers.append(await twin.get_remaining(name))
                else:
                    answers.append(await twin.reset(name))
            assert answers[0] == answers[1], (operation, user, amount)
        for user in ("u0", "u1"):
            assert await memory.get_remaining(user) == await redis.get_remaining(user)
        stats = [await twin.stats() for twin in twins]
        assert stats[0] == stats[1]
    finally:
        await memory.aclose()
        await redis.aclose()
        await client.aclose()


async def test_a_release_finds_its_grant_among_others_of_the_same_microsecond(
    redis_limiter: RedisRateLimiter, backend: Backend
) -> None:
    assert backend.redis is not None
    first, second = await asyncio.gather(
        redis_limiter.reserve(USER, 3), redis_limiter.reserve(USER, 4)
    )
    log, _ = redis_limiter.keys(USER)
    members = sorted(await backend.redis.client.zrange(log, 0, -1))
    assert len(members) == 2
    assert all(member.count(b":") == 2 for member in members)  # <us>:<seq>:<tokens>
    assert await redis_limiter.release(second, 1) == 1
    assert await redis_limiter.release(first) == 3
    assert await redis_limiter.get_remaining(USER) == 7
    assert await redis_limiter.release(second) == 3
    assert await backend.redis.client.zcard(log) == 0


# Redis only: what the limiter answers when Redis cannot (failure_mode)

DEAD_URL = "redis://127.0.0.1:1/0"  # port 1: nothing listens, connections are refused


def dead_limiter(mode: FailureMode, **options: Any) -> RedisRateLimiter:
    return RedisRateLimiter(url=DEAD_URL, config=RateLimitConfig(10), failure_mode=mode, **options)


async def test_failure_mode_defaults_to_open() -> None:
    async with RedisRateLimiter(url=DEAD_URL, config=RateLimitConfig(10)) as limiter:
        assert limiter.failure_mode == "open"
        assert limiter.operation_timeout == 0.5
        assert "failure_mode='open'" in repr(limiter)


@pytest.mark.parametrize(
    ("options", "error", "named"),
    [
        ({"failure_mode": "OPEN"}, InvalidInputError, "failure_mode"),
        ({"failure_mode": "allow"}, InvalidInputError, "failure_mode"),
        ({"failure_mode": ""}, InvalidInputError, "failure_mode"),
        ({"failure_mode": None}, InvalidInputTypeError, "failure_mode"),
        ({"failure_mode": True}, InvalidInputTypeError, "failure_mode"),
        ({"operation_timeout": 0}, InvalidInputError, "operation_timeout"),
        ({"operation_timeout": math.nan}, InvalidInputError, "operation_timeout"),
        ({"breaker_threshold": 0}, InvalidInputError, "breaker_threshold"),
        ({"breaker_reset_after": -1}, InvalidInputError, "breaker_reset_after"),
    ],
    ids=["upper", "gateway-word", "empty", "none", "bool", "timeout-zero", "timeout-nan",
         "threshold-zero", "reset-negative"],
)  # fmt: skip
async def test_bad_failure_options_fail_at_construction(
    options: dict[str, Any], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        RedisRateLimiter(url=DEAD_URL, config=RateLimitConfig(10), **options)


async def test_unreachable_redis_fails_open_by_policy_and_counts_it() -> None:
    async with dead_limiter("open") as limiter:
        started = time.perf_counter()
        assert await limiter.check_and_consume(USER, 3) is True
        assert await limiter.get_remaining(USER) == 10
        await limiter.acquire(USER, 4, timeout=1)
        assert await limiter.refund(USER, 2) == 0
        with pytest.raises(BackendUnavailableError, match="reset"):
            await limiter.reset(USER)
        assert time.perf_counter() - started < 2.0  # refused connections: no waiting
        stats = await limiter.stats()
    assert (stats.granted, stats.granted_tokens, stats.refused) == (2, 7, 0)
    assert (stats.refunded_tokens, stats.backend_errors) == (0, 5)


async def test_unreachable_redis_fails_closed_by_policy_and_counts_it() -> None:
    async with dead_limiter("closed", breaker_reset_after=2.5) as limiter:
        assert await limiter.check_and_consume(USER, 3) is False
        assert await limiter.get_remaining(USER) == 0
        with pytest.raises(RateLimitExceeded, match="cannot reach") as caught:
            await limiter.acquire(USER, 4, timeout=5)
        assert caught.value.retry_after == 2.5  # when the breaker asks Redis again
        assert caught.value.user_id == USER
        assert "waiting=0" in repr(limiter)
        assert await limiter.refund(USER, 2) == 0
        with pytest.raises(BackendUnavailableError, match="reset"):
            await limiter.reset(USER)
        stats = await limiter.stats()
    assert (stats.granted, stats.refused, stats.backend_errors) == (0, 2, 5)


async def test_unreachable_redis_raises_backend_unavailable_by_policy_and_counts_it() -> None:
    async with dead_limiter("raise") as limiter:
        with pytest.raises(BackendUnavailableError, match="check_and_consume"):
            await limiter.check_and_consume(USER, 1)
        with pytest.raises(BackendUnavailableError, match="get_remaining"):
            await limiter.get_remaining(USER)
        with pytest.raises(BackendUnavailableError, match="acquire"):
            await limiter.acquire(USER, 1, timeout=1)
        assert "waiting=0" in repr(limiter)
        with pytest.raises(BackendUnavailableError, match="refund"):
            await limiter.refund(USER, 1)
        with pytest.raises(BackendUnavailableError, match="reset"):
            await limiter.reset(USER)
        stats = await limiter.stats()
        assert (stats.granted, stats.refused, stats.backend_errors) == (0, 0, 5)
        assert "backend_errors=5" in repr(limiter)


async def test_the_breaker_stops_asking_a_dead_redis(caplog: pytest.LogCaptureFixture) -> None:
    """After ``breaker_threshold`` failures calls are answered without a connection attempt."""
    async with dead_limiter("raise", breaker_threshold=2, breaker_reset_after=60) as limiter:
        errors = []
        for _ in range(6):
            with pytest.raises(BackendUnavailableError) as caught:
                await limiter.check_and_consume(USER, 1)
            errors.append(str(caught.value))
        assert all("ConnectionError" in e for e in errors[:2])
        assert all("not sent" in e and "circuit breaker" in e for e in errors[2:])
        assert "breaker=open" in repr(limiter)
        assert (await limiter.stats()).backend_errors == 6
    outages = [r for r in caplog.records if r.name == "aiocache_llm.rate_limiter"]
    assert len(outages) == 1, "one log line per outage, not one per call"
    assert outages[0].levelname == "WARNING"
    assert "failure_mode='raise'" in outages[0].getMessage()
    assert USER not in outages[0].getMessage()
