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
from typing import Any

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
from tests.conftest import REDIS_URL, Backend, FakeClock

pytestmark = pytest.mark.timeout(30)

USER = "alice"

Factory = Callable[..., AsyncRateLimiter]

STRICT: dict[str, Any] = {"failure_mode": "raise", "operation_timeout": None}
"""Redis limiters of the contract tests: these check the window, not the outage policy, so a
shared server slowed down by other tests must slow them down, never make a check fail open."""


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
