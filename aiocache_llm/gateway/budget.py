"""``TokenBudget``: how the gateway charges provider calls to a user's rate limit.

Before a provider call it reserves the query's estimated tokens; afterwards it
reconciles with the usage the answer reports (charging the excess, refunding the
rest when the limiter has ``refund``); a failed or cancelled call is refunded.
Limiter failures go through the gateway's guard and the ``on_limiter_error`` policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiocache_llm.core.errors import InvalidInputError, RateLimitExceeded
from aiocache_llm.core.guard import BackendGuard
from aiocache_llm.core.query import Query
from aiocache_llm.gateway.tokens import reported_tokens
from aiocache_llm.protocols import AsyncRateLimiter

__all__ = ["TokenBudget"]

_UNANSWERED = object()


class TokenBudget:
    """Reserves, reconciles and refunds a user's tokens around one provider call.

    ``wait`` is how long a reservation may wait for budget: 0 refuses at once
    (``check_and_consume``), a number waits that long and None as long as it takes
    (``acquire``). ``deny_when_down`` refuses (True) or allows (False) a call when
    the limiter cannot answer. ``refused`` counts the :class:`RateLimitExceeded` raised.
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
        self.refused = 0

    async def reserve(self, query: Query, user: str) -> int:
        """Reserve the estimated tokens of ``query`` for ``user``; return them (0 = none).

        Raises :class:`RateLimitExceeded` (naming ``user``) when the budget refuses,
        and :class:`InvalidInputError` when the estimator returns no positive int.
        """
        limiter = self._limiter
        tokens = self._estimate(query)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise InvalidInputError(f"estimate_tokens must return an int > 0, got {tokens!r}")
        wait = self._wait

        async def consume() -> bool:
            if wait == 0:
                return await limiter.check_and_consume(user, tokens)
            await limiter.acquire(user, tokens, timeout=wait)
            return True

        try:
            granted = await self._guard.call(consume, _UNANSWERED)
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
            return 0
        if not granted:
            self.refused += 1
            # a check that does not wait cannot say when; one window is an upper bound
            window = getattr(getattr(limiter, "config", None), "window_seconds", None)
            raise RateLimitExceeded(
                f"user {user!r} is over the token budget ({tokens} tokens requested)",
                retry_after=float(window) if isinstance(window, (int, float)) else None,
                user_id=user,
            )
        return tokens

    async def reconcile(self, user: str, reserved: int, answer: Any) -> None:
        """Charge what ``answer`` reports beyond ``reserved``, or refund what it did not use."""
        await self.settle(user, reserved, reported_tokens(answer))

    async def settle(self, user: str, reserved: int, used: int | None) -> None:
        """Charge ``used`` beyond ``reserved``, or refund the rest (None: keep the reservation)."""
        if not reserved or used is None or used == reserved:
            return
        if used > reserved:
            limiter, extra = self._limiter, used - reserved
            await self._guard.call(lambda: limiter.check_and_consume(user, extra), None)
        else:
            await self.refund(user, reserved - used)

    async def refund(self, user: str, tokens: int) -> None:
        """Give ``tokens`` back to ``user`` if the limiter supports refunds."""
        refund = getattr(self._limiter, "refund", None)
        if tokens and refund is not None:
            await self._guard.call(lambda: refund(user, tokens), None)
