"""``TokenBudget``: how the gateway charges provider calls to a user's rate limit.

Before a provider call it reserves the query's estimated tokens; afterwards it
settles with the usage the answer reports: it records what was used beyond the
reservation (even past the budget, a debt the user's next requests wait out) and
gives back only that reservation's unused tokens; a failed or cancelled call gives
its whole reservation back. Limiter failures go through the gateway's guard and the
``on_limiter_error`` policy.

What it can do depends on the limiter's capabilities, checked by protocol, never by
class: an :class:`AsyncReservingRateLimiter` reserves with handles (a refund only ever
shrinks the call's own grant); an :class:`AsyncUsageRecordingRateLimiter` records
usage beyond the reservation. A limiter with neither is charged the extra by
``check_and_consume`` when it fits, and is never refunded (a refund that cannot name
its grant could give back tokens another call used). An
:class:`AsyncBudgetedRateLimiter` tells its budget and window, so a refusal of a check
that does not wait says when to retry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocache_llm.core.config import RateLimitConfig
from aiocache_llm.core.errors import InvalidInputError, RateLimitExceeded
from aiocache_llm.core.guard import BackendGuard
from aiocache_llm.core.query import Query
from aiocache_llm.gateway.tokens import reported_tokens
from aiocache_llm.protocols import (
    AsyncBudgetedRateLimiter,
    AsyncRateLimiter,
    AsyncReservingRateLimiter,
    AsyncUsageRecordingRateLimiter,
    Reservation,
)

__all__ = ["BudgetHold", "TokenBudget"]

_UNANSWERED = object()


@dataclass(frozen=True, eq=False)
class BudgetHold:
    """What one provider call reserved: ``tokens`` for ``user``, through ``reservation``
    when the limiter returns handles (None otherwise)."""

    user: str
    tokens: int
    reservation: Reservation | None


class TokenBudget:
    """Reserves, settles and refunds a user's tokens around one provider call.

    ``wait`` is how long a reservation may wait for budget: 0 refuses at once, a
    number waits that long and None as long as it takes. ``deny_when_down`` refuses
    (True) or allows (False) a call when the limiter cannot answer. ``refused`` counts
    the :class:`RateLimitExceeded` raised.
    """

    def __init__(
        self,
        limiter: AsyncRateLimiter,
        guard: BackendGuard,
        *,
        estimate_tokens: Callable[[Query], int],
        wait: float | None,
        deny_when_down: bool,
    ) -> None:
        self._limiter = limiter
        self._guard = guard
        self._estimate = estimate_tokens
        self._wait = wait
        self._deny_when_down = deny_when_down
        self._reserving = limiter if isinstance(limiter, AsyncReservingRateLimiter) else None
        self._recording = limiter if isinstance(limiter, AsyncUsageRecordingRateLimiter) else None
        self._budget: int | None = None
        self._window: float | None = None
        config = limiter.config if isinstance(limiter, AsyncBudgetedRateLimiter) else None
        # the check sees only that a ``config`` exists: a foreign one tells nothing
        if isinstance(config, RateLimitConfig):
            self._budget = config.budget
            self._window = float(config.window_seconds)
        self.refused = 0

    async def reserve(self, query: Query, user: str) -> BudgetHold | None:
        """Reserve the estimated tokens of ``query`` for ``user``.

        Returns the hold to settle afterwards, or None when nothing was reserved (the
        limiter could not answer and the policy allows the call). Raises
        :class:`RateLimitExceeded` (naming ``user``; ``retry_after=None`` when the
        estimate alone exceeds the budget) when the budget refuses, and
        :class:`InvalidInputError` when the estimator returns no positive int.

        After a limiter outage, the breaker's probe is a quick ``get_remaining``, not
        this reservation: a wait for budget tells nothing about the limiter's health,
        and other users' reservations are checked as soon as it answers.
        """
        limiter = self._limiter
        tokens = self._estimate(query)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise InvalidInputError(f"estimate_tokens must return an int > 0, got {tokens!r}")
        wait = self._wait
        reserving = self._reserving

        async def consume() -> Reservation | bool:
            if reserving is not None:
                return await reserving.reserve(user, tokens, timeout=wait)
            if wait == 0:
                return await limiter.check_and_consume(user, tokens)
            await limiter.acquire(user, tokens, timeout=wait)
            return True

        try:
            granted = await self._guard.call(
                consume, _UNANSWERED, probe=lambda: limiter.get_remaining(user)
            )
        except RateLimitExceeded as exc:
            self.refused += 1
            raise RateLimitExceeded(str(exc), retry_after=exc.retry_after, user_id=user) from exc
        if granted is _UNANSWERED:
            if self._deny_when_down:
                self.refused += 1
                raise RateLimitExceeded(
                    "the rate limiter is unavailable and on_limiter_error='deny'",
                    retry_after=None,
                    user_id=user,
                )
            return None
        if granted is False:
            self.refused += 1
            # a check that does not wait cannot say when; one window is an upper bound,
            # and tokens beyond the whole budget never fit
            never = self._budget is not None and tokens > self._budget
            raise RateLimitExceeded(
                f"user {user!r} is over the token budget ({tokens} tokens requested)",
                retry_after=None if never else self._window,
                user_id=user,
            )
        reservation = granted if isinstance(granted, Reservation) else None
        return BudgetHold(user, tokens, reservation)

    async def reconcile(self, hold: BudgetHold | None, answer: Any) -> None:
        """Settle ``hold`` with the tokens ``answer`` reports (none reported: keep it)."""
        await self.settle(hold, reported_tokens(answer))

    async def settle(self, hold: BudgetHold | None, used: int | None) -> None:
        """Settle ``hold`` with the tokens the call ``used`` (None: keep the reservation).

        More than reserved: the extra is recorded, even past the budget. Less: the rest
        of this hold's own grant is given back (0 after a failed call: all of it).
        """
        if hold is None or used is None or used == hold.tokens:
            return
        user = hold.user
        if used > hold.tokens:
            extra = used - hold.tokens
            recording = self._recording
            if recording is not None:
                await self._guard.call(lambda: recording.record_usage(user, extra), None)
            else:
                limiter = self._limiter
                await self._guard.call(lambda: limiter.check_and_consume(user, extra), None)
            return
        reservation, reserving = hold.reservation, self._reserving
        if reservation is not None and reserving is not None:
            unused = hold.tokens - used
            await self._guard.call(lambda: reserving.release(reservation, unused), None)
