"""RedisRateLimiter's ``failure_mode`` against a private redis-server that is frozen or killed.

Each mode answers within ``operation_timeout`` while the server is frozen, at once
once the breaker has opened, and enforces the exact window again when the server
is back. The gateway's ``on_limiter_error`` and the limiter's policy work together
as documented on :class:`InferenceGateway`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aiocache_llm import (
    BackendUnavailableError,
    InferenceGateway,
    InvalidInputError,
    RateLimitConfig,
    RateLimitExceeded,
    RedisRateLimiter,
)
from aiocache_llm.backends.rate_limits import FailureMode
from tests.gateway.fakes import CountingProvider
from tests.support.redis_server import RedisServer, redis_server_binary

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]

USER = "alice"
TIMEOUT = 0.2
RESET_AFTER = 0.5
SLACK = 0.3
"""Scheduling delay allowed beyond a stated bound (a busy 2-core machine)."""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    redis_server_binary()
    started = RedisServer().start()
    yield started
    started.stop()  # thaws a frozen server first


@pytest.fixture
async def make_limiter(server: RedisServer) -> AsyncIterator[Any]:
    made: list[RedisRateLimiter] = []

    def make(mode: FailureMode, budget: int = 10, **options: Any) -> RedisRateLimiter:
        options = {
            "operation_timeout": TIMEOUT,
            "breaker_threshold": 2,
            "breaker_reset_after": RESET_AFTER,
            **options,
        }
        limiter = RedisRateLimiter(
            url=server.url, config=RateLimitConfig(budget), failure_mode=mode, **options
        )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def timed(call: Any) -> tuple[Any, float]:
    """(result or the exception raised, seconds taken)."""
    started = time.perf_counter()
    try:
        result = await call
    except Exception as exc:
        result = exc
    return result, time.perf_counter() - started


EXPECTED = {
    "open": {"check": True, "remaining": 10, "acquire": None},
    "closed": {"check": False, "remaining": 0, "acquire": RateLimitExceeded},
    "raise": {
        "check": BackendUnavailableError,
        "remaining": BackendUnavailableError,
        "acquire": BackendUnavailableError,
    },
}


def matches(result: Any, expected: Any) -> bool:
    if isinstance(expected, type):
        return isinstance(result, expected)
    return bool(result == expected)


async def exactness_resumes(limiter: RedisRateLimiter, at_most: int) -> None:
    """The window is exact again: what is left is granted once, then nothing more."""
    remaining = await limiter.get_remaining(USER)
    assert 0 < remaining <= at_most
    assert await limiter.check_and_consume(USER, remaining) is True
    assert await limiter.check_and_consume(USER, 1) is False
    assert await limiter.get_remaining(USER) == 0


@pytest.mark.parametrize("mode", ["open", "closed", "raise"])
async def test_a_frozen_redis_is_answered_by_policy_within_the_timeout(
    server: RedisServer, make_limiter: Any, mode: FailureMode
) -> None:
    limiter = make_limiter(mode)
    assert await limiter.check_and_consume(USER, 4)
    expected = EXPECTED[mode]
    server.freeze()
    try:
        # the first two calls wait for the deadline, then the breaker answers at once
        for _ in range(2):
            result, took = await timed(limiter.check_and_consume(USER, 1))
            assert matches(result, expected["check"]), result
            assert TIMEOUT - 0.01 <= took <= TIMEOUT + SLACK
        assert "breaker=open" in repr(limiter)
        for call, outcome in [
            (limiter.check_and_consume(USER, 1), expected["check"]),
            (limiter.get_remaining(USER), expected["remaining"]),
            (limiter.acquire(USER, 1, timeout=5), expected["acquire"]),
        ]:
            result, took = await timed(call)
            assert matches(result, outcome), result
            assert took < 0.05, "no round trip to a server known to be down"
        if mode == "closed":
            assert result.retry_after == RESET_AFTER
        stats = await limiter.stats()
        assert stats.backend_errors == 5
    finally:
        server.thaw()
    await asyncio.sleep(RESET_AFTER)
    # the two timed-out checks may have run when the server woke: 4 to 6 tokens left
    await exactness_resumes(limiter, at_most=6)
    assert "breaker=closed" in repr(limiter)


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_killed_redis_is_answered_by_policy_and_logged_once(
    server: RedisServer, make_limiter: Any, mode: FailureMode, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = make_limiter(mode)
    assert await limiter.check_and_consume(USER, 4)
    with caplog.at_level(logging.INFO, logger="aiocache_llm.rate_limiter"):
        server.kill()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(limiter.check_and_consume(f"user-{i}", 1) for i in range(50))
        )
        assert results == [mode == "open"] * 50
        assert time.perf_counter() - started < TIMEOUT + SLACK
        server.start()  # empty: it kept nothing
        await asyncio.sleep(RESET_AFTER)
        await exactness_resumes(limiter, at_most=10)
    records = [r for r in caplog.records if r.name == "aiocache_llm.rate_limiter"]
    assert [r.levelname for r in records] == ["WARNING", "INFO"], "once per state change"
    assert f"failure_mode={mode!r}" in records[0].getMessage()
    stats = await limiter.stats()
    assert stats.backend_errors == 50
    granted_while_down = 50 if mode == "open" else 0
    assert stats.granted == 1 + granted_while_down + 1


# the gateway and the limiter's policy together


async def test_deny_on_limiter_error_with_a_fail_open_limiter_is_refused() -> None:
    limiter = RedisRateLimiter(url="redis://127.0.0.1:1/0", config=RateLimitConfig(10))
    async with limiter:
        with pytest.raises(InvalidInputError, match="failure_mode='closed' or 'raise'"):
            InferenceGateway(CountingProvider(), rate_limiter=limiter, on_limiter_error="deny")
        closed = RedisRateLimiter(
            url="redis://127.0.0.1:1/0", config=RateLimitConfig(10), failure_mode="closed"
        )
        async with (
            closed,
            InferenceGateway(CountingProvider(), rate_limiter=closed, on_limiter_error="deny"),
        ):
            pass


@pytest.mark.parametrize("rate_limit_timeout", [0.0, 2.0], ids=["check", "acquire"])
async def test_a_fail_closed_limiter_decides_even_past_the_gateways_own_deadline(
    server: RedisServer, make_limiter: Any, rate_limit_timeout: float
) -> None:
    """The gateway's deadline (0.05 s) is shorter than the limiter's (0.2 s): the gateway
    waits for the limiter's answer, so on a frozen Redis the limiter's "closed" applies, not
    the gateway's default "allow"."""
    limiter = make_limiter("closed", budget=10_000)
    provider = CountingProvider()
    gateway = InferenceGateway(
        provider, rate_limiter=limiter, backend_timeout=0.05, rate_limit_timeout=rate_limit_timeout
    )
    async with gateway:
        assert await gateway.resolve("warm", user_id=USER) == "answer:warm"
        server.freeze()
        try:
            started = time.perf_counter()
            with pytest.raises(RateLimitExceeded) as caught:
                await gateway.resolve("frozen", user_id=USER)
            assert time.perf_counter() - started <= TIMEOUT + SLACK
        finally:
            server.thaw()
        assert caught.value.user_id == USER
        if rate_limit_timeout:
            assert caught.value.retry_after == RESET_AFTER
        assert provider.calls == 1
        stats = gateway.stats()
        assert (stats.rate_limited, stats.backend_errors) == (1, 0)
        assert (await limiter.stats()).backend_errors == 1


@pytest.mark.parametrize("on_limiter_error", ["allow", "deny"])
async def test_a_raising_limiter_leaves_the_decision_to_the_gateway(
    server: RedisServer, make_limiter: Any, on_limiter_error: Any
) -> None:
    limiter = make_limiter("raise", budget=10_000)
    provider = CountingProvider()
    gateway = InferenceGateway(
        provider, rate_limiter=limiter, backend_timeout=0.5, on_limiter_error=on_limiter_error
    )
    async with gateway:
        server.freeze()
        try:
            started = time.perf_counter()
            outcome, _ = await timed(gateway.resolve("frozen", user_id=USER))
            assert time.perf_counter() - started <= TIMEOUT + SLACK
        finally:
            server.thaw()
        if on_limiter_error == "allow":
            assert outcome == "answer:frozen"
            assert provider.calls == 1
        else:
            assert isinstance(outcome, RateLimitExceeded)
            assert "on_limiter_error='deny'" in str(outcome)
            assert provider.calls == 0
        # the limiter raised, so the gateway counted it
        assert gateway.stats().backend_errors == 1
        assert (await limiter.stats()).backend_errors == 1


async def test_the_default_limiter_fails_open_under_a_gateway(
    server: RedisServer, make_limiter: Any
) -> None:
    limiter = make_limiter("open", budget=10_000)
    provider = CountingProvider()
    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        server.kill()
        answers = [await gateway.resolve(f"q{i}", user_id=USER) for i in range(5)]
        assert answers == [f"answer:q{i}" for i in range(5)]
        assert provider.calls == 5
        # the limiter answered the outage itself: counted there, not in the gateway's stats
        assert (await limiter.stats()).backend_errors == 5
        assert gateway.stats().backend_errors == 0
