"""What both rate limiters share: the queue of waiting ``acquire`` calls, checks, errors.

:class:`AcquireQueues` keeps, per user, the ``acquire`` calls of this process that
wait for budget, in arrival order; the backend only has to answer "grant now, or in
how many seconds would these tokens fit". :data:`FailureMode` is what a limiter that
talks to a server does when the server cannot answer (the memory limiter does no
I/O, so it has no such policy).

Token counts are exact integers up to :data:`MAX_TOKENS` (2**53 - 1, the largest
integer a Redis Lua number holds exactly) on both limiters: budgets, tokens per call
and a user's total in one window. Larger budgets and token counts are refused with
:class:`InvalidInputError` before anything changes (:func:`check_tokens`).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal, cast, get_args

from aiocache_llm.core.config import RateLimitConfig
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError, RateLimitExceeded
from aiocache_llm.core.validation import check_finite_number, check_positive_int
from aiocache_llm.protocols import Reservation

__all__ = [
    "MAX_TOKENS",
    "AcquireQueues",
    "Attempt",
    "FailureMode",
    "backend_down",
    "check_config",
    "check_failure_mode",
    "check_release_tokens",
    "check_reservation",
    "check_reserve_timeout",
    "check_tokens",
    "over_budget",
    "timed_out",
]

MAX_TOKENS = 2**53 - 1
"""The largest budget, token count and per-user total both limiters hold exactly."""

FailureMode = Literal["open", "closed", "raise"]
"""What a limiter answers when its backend cannot: grant (``"open"``), refuse
(``"closed"``) or raise the :class:`BackendError` (``"raise"``)."""

_FAILURE_MODES: tuple[str, ...] = get_args(FailureMode)

Attempt = Callable[[bool], Awaitable[float | None]]
"""``attempt(consume)`` asks a backend about one request of a fixed size.

With ``consume=True`` it grants the tokens if they fit now and returns ``None``;
otherwise, and always with ``consume=False`` (which never grants), it returns the
seconds until the tokens would fit, or ``None`` when they fit now.
"""


def check_config(config: object) -> RateLimitConfig:
    """Return ``config`` if it is a :class:`RateLimitConfig` whose budget is at most MAX_TOKENS."""
    if not isinstance(config, RateLimitConfig):
        raise InvalidInputTypeError(
            f"config must be a RateLimitConfig, got {type(config).__name__}"
        )
    check_positive_int("max_tokens_per_minute", config.budget, at_most=MAX_TOKENS)
    return config


def check_tokens(value: object, name: str = "tokens") -> int:
    """Return a token count: an ``int`` in [1, :data:`MAX_TOKENS`]."""
    return check_positive_int(name, value, at_most=MAX_TOKENS)


def check_release_tokens(value: object) -> int | None:
    """Return the tokens a ``release`` gives back: None (all) or a token count."""
    return None if value is None else check_tokens(value)


def check_reserve_timeout(value: object) -> float | None:
    """Return a ``reserve`` timeout: None (no limit), 0 (no waiting) or finite seconds > 0."""
    if value is None:
        return None
    seconds = check_finite_number("timeout", value)
    if seconds < 0:
        raise InvalidInputError(f"timeout must be >= 0 or None, got {value}")
    return seconds


def check_reservation(value: object, handle_type: type, limiter: str) -> Reservation:
    """Return ``value`` if it is a :class:`Reservation` that ``limiter`` (a class name) made.

    Its handle must be ``None`` (granted unrecorded) or a ``handle_type``.
    """
    if not isinstance(value, Reservation):
        raise InvalidInputTypeError(
            f"reservation must be a Reservation returned by reserve(), got {type(value).__name__}"
        )
    if value.handle is not None and not isinstance(value.handle, handle_type):
        raise InvalidInputError(f"reservation was not made by a {limiter}")
    return value


def check_failure_mode(value: object) -> FailureMode:
    """Return ``value`` if it is one of the :data:`FailureMode` strings."""
    if not isinstance(value, str):
        raise InvalidInputTypeError(
            f"failure_mode must be a str ('open', 'closed' or 'raise'), got {type(value).__name__}"
        )
    if value not in _FAILURE_MODES:
        raise InvalidInputError(f"failure_mode must be 'open', 'closed' or 'raise', got {value!r}")
    return cast(FailureMode, value)


def over_budget(user_id: str, tokens: int, config: RateLimitConfig) -> RateLimitExceeded:
    """The error of an ``acquire`` whose tokens alone exceed the budget: it can never fit."""
    return RateLimitExceeded(
        f"{tokens} tokens can never be granted to user {user_id!r}: the budget is "
        f"{config.budget} tokens per {config.window_seconds:g} s",
        retry_after=None,
        user_id=user_id,
    )


def timed_out(
    user_id: str, tokens: int, timeout: float | None, retry_after: float
) -> RateLimitExceeded:
    """The error of an ``acquire`` that did not get its tokens within ``timeout`` (0: now)."""
    when = "now" if timeout == 0 else f"within timeout={timeout} s"
    return RateLimitExceeded(
        f"{tokens} tokens did not fit in the budget of user {user_id!r} {when}; "
        f"they would fit in {retry_after:.3f} s",
        retry_after=retry_after,
        user_id=user_id,
    )


def backend_down(user_id: str, tokens: int, retry_after: float) -> RateLimitExceeded:
    """The error of a fail-closed limiter that could not ask its backend about ``tokens``."""
    return RateLimitExceeded(
        f"{tokens} tokens refused to user {user_id!r}: the rate limiter cannot reach its "
        f"backend and fails closed; retry in {retry_after:g} s",
        retry_after=retry_after,
        user_id=user_id,
    )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Waiter:
    """One waiting ``acquire`` call: it sleeps on a future that a timer or a nudge resolves."""

    __slots__ = ("_future", "_loop", "_nudged")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None
        # a nudge that came while the call was busy (a Redis round trip) is kept for its next sleep
        self._nudged = False

    def wake(self) -> None:
        if self._future is None:
            self._nudged = True
        elif not self._loop.is_closed():  # a call of an ended loop sleeps for good
            _resolve(self._future)

    async def sleep(self, until: float | None) -> None:
        """Sleep until loop time ``until`` (None: until woken) or an earlier :meth:`wake`."""
        if self._nudged:
            self._nudged = False
            return
        future = self._future = self._loop.create_future()
        timer = None if until is None else self._loop.call_at(until, _resolve, future)
        try:
            await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()


class _Queue:
    __slots__ = ("blocked", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[_Waiter] = deque()
        # set once a queued call was refused, until the queue empties: while set,
        # check_and_consume leaves the freed budget to the queue
        self.blocked = False


class AcquireQueues:
    """The ``acquire`` calls of one rate limiter waiting for budget, a FIFO queue per user.

    Only the head of a user's queue asks the backend for budget. When refused it
    sleeps on exactly one timer, until the moment the backend says its tokens fit (or
    its deadline), then asks again; the calls behind it sleep without a timer (or on
    their deadline's) until it leaves. So calls of one process are served in arrival
    order, a large request is never starved by smaller ones behind it, and nothing
    polls. Joining and being served are O(1); leaving from the middle of a queue
    (cancellation, timeout) is O(its length). A queue is dropped as soon as it is empty.
    """

    __slots__ = ("_check_open", "_jitter", "_queues")

    def __init__(self, check_open: Callable[[], None], *, jitter: bool = False) -> None:
        self._check_open = check_open
        # other processes' waiters wake at the same instants: spread them a little
        self._jitter = jitter
        self._queues: dict[str, _Queue] = {}

    @property
    def waiting(self) -> int:
        """Number of ``acquire`` calls in the queues now."""
        return sum(len(queue.waiters) for queue in self._queues.values())

    def blocked(self, key: str) -> bool:
        """Whether calls for ``key`` wait for budget, which check_and_consume must leave them."""
        queue = self._live_queue(key)
        return queue is not None and queue.blocked

    def _live_queue(self, key: str) -> _Queue | None:
        """``key``'s queue, unless its calls belong to an event loop that has ended
        (``asyncio.run`` after ``asyncio.run``): those never leave it, so it is dropped."""
        queue = self._queues.get(key)
        if queue is not None and queue.waiters[0]._loop is not asyncio.get_running_loop():
            del self._queues[key]
            return None
        return queue

    def nudge(self, key: str) -> None:
        """Budget of ``key`` was freed (a reset): let the head of its queue ask again now."""
        queue = self._live_queue(key)
        if queue is not None:
            queue.waiters[0].wake()

    def wake_all(self) -> None:
        """Wake every waiting call, so that each one sees the limiter closed and raises."""
        for queue in self._queues.values():
            for waiter in queue.waiters:
                waiter.wake()

    async def attempt_now(self, key: str, attempt: Attempt) -> float | None:
        """Ask once, without waiting or queueing: ``None`` once granted, else the seconds
        until the tokens would fit (0.0 when they fit but queued calls wait for them:
        like ``check_and_consume``, it leaves them the budget)."""
        if self.blocked(key):
            return await attempt(False) or 0.0
        return await attempt(True)

    async def acquire(self, key: str, attempt: Attempt, timeout: float | None) -> float | None:
        """Wait for this call's turn in ``key``'s queue, then until ``attempt`` grants.

        Returns ``None`` once granted, or on timeout the seconds until the tokens would
        fit (0.0 when they fit but calls ahead of this one wait for them). Cancelled
        or failing, the call leaves the queue, cancels its timers and hands the turn
        on; a grant cannot be cancelled halfway as ``attempt`` grants atomically.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        queue = self._live_queue(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        waiter = _Waiter(loop)
        queue.waiters.append(waiter)
        try:
            while queue.waiters[0] is not waiter:
                if deadline is not None and loop.time() >= deadline:
                    return await attempt(False) or 0.0
                await waiter.sleep(deadline)
                self._check_open()
            while True:
                retry_after = await attempt(True)
                if retry_after is None:
                    return None
                queue.blocked = True
                now = loop.time()
                if deadline is not None and now >= deadline:
                    return retry_after
                wake_at = now + retry_after
                if self._jitter:
                    wake_at += random.uniform(0.0, min(0.05, 0.001 + retry_after / 20))
                await waiter.sleep(wake_at if deadline is None else min(wake_at, deadline))
                self._check_open()
        finally:
            was_head = queue.waiters[0] is waiter
            queue.waiters.remove(waiter)
            if not queue.waiters:
                if self._queues.get(key) is queue:
                    del self._queues[key]
            elif was_head:
                queue.waiters[0].wake()
