"""``BackendGuard``: per-operation timeout and circuit breaker around one storage backend.

The gateway never lets a cache failure fail a resolve. Each backend call goes
through its guard, which bounds it with a deadline, turns failures into a fallback
value, counts them, and after ``failure_threshold`` consecutive failures *opens*:
calls are skipped (no I/O at all) for ``reset_after`` seconds, then one probe call
is let through (*half open*); its success closes the breaker again. A call whose
duration says nothing about the backend's health (a rate limiter waiting for budget)
names a quick ``probe`` to be asked instead, so the breaker closes as soon as the
backend answers, not when that wait ends. State changes
are logged once each (WARNING when opening, INFO when closing), never per call, and
log lines carry only the backend's name and the error, never prompt or answer text.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiocache_llm.core.clock import Clock
from aiocache_llm.core.deadline import Watchdog
from aiocache_llm.core.errors import (
    AiocacheLLMError,
    InvalidInputError,
    InvalidInputTypeError,
    RateLimitExceeded,
)
from aiocache_llm.core.validation import (
    check_optional_positive_number,
    check_positive_int,
    check_positive_number,
)

__all__ = ["BackendGuard", "BreakerState"]

logger = logging.getLogger("aiocache_llm.guard")

T = TypeVar("T")
F = TypeVar("F")


class BreakerState(str, enum.Enum):
    """Where a :class:`BackendGuard`'s circuit breaker stands."""

    CLOSED = "closed"
    """Calls go through."""
    OPEN = "open"
    """Calls are skipped until ``reset_after`` has passed."""
    HALF_OPEN = "half_open"
    """One probe call is in flight; others are skipped until it ends."""


class BackendGuard:
    """Runs backend calls with a deadline and a circuit breaker; never raises their failures.

    ``call(fn, fallback)`` returns ``fn()``'s result, or ``fallback`` when the
    breaker is open, when ``fn`` overruns ``timeout`` seconds or raises. Failures
    (:class:`BackendError`, timeouts, ``OSError``, anything a custom backend raises)
    count towards opening the breaker; a value the backend refuses
    (:class:`InvalidInputError`, e.g. too large) is counted in ``errors`` but says
    nothing about the backend's health, so it does not. :class:`RateLimitExceeded`
    is a limiter's answer, not a failure: it propagates.
    Cancellation of the caller is never swallowed.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float | None = 0.5,
        failure_threshold: int = 3,
        reset_after: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self._timeout = check_optional_positive_number("timeout", timeout)
        self._watchdog = None if self._timeout is None else Watchdog(self._timeout)
        self._threshold = check_positive_int("failure_threshold", failure_threshold)
        self._reset_after = check_positive_number("reset_after", reset_after)
        self._clock: Clock = clock or time.monotonic
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self.errors = 0
        """Calls that failed (any exception) or timed out."""
        self.skipped = 0
        """Calls not made because the breaker was open."""

    def __repr__(self) -> str:
        return (
            f"BackendGuard({self.name!r}, state={self._state.value}, timeout={self._timeout}, "
            f"errors={self.errors}, skipped={self.skipped})"
        )

    @property
    def state(self) -> BreakerState:
        """The breaker's state now (an open breaker past ``reset_after`` reads HALF_OPEN)."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self._reset_after
        ):
            return BreakerState.HALF_OPEN
        return self._state

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        fallback: F,
        *,
        probe: Callable[[], Awaitable[object]] | None = None,
    ) -> T | F:
        """Return ``await fn()``, or ``fallback`` if skipped, timed out or failed.

        ``probe`` (optional) is a quick call that only tells whether the backend
        answers. When this call is the one a half-open breaker lets through, the probe
        runs first, under the same deadline, and decides: answered, the breaker closes
        and ``fn`` runs as an ordinary call; failed, the breaker opens again and
        ``fallback`` is returned without calling ``fn``. Without it, ``fn`` is the probe
        and the breaker stays half open (other calls skipped) for as long as ``fn`` runs.
        """
        if self._state is not BreakerState.CLOSED:
            if not self._admit():
                self.skipped += 1
                return fallback
            if probe is not None and not await self._probe(probe):
                return fallback  # counted; the breaker is open again
        settled = False
        try:
            if self._watchdog is None:
                result = await fn()
            else:
                with self._watchdog.watch():
                    result = await fn()
            settled = True
        except RateLimitExceeded:
            # a limiter's refusal is an answer from a healthy backend
            settled = True
            self._on_success()
            raise
        except (InvalidInputError, InvalidInputTypeError) as exc:
            # the backend refused a value (oversized, unserializable): it is healthy
            settled = True
            self.errors += 1
            logger.warning("%s refused a value: %s", self.name, type(exc).__name__)
            self._on_success()
            return fallback
        except Exception as exc:
            # BackendError, TimeoutError, OSError, or a user-supplied backend failing
            # its own way: none of them may fail the resolve
            settled = True
            self._on_failure(exc)
            return fallback
        finally:
            if not settled and self._state is BreakerState.HALF_OPEN:
                # the probe was cancelled before it could tell: let the next call probe
                self._state = BreakerState.OPEN
                self._opened_at = self._clock() - self._reset_after
        self._on_success()
        return result

    async def _probe(self, probe: Callable[[], Awaitable[object]]) -> bool:
        """Ask ``probe`` under the deadline as the half-open breaker's probe.

        Returns True once it answered (the breaker closed; a refusal or a refused
        value is an answer too), False when it failed (the breaker opened again).
        """
        settled = False
        try:
            if self._watchdog is None:
                await probe()
            else:
                with self._watchdog.watch():
                    await probe()
            settled = True
        except (RateLimitExceeded, InvalidInputError, InvalidInputTypeError):
            settled = True
        except Exception as exc:
            settled = True
            self._on_failure(exc)
            return False
        finally:
            if not settled:
                # cancelled before it could tell: let the next call probe
                self._state = BreakerState.OPEN
                self._opened_at = self._clock() - self._reset_after
        self._on_success()
        return True

    def _admit(self) -> bool:
        if self._state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self._reset_after:
                return False
            self._state = BreakerState.HALF_OPEN
            return True  # this caller is the probe
        return False  # HALF_OPEN: a probe is already in flight

    def _on_success(self) -> None:
        self._consecutive_failures = 0
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            logger.info("%s is answering again", self.name)

    def _on_failure(self, exc: BaseException) -> None:
        self.errors += 1
        self._consecutive_failures += 1
        reason = _describe(exc)
        if self._state is BreakerState.OPEN:
            # a call that was in flight when the breaker opened: count it, nothing more
            # (re-opening would restart the skip period and log the same outage again)
            logger.debug("%s call failed while skipped: %s", self.name, reason)
        elif self._state is BreakerState.HALF_OPEN:
            self._open()
            logger.debug("%s probe failed (%s); skipping it again", self.name, reason)
        elif self._consecutive_failures >= self._threshold:
            self._open()
            logger.warning(
                "%s failing (%s): skipping it for %.1f s",
                self.name,
                reason,
                self._reset_after,
            )
        else:
            logger.debug("%s call failed: %s", self.name, reason)

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()


def _describe(exc: BaseException) -> str:
    """What a log line may say about a failure: never a foreign exception's text.

    The library's own errors are written to name the operation and the driver's
    error; anything else (a custom backend, an embed function) may quote its input,
    a prompt, so only its type is logged.
    """
    if isinstance(exc, AiocacheLLMError) and str(exc):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
