"""``MemoryRateLimiter``: an exact sliding-window token budget per user, in one process."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque

from aiocache_llm.backends.rate_limits import (
    MAX_TOKENS,
    AcquireQueues,
    check_config,
    check_release_tokens,
    check_reservation,
    check_reserve_timeout,
    check_tokens,
    over_budget,
    timed_out,
)
from aiocache_llm.core.clock import Clock
from aiocache_llm.core.config import RateLimitConfig
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.stats import RateLimiterStats
from aiocache_llm.core.validation import (
    check_callable,
    check_id,
    check_optional_positive_number,
)
from aiocache_llm.protocols import Reservation

__all__ = ["MemoryRateLimiter"]

_window_ids = itertools.count(1)


class _Grant:
    """Tokens granted (or recorded) at one instant; a :class:`Reservation`'s handle.

    ``tokens`` only shrinks, as tokens are given back. ``window_id`` names the window
    it was appended to, so that a handle outliving it (reset, forgotten) gives nothing.
    """

    __slots__ = ("expires_at", "tokens", "window_id")

    def __init__(self, expires_at: float, tokens: int, window_id: int) -> None:
        self.expires_at = expires_at
        self.tokens = tokens
        self.window_id = window_id


class _Window:
    """One user's grants still in the window, oldest first, and their sum.

    ``expires_at`` is when the newest grant ever appended expires. Grants are appended
    in clock order and given back only by shrinking in place or popping the newest, so
    it never moves back: the limiter keeps windows in its order (see ``_live_window``).
    """

    __slots__ = ("expires_at", "grants", "id", "used")

    def __init__(self) -> None:
        self.grants: deque[_Grant] = deque()
        self.used = 0
        self.expires_at = 0.0
        self.id = next(_window_ids)

    def append(self, expires_at: float, tokens: int) -> _Grant:
        grant = _Grant(expires_at, tokens, self.id)
        self.grants.append(grant)
        self.used += tokens
        self.expires_at = expires_at
        return grant

    def purge(self, now: float) -> None:
        grants = self.grants
        while grants and grants[0].expires_at <= now:
            self.used -= grants.popleft().tokens

    def give_back(self, grant: _Grant, tokens: int) -> int:
        """Shrink one live grant of this window by up to ``tokens``; return how many."""
        given = min(tokens, grant.tokens)
        grant.tokens -= given
        self.used -= given
        return given

    def refund_newest(self, tokens: int) -> int:
        """Take up to ``tokens`` off the newest grants; return how many were given back."""
        grants = self.grants
        given = 0
        while given < tokens and grants:
            newest = grants[-1]
            given += self.give_back(newest, tokens - given)
            if newest.tokens == 0:
                grants.pop()
        return given

    def seconds_until_fit(self, tokens: int, budget: int, now: float) -> float | None:
        """Seconds until ``tokens`` fit (None: they fit now); O(grants that must expire)."""
        excess = self.used + tokens - budget
        if excess <= 0:
            return None
        for grant in self.grants:
            excess -= grant.tokens
            if excess <= 0:
                return grant.expires_at - now
        # unreachable for tokens <= budget: once every grant has expired, they fit
        return self.expires_at - now


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

    Grants can be reservations (:meth:`reserve` returns a :class:`Reservation`):
    :meth:`release` gives back what that one call did not use, never another call's
    tokens. Tokens a call used beyond its reservation are recorded with
    :meth:`record_usage`, even past the budget: a debt that counts in the window like a
    grant, so the user's next requests wait until the window is back under budget.
    Token counts are exact integers up to :data:`MAX_TOKENS` (2**53 - 1), like the Redis
    twin's; a user's total in one window saturates there (usage recorded beyond it is
    not counted; grants never go past the budget).

    Time is ``clock`` in seconds; ``None`` means the running event loop's clock
    (``loop.time()``), which is what ``acquire``'s timers use, so waits are exact and
    tests can run in virtual time. An injected clock must be monotonic and, for
    ``acquire`` to wake on time, advance at the speed of real time.

    ``check_and_consume``, ``get_remaining``, ``reset``, ``refund``, ``release`` and
    ``record_usage`` never yield to the event loop, so each is atomic. ``acquire`` and
    ``reserve`` calls for one user queue in FIFO order (see :class:`AcquireQueues`);
    while some wait for budget, ``check_and_consume`` for that user refuses rather than
    take the budget they wait for, and ``get_remaining`` still reports the free budget
    of the window.

    It does no I/O, so it has no ``failure_mode`` (see :class:`RedisRateLimiter`):
    nothing can fail but bad input (raised before any change) and use after
    ``aclose()``.
    """

    def __init__(self, config: RateLimitConfig, *, clock: Clock | None = None) -> None:
        self._config = check_config(config)
        self._budget = config.budget
        self._window = config.window_seconds
        self._clock: Clock | None = None if clock is None else check_callable("clock", clock)
        # user -> live grants, in the order of each window's expires_at (oldest first)
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._queues = AcquireQueues(self._check_open)
        self._granted = 0
        self._granted_tokens = 0
        self._refunded_tokens = 0
        self._recorded_tokens = 0
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
        non-``str`` ``user_id`` or ``tokens`` that is not an ``int`` in [1,
        ``MAX_TOKENS``], before any change. O(1) amortized.
        """
        self._check_open()
        check_id("user_id", user_id)
        check_tokens(tokens)
        if (
            tokens <= self._budget
            and not self._queues.blocked(user_id)
            and self._grant_if_fits(user_id, tokens) is not None
        ):
            self._granted += 1
            self._granted_tokens += tokens
            return True
        self._refused += 1
        return False

    async def get_remaining(self, user_id: str) -> int:
        """Return the tokens free in the user's window now: the budget less live grants.

        Never negative: while recorded usage keeps the user past the budget, it is 0.
        """
        self._check_open()
        check_id("user_id", user_id)
        window = self._live_window(user_id, self._now())
        return self._budget if window is None else max(0, self._budget - window.used)

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
        check_tokens(tokens)
        timeout = check_optional_positive_number("timeout", timeout)
        await self._reserve(user_id, tokens, timeout)

    async def reset(self, user_id: str) -> None:
        """Forget every grant of ``user_id``; its waiting ``acquire`` calls ask again now.

        Reservations made before give nothing back afterwards.
        """
        self._check_open()
        check_id("user_id", user_id)
        self._windows.pop(user_id, None)
        self._queues.nudge(user_id)

    async def refund(self, user_id: str, tokens: int) -> int:
        """Give back up to ``tokens`` of the user's newest grants; return how many.

        The newest grants shrink as if the requests had been smaller (their times are
        kept), and waiting ``acquire`` calls ask again. O(grants touched). Only right
        when the caller knows the newest grants are its own: with calls of the user
        overlapping it may give back another call's tokens, so a call settles its own
        grant with :meth:`release` instead.
        """
        self._check_open()
        check_id("user_id", user_id)
        check_tokens(tokens)
        window = self._live_window(user_id, self._now())
        if window is None:
            return 0
        given = window.refund_newest(tokens)
        self._refunded_tokens += given
        self._queues.nudge(user_id)
        return given

    async def reserve(
        self, user_id: str, tokens: int, *, timeout: float | None = None
    ) -> Reservation:
        """Grant ``tokens`` like :meth:`acquire` and return the :class:`Reservation`.

        ``timeout=0`` never waits (nor queues): granted now, or
        :class:`RateLimitExceeded` with ``retry_after`` = seconds until the tokens would
        fit (0.0 when queued ``acquire`` calls wait for the free budget). ``tokens``
        above the budget raise it with ``retry_after=None``: they can never fit.
        Otherwise the same contract as :meth:`acquire`.
        """
        self._check_open()
        check_id("user_id", user_id)
        check_tokens(tokens)
        timeout = check_reserve_timeout(timeout)
        return await self._reserve(user_id, tokens, timeout)

    async def release(self, reservation: Reservation, tokens: int | None = None) -> int:
        """Give back up to ``tokens`` (None: all) of what ``reservation`` still holds.

        Returns the tokens given back. Only that reservation's grant shrinks (as if its
        request had been smaller, its time kept): never another call's tokens, never
        recorded usage. Once the grant has left the window (or the user was reset) its
        tokens are free already and nothing is given back. Waiting ``acquire`` calls ask
        again. O(1). Raises :class:`InvalidInputTypeError` for anything but a
        :class:`Reservation`, :class:`InvalidInputError` for one of another kind of
        limiter or bad ``tokens``, before any change.
        """
        self._check_open()
        check_reservation(reservation, _Grant, "MemoryRateLimiter")
        tokens = check_release_tokens(tokens)
        grant = reservation.handle
        if not isinstance(grant, _Grant):
            return 0  # granted without a record: nothing to give back
        now = self._now()
        window = self._live_window(reservation.user_id, now)
        if window is None or grant.window_id != window.id or grant.expires_at <= now:
            return 0
        given = window.give_back(grant, grant.tokens if tokens is None else tokens)
        if given:
            self._refunded_tokens += given
            self._queues.nudge(reservation.user_id)
        return given

    async def record_usage(self, user_id: str, tokens: int) -> None:
        """Record ``tokens`` as used by ``user_id`` now, whether or not they fit.

        For tokens a call used beyond what it reserved: they count in the window like
        a grant made now, even past the budget (a debt), so the user's next requests
        wait until enough has expired; ``get_remaining`` reports 0 meanwhile. The
        user's total saturates at ``MAX_TOKENS``. O(1); bad arguments raise before any
        change.
        """
        self._check_open()
        check_id("user_id", user_id)
        check_tokens(tokens)
        now = self._now()
        window = self._live_window(user_id, now)
        recorded = min(tokens, MAX_TOKENS - (0 if window is None else window.used))
        if recorded > 0:
            self._append(user_id, window, now, recorded)
        self._recorded_tokens += tokens

    async def stats(self) -> RateLimiterStats:
        """Return the grants and refusals of this limiter (backend_errors is always 0)."""
        self._check_open()
        return RateLimiterStats(
            granted=self._granted,
            granted_tokens=self._granted_tokens,
            refunded_tokens=self._refunded_tokens,
            recorded_tokens=self._recorded_tokens,
            refused=self._refused,
        )

    def _now(self) -> float:
        clock = self._clock
        return asyncio.get_running_loop().time() if clock is None else clock()

    async def _reserve(self, user_id: str, tokens: int, timeout: float | None) -> Reservation:
        """Grant ``tokens`` once they fit (``timeout`` 0: now or never); arguments checked."""
        if tokens > self._budget:
            self._refused += 1
            raise over_budget(user_id, tokens, self._config)
        granted: _Grant | None = None

        async def attempt(consume: bool) -> float | None:
            nonlocal granted
            if consume:
                granted = self._grant_if_fits(user_id, tokens)
                if granted is not None:
                    return None
            return self._seconds_until_fit(user_id, tokens)

        queues = self._queues
        if timeout == 0:
            retry_after = await queues.attempt_now(user_id, attempt)
        else:
            retry_after = await queues.acquire(user_id, attempt, timeout)
        if retry_after is None:
            self._granted += 1
            self._granted_tokens += tokens
            return Reservation(user_id, tokens, granted)
        self._refused += 1
        raise timed_out(user_id, tokens, timeout, retry_after)

    def _grant_if_fits(self, user_id: str, tokens: int) -> _Grant | None:
        """Grant ``tokens`` to the user if they fit now; O(1) amortized."""
        now = self._now()
        window = self._live_window(user_id, now)
        if window is not None and window.used + tokens > self._budget:
            return None
        return self._append(user_id, window, now, tokens)

    def _append(self, user_id: str, window: _Window | None, now: float, tokens: int) -> _Grant:
        """Append a grant made now to the user's live ``window`` (None: a new one), which
        becomes the last in the order: its newest grant expires last."""
        if window is None:
            window = self._windows[user_id] = _Window()
        else:
            self._windows.move_to_end(user_id)
        return window.append(now + self._window, tokens)

    def _seconds_until_fit(self, user_id: str, tokens: int) -> float | None:
        now = self._now()
        window = self._live_window(user_id, now)
        return None if window is None else window.seconds_until_fit(tokens, self._budget, now)

    def _live_window(self, user_id: str, now: float) -> _Window | None:
        windows = self._windows
        # forget users whose newest grant has expired; they are first in the order
        while windows:
            oldest = next(iter(windows.values()))
            if oldest.expires_at > now:
                break
            windows.popitem(last=False)
        window = windows.get(user_id)
        if window is not None:
            window.purge(now)
        return window

    async def _release(self) -> None:
        self._windows.clear()
        self._queues.wake_all()
