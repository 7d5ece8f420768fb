"""``MemoryRateLimiter``: an exact sliding-window token budget per user, in one process."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque

from aiocache_llm.backends.rate_limits import AcquireQueues, check_config, over_budget, timed_out
from aiocache_llm.core.clock import Clock
from aiocache_llm.core.config import RateLimitConfig
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.stats import RateLimiterStats
from aiocache_llm.core.validation import (
    check_callable,
    check_id,
    check_optional_positive_number,
    check_positive_int,
)

__all__ = ["MemoryRateLimiter"]


class _Window:
    """One user's grants still in the window, oldest first, and their sum."""

    __slots__ = ("grants", "used")

    def __init__(self) -> None:
        self.grants: deque[tuple[float, int]] = deque()  # (expiry on the clock, tokens)
        self.used = 0

    def purge(self, now: float) -> None:
        grants = self.grants
        while grants and grants[0][0] <= now:
            self.used -= grants.popleft()[1]

    def refund(self, tokens: int) -> int:
        """Take up to ``tokens`` off the newest grants; return how many were given back."""
        grants = self.grants
        given = 0
        while given < tokens and grants:
            expires_at, granted = grants.pop()
            if granted > tokens - given:
                grants.append((expires_at, granted - (tokens - given)))
                given = tokens
            else:
                given += granted
        self.used -= given
        return given

    def seconds_until_fit(self, tokens: int, budget: int, now: float) -> float | None:
        """Seconds until ``tokens`` fit (None: they fit now); O(grants that must expire)."""
        excess = self.used + tokens - budget
        if excess <= 0:
            return None
        for expires_at, granted in self.grants:
            excess -= granted
            if excess <= 0:
                return expires_at - now
        # unreachable for tokens <= budget: once every grant has expired, they fit
        return self.grants[-1][0] - now


class MemoryRateLimiter(AsyncResource):
    """A sliding-window token budget per user, in this process.

    Exact sliding window: for every user and every half-open interval of
    ``config.window_seconds`` seconds, the tokens granted in it never exceed
    ``config.budget``. Tokens granted at time ``t`` free up exactly at
    ``t + window_seconds``, not before. Each user keeps a deque of its grants in the
    window and their sum, so a check is O(1) amortized (each grant is appended and
    expired once); users whose grants have all expired are forgotten (O(1) amortized
    per call, oldest first), so memory follows the users active in the last window,
    not every user ever seen.

    Time is ``clock`` in seconds; ``None`` means the running event loop's clock
    (``loop.time()``), which is what ``acquire``'s timers use, so waits are exact and
    tests can run in virtual time. An injected clock must be monotonic and, for
    ``acquire`` to wake on time, advance at the speed of real time.

    ``check_and_consume``, ``get_remaining`` and ``reset`` never yield to the event
    loop, so each is atomic. ``acquire`` calls for one user queue in FIFO order (see
    :class:`AcquireQueues`); while some wait for budget, ``check_and_consume`` for
    that user refuses rather than take the budget they wait for, and
    ``get_remaining`` still reports the free budget of the window.

    It does no I/O, so it has no ``failure_mode`` (see :class:`RedisRateLimiter`):
    nothing can fail but bad input (raised before any change) and use after
    ``aclose()``.
    """

    def __init__(self, config: RateLimitConfig, *, clock: Clock | None = None) -> None:
        self._config = check_config(config)
        self._budget = config.budget
        self._window = config.window_seconds
        self._clock: Clock | None = None if clock is None else check_callable("clock", clock)
        # user -> live grants, in the order of each user's latest grant (oldest first)
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._queues = AcquireQueues(self._check_open)
        self._granted = 0
        self._granted_tokens = 0
        self._refunded_tokens = 0
        self._refused = 0

    def __repr__(self) -> str:
        return (
            f"MemoryRateLimiter(budget={self._budget}, window_seconds={self._window:g}, "
            f"users={len(self._windows)}, waiting={self._queues.waiting}, "
            f"granted={self._granted}, refused={self._refused})"
        )

    @property
    def config(self) -> RateLimitConfig:
        """The budget and window this limiter enforces."""
        return self._config

    async def check_and_consume(self, user_id: str, tokens: int = 1) -> bool:
        """Grant ``tokens`` to ``user_id`` now if they fit in the window; else return False.

        Never waits. Refuses at once when ``tokens`` exceed the budget, and while
        ``acquire`` calls for the user wait for budget. Raises
        :class:`InvalidInputError`/:class:`InvalidInputTypeError` for an empty or
        non-``str`` ``user_id`` or ``tokens`` that is not an ``int`` > 0, before any
        change. O(1) amortized.
        """
        self._check_open()
        check_id("user_id", user_id)
        check_positive_int("tokens", tokens)
        if (
            tokens <= self._budget
            and not self._queues.blocked(user_id)
            and self._grant_if_fits(user_id, tokens)
        ):
            self._granted += 1
            self._granted_tokens += tokens
            return True
        self._refused += 1
        return False

    async def get_remaining(self, user_id: str) -> int:
        """Return the tokens free in the user's window now: the budget less live grants."""
        self._check_open()
        check_id("user_id", user_id)
        window = self._live_window(user_id, self._now())
        return self._budget - (0 if window is None else window.used)

    async def acquire(self, user_id: str, tokens: int, *, timeout: float | None = None) -> None:
        """Wait until ``tokens`` fit in the user's window, then grant them.

        Calls for one user are served in arrival order. ``timeout`` (seconds, None =
        no limit) bounds the wait: past it :class:`RateLimitExceeded` is raised with
        ``retry_after`` = seconds until the tokens would fit (ignoring calls queued
        ahead). ``tokens`` above the budget raise it at once with ``retry_after=None``.
        Cancelled while waiting, the call consumes nothing and leaves no timer or
        queue entry behind. Raises :class:`ClosedResourceError` if the limiter is
        closed meanwhile; bad arguments raise before anything changes.
        """
        self._check_open()
        check_id("user_id", user_id)
        check_positive_int("tokens", tokens)
        timeout = check_optional_positive_number("timeout", timeout)
        if tokens > self._budget:
            self._refused += 1
            raise over_budget(user_id, tokens, self._config)

        async def attempt(consume: bool) -> float | None:
            if consume and self._grant_if_fits(user_id, tokens):
                return None
            return self._seconds_until_fit(user_id, tokens)

        retry_after = await self._queues.acquire(user_id, attempt, timeout)
        if retry_after is None:
            self._granted += 1
            self._granted_tokens += tokens
            return
        self._refused += 1
        raise timed_out(user_id, tokens, timeout, retry_after)

    async def reset(self, user_id: str) -> None:
        """Forget every grant of ``user_id``; its waiting ``acquire`` calls ask again now."""
        self._check_open()
        check_id("user_id", user_id)
        self._windows.pop(user_id, None)
        self._queues.nudge(user_id)

    async def refund(self, user_id: str, tokens: int) -> int:
        """Give back up to ``tokens`` of the user's newest grants; return how many.

        For a call that used fewer tokens than it reserved: the newest grants shrink
        as if the requests had been smaller (their times are kept), and waiting
        ``acquire`` calls ask again. O(grants removed).
        """
        self._check_open()
        check_id("user_id", user_id)
        check_positive_int("tokens", tokens)
        window = self._live_window(user_id, self._now())
        if window is None:
            return 0
        given = window.refund(tokens)
        if not window.grants:
            del self._windows[user_id]  # an empty window has no newest grant to age by
        self._refunded_tokens += given
        self._queues.nudge(user_id)
        return given

    async def stats(self) -> RateLimiterStats:
        """Return the grants and refusals of this limiter (backend_errors is always 0)."""
        self._check_open()
        return RateLimiterStats(
            granted=self._granted,
            granted_tokens=self._granted_tokens,
            refunded_tokens=self._refunded_tokens,
            refused=self._refused,
        )

    def _now(self) -> float:
        clock = self._clock
        return asyncio.get_running_loop().time() if clock is None else clock()

    def _grant_if_fits(self, user_id: str, tokens: int) -> bool:
        """Grant ``tokens`` to the user if they fit now; O(1) amortized."""
        now = self._now()
        window = self._live_window(user_id, now)
        if window is None:
            window = self._windows[user_id] = _Window()
        elif window.used + tokens > self._budget:
            return False
        else:
            self._windows.move_to_end(user_id)
        window.grants.append((now + self._window, tokens))
        window.used += tokens
        return True

    def _seconds_until_fit(self, user_id: str, tokens: int) -> float | None:
        now = self._now()
        window = self._live_window(user_id, now)
        return None if window is None else window.seconds_until_fit(tokens, self._budget, now)

    def _live_window(self, user_id: str, now: float) -> _Window | None:
        windows = self._windows
        # forget users whose latest grant has expired; they are first in the order
        while windows:
            oldest = next(iter(windows.values()))
            if oldest.grants[-1][0] > now:
                break
            windows.popitem(last=False)
        window = windows.get(user_id)
        if window is not None:
            window.purge(now)
        return window

    async def _release(self) -> None:
        self._windows.clear()
        self._queues.wake_all()
