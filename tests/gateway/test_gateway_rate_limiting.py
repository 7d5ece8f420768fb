"""The gateway's token budget (issue 10): reservations, settling, limiter outages.

Each test that both limiters can run is run on memory (fake clock), fakeredis and the
real Redis (short real windows), through ``InferenceGateway.resolve`` and streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aiocache_llm import (
    AsyncRateLimiter,
    BackendUnavailableError,
    InferenceGateway,
    MemoryRateLimiter,
    RateLimitConfig,
    RateLimiterStats,
    RateLimitExceeded,
    RedisRateLimiter,
)
from aiocache_llm.protocols import AsyncReservingRateLimiter, AsyncUsageRecordingRateLimiter
from tests.conftest import Backend
from tests.gateway.fakes import CountingProvider

pytestmark = pytest.mark.timeout(30)


def message(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def text_of(query: Any) -> str:
    return str(query["messages"][-1]["content"])


@pytest.fixture
async def make_limiter(backend: Backend) -> AsyncIterator[Callable[..., AsyncRateLimiter]]:
    """Limiters of the backend under test: memory on the fake clock, Redis strict."""
    made: list[AsyncRateLimiter] = []

    def make(budget: int, window: float) -> AsyncRateLimiter:
        config = RateLimitConfig(budget, window)
        limiter: AsyncRateLimiter
        if backend.redis is None:
            limiter = MemoryRateLimiter(config, clock=backend.clock)
        else:
            limiter = RedisRateLimiter(
                client=backend.redis.client,
                key_prefix=backend.redis.prefix,
                config=config,
                failure_mode="raise",
                operation_timeout=None,
            )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


def window_of(backend: Backend) -> float:
    return 10.0 if backend.is_memory else 0.6


async def outcomes(calls: list[Any]) -> tuple[int, int]:
    """(answers, rate-limit refusals) of ``calls`` run one after the other."""
    answered = refused = 0
    for call in calls:
        try:
            await call
            answered += 1
        except RateLimitExceeded:
            refused += 1
    return answered, refused


def test_both_limiters_have_the_capabilities_the_gateway_checks() -> None:
    memory = MemoryRateLimiter(RateLimitConfig(10))
    redis = RedisRateLimiter(url="redis://127.0.0.1:1/0", config=RateLimitConfig(10))
    for limiter in (memory, redis):
        assert isinstance(limiter, AsyncReservingRateLimiter)
        assert isinstance(limiter, AsyncUsageRecordingRateLimiter)
    assert not isinstance(BaseOnlyLimiter(memory), AsyncReservingRateLimiter)
    assert not isinstance(BaseOnlyLimiter(memory), AsyncUsageRecordingRateLimiter)


# 1. a provider error (full refund) plus get_remaining unmetered everybody


async def test_a_failed_call_and_get_remaining_never_unmeter_the_gateway(
    make_limiter: Callable[..., AsyncRateLimiter], backend: Backend
) -> None:
    w = window_of(backend)
    limiter = make_limiter(3, w)
    provider = CountingProvider()
    gateway = InferenceGateway(provider, rate_limiter=limiter, estimate_tokens=lambda q: 1)
    async with gateway:
        await gateway.resolve(message("a0"), user_id="alice")
        await backend.wait(0.4 * w)
        await gateway.resolve(message("b0"), user_id="bob")
        await backend.wait(0.1 * w)
        provider.fail_with = RuntimeError("provider down")
        with pytest.raises(RuntimeError):
            await gateway.resolve(message("a1"), user_id="alice")  # its grant goes back
        provider.fail_with = None
        await backend.wait(0.6 * w)  # alice's first grant expired, bob's has not
        assert await limiter.get_remaining("alice") == 3
        await backend.wait(0.4 * w)
        answered, refused = await outcomes(
            [gateway.resolve(message(f"c{i}"), user_id="carol") for i in range(20)]
        )
        assert (answered, refused) == (3, 17)
        assert gateway.stats().backend_errors == 0


# 2. tokens used beyond the reservation were silently not charged


async def test_tokens_used_beyond_the_reservation_are_always_charged(
    make_limiter: Callable[..., AsyncRateLimiter], backend: Backend
) -> None:
    limiter = make_limiter(1000, 60.0)

    async def provider(query: Any) -> dict[str, Any]:
        return {"answer": text_of(query), "usage": {"total_tokens": 5000}}

    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        await gateway.resolve(message("q0"), user_id="alice")  # reserved ~266, used 5000
        assert await limiter.get_remaining("alice") == 0
        with pytest.raises(RateLimitExceeded):
            await gateway.resolve(message("q1"), user_id="alice")
        stats = await limiter.stats()
    assert stats.granted == 1
    assert stats.granted_tokens + stats.recorded_tokens == 5000


async def test_a_stream_that_used_more_than_it_reserved_is_charged_in_full(
    make_limiter: Callable[..., AsyncRateLimiter],
) -> None:
    limiter = make_limiter(1000, 60.0)

    async def provider(query: Any) -> Any:
        async def chunks() -> AsyncIterator[Any]:
            yield {"choices": [{"delta": {"content": "hello"}}]}
            yield {"choices": [], "usage": {"total_tokens": 3000}}

        return chunks()

    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:
        async for _ in gateway.stream(message("q0"), user_id="alice"):
            pass
        assert await limiter.get_remaining("alice") == 0
        stats = await limiter.stats()
    assert stats.granted_tokens + stats.recorded_tokens == 3000


# 3. a refund took tokens off the user's newest grants, not the call's own


async def test_a_call_gives_back_only_its_own_reservation(
    make_limiter: Callable[..., AsyncRateLimiter], backend: Backend
) -> None:
    """A provider slower than the window: call a's grant has expired when it ends; its
    refund used to shrink call b's live grant, letting c in (1500 tokens in a window
    with a budget of 1000)."""
    w = window_of(backend)
    limiter = make_limiter(1000, w)
    estimates = {"a": 600, "b": 600, "c": 900}
    used = {"a": 100, "b": 600, "c": 900}
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def provider(query: Any) -> dict[str, Any]:
        name = text_of(query)
        if name in gates:
            await gates[name].wait()
        return {"name": name, "usage": {"total_tokens": used[name]}}

    gateway = InferenceGateway(
        provider, rate_limiter=limiter, estimate_tokens=lambda q: estimates[text_of(q)]
    )
    async with gateway:
        a = asyncio.create_task(gateway.resolve(message("a"), user_id="u"))
        await asyncio.sleep(0.02)  # a reserved its 600 and waits for its provider
        await backend.wait(1.1 * w)
        b = asyncio.create_task(gateway.resolve(message("b"), user_id="u"))
        await asyncio.sleep(0.02)
        gates["a"].set()
        await a  # a used 100 of a grant that already left the window: nothing to give back
        assert await limiter.get_remaining("u") == 400
        with pytest.raises(RateLimitExceeded):
            await gateway.resolve(message("c"), user_id="u")
        gates["b"].set()
        await b
        assert await limiter.get_remaining("u") == 400


async def test_overlapping_calls_each_settle_their_own_reservation(
    make_limiter: Callable[..., AsyncRateLimiter],
) -> None:
    limiter = make_limiter(1000, 60.0)
    estimates = {"a": 300, "b": 400, "c": 200}
    used = {"a": 100, "b": 450, "c": 0}
    gates = {name: asyncio.Event() for name in estimates}

    async def provider(query: Any) -> dict[str, Any]:
        name = text_of(query)
        await gates[name].wait()
        if name == "c":
            raise RuntimeError("provider down")
        return {"name": name, "usage": {"total_tokens": used[name]}}

    gateway = InferenceGateway(
        provider, rate_limiter=limiter, estimate_tokens=lambda q: estimates[text_of(q)]
    )
    async with gateway:
        calls = {
            name: asyncio.create_task(gateway.resolve(message(name), user_id="u"))
            for name in estimates
        }
        await asyncio.sleep(0.02)
        assert await limiter.get_remaining("u") == 100
        for name in ("a", "c", "b"):  # the oldest first, then the newest, then the middle
            gates[name].set()
            await asyncio.gather(calls[name], return_exceptions=True)
        assert await limiter.get_remaining("u") == 1000 - 100 - 450
        stats = await limiter.stats()
    assert (stats.granted_tokens, stats.refunded_tokens, stats.recorded_tokens) == (900, 400, 50)


# 4. after an outage, the breaker's probe was a reservation waiting for budget


class BaseOnlyLimiter:
    """An AsyncRateLimiter with the base protocol only, failing while ``down`` is set."""

    def __init__(self, inner: MemoryRateLimiter) -> None:
        self.inner = inner
        self.down = False

    @property
    def config(self) -> RateLimitConfig:
        return self.inner.config

    def _check(self) -> None:
        if self.down:
            raise BackendUnavailableError("the limiter is down")

    async def check_and_consume(self, user_id: str, tokens: int = 1) -> bool:
        self._check()
        return await self.inner.check_and_consume(user_id, tokens)

    async def get_remaining(self, user_id: str) -> int:
        self._check()
        return await self.inner.get_remaining(user_id)

    async def acquire(self, user_id: str, tokens: int, *, timeout: float | None = None) -> None:
        self._check()
        await self.inner.acquire(user_id, tokens, timeout=timeout)

    async def reset(self, user_id: str) -> None:
        self._check()
        await self.inner.reset(user_id)

    async def stats(self) -> RateLimiterStats:
        return await self.inner.stats()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> BaseOnlyLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class DownReservingLimiter(MemoryRateLimiter):
    """A reserving limiter failing while ``down`` is set (it stands for any backend)."""

    down = False

    def _check_open(self) -> None:
        super()._check_open()
        if self.down:
            raise BackendUnavailableError("the limiter is down")


@pytest.mark.parametrize("kind", ["base", "reserving"])
async def test_after_an_outage_a_user_waiting_for_budget_leaves_the_others_metered(
    kind: str,
) -> None:
    """The breaker's half-open probe used to be the first reservation: a user over budget
    waited rate_limit_timeout, and every other reservation meanwhile was skipped and
    allowed uncharged (20 of 20 granted against a budget of 2)."""
    limiter: Any
    if kind == "base":
        limiter = BaseOnlyLimiter(MemoryRateLimiter(RateLimitConfig(2)))
    else:
        limiter = DownReservingLimiter(RateLimitConfig(2))
    provider = CountingProvider()
    gateway = InferenceGateway(
        provider,
        rate_limiter=limiter,
        rate_limit_timeout=0.3,
        breaker_threshold=1,
        breaker_reset_after=0.05,
        estimate_tokens=lambda q: 1,
    )
    async with gateway:
        for i in range(2):
            await gateway.resolve(message(f"hog {i}"), user_id="hog")
        limiter.down = True
        await gateway.resolve(message("during"), user_id="hog")  # fails open: "allow"
        assert gateway._limiter_guard.state.value == "open"
        limiter.down = False
        await asyncio.sleep(0.06)
        hog = asyncio.create_task(gateway.resolve(message("hog again"), user_id="hog"))
        await asyncio.sleep(0.01)  # hog is the first after the outage, and waits for budget
        results = await asyncio.gather(
            *(gateway.resolve(message(f"bob {i}"), user_id="bob") for i in range(20)),
            return_exceptions=True,
        )
        answered = [r for r in results if isinstance(r, str)]
        assert len(answered) == 2
        assert all(isinstance(r, RateLimitExceeded) for r in results if not isinstance(r, str))
        with pytest.raises(RateLimitExceeded):
            await hog
        stats = gateway.stats()
    assert stats.backend_skipped == 0
    assert provider.calls == 2 + 1 + 2


# 5. a reservation larger than the whole budget said retry_after=60


@pytest.mark.parametrize("kind", ["reserving", "base"])
async def test_a_reservation_larger_than_the_whole_budget_is_never_worth_a_retry(
    kind: str,
) -> None:
    memory = MemoryRateLimiter(RateLimitConfig(100))
    limiter: Any = memory if kind == "reserving" else BaseOnlyLimiter(memory)
    provider = CountingProvider()
    async with InferenceGateway(provider, rate_limiter=limiter) as gateway:  # estimate ~266
        with pytest.raises(RateLimitExceeded) as caught:
            await gateway.resolve(message("too large"), user_id="alice")
        assert caught.value.retry_after is None
        assert caught.value.user_id == "alice"
    assert provider.calls == 0


async def test_a_refusal_says_when_the_reservation_would_fit(
    make_limiter: Callable[..., AsyncRateLimiter], backend: Backend
) -> None:
    w = window_of(backend)
    limiter = make_limiter(10, w)
    gateway = InferenceGateway(
        CountingProvider(), rate_limiter=limiter, estimate_tokens=lambda q: 6
    )
    async with gateway:
        await gateway.resolve(message("first"), user_id="alice")
        await backend.wait(0.5 * w)
        with pytest.raises(RateLimitExceeded) as caught:
            await gateway.resolve(message("second"), user_id="alice")
    retry_after = caught.value.retry_after
    assert retry_after is not None
    assert 0.5 * w - 0.25 <= retry_after <= 0.5 * w  # not a whole window: when it fits
