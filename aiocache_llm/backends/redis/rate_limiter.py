"""``RedisRateLimiter``: the sliding-window token budget shared by every process of a fleet."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aiocache_llm.backends.rate_limits import (
    AcquireQueues,
    FailureMode,
    backend_down,
    check_config,
    check_failure_mode,
    over_budget,
    timed_out,
)
from aiocache_llm.backends.redis.batching import ScriptBatcher
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.core.config import RateLimitConfig
from aiocache_llm.core.errors import BackendError, BackendUnavailableError, RateLimitExceeded
from aiocache_llm.core.guard import BackendGuard
from aiocache_llm.core.stats import RateLimiterStats
from aiocache_llm.core.validation import (
    check_id,
    check_optional_positive_number,
    check_positive_int,
    check_positive_number,
)

__all__ = ["RedisRateLimiter"]

logger = logging.getLogger("aiocache_llm.rate_limiter")

T = TypeVar("T")

CONSUME = """
-- Purge a user's expired grants, then grant tokens if they fit, or tell when they would.
-- A template: @BUDGET@ and @WINDOW_US@ are written in per limiter (see consume_script),
-- which spares two arguments on every call.
-- KEYS[1] grant log: sorted set, score = grant time in us on the server clock,
--         member "<us>:<sum after the grant>:<tokens>" (unique: within one us the sum
--         only grows)
-- KEYS[2] meta: hash, sum = tokens in the log
-- ARGV[1] tokens (0: only purge and count),
-- ARGV[2] flags: 1 = grant the tokens if they fit, 2 = tell when they would fit
-- returns {1 if granted else 0, tokens free in the window after the call,
--          us until the tokens would fit (0 when they fit now or flag 2 is unset)}
local budget = @BUDGET@
local window = @WINDOW_US@
local tokens = tonumber(ARGV[1])
local flags = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function tokens_of(member)
    -- a member this script did not write counts for nothing (it never was a grant)
    return tonumber(string.match(member, ':(%d+)$')) or 0
end

-- a grant made at t counts while now < t + window
local horizon = string.format('%d', now - window)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon)
local changed = #expired > 0
if changed then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
end
local sum = tonumber(redis.call('HGET', KEYS[2], 'sum'))
local rebuilt = sum == nil
if rebuilt then
    -- no meta (first grant, or lost): count the live log, O(n) once
    sum = 0
    for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
        sum = sum + tokens_of(member)
    end
else
    for _, member in ipairs(expired) do
        sum = sum - tokens_of(member)
    end
end

local granted = 0
local wait = 0
if sum + tokens <= budget then
    if tokens > 0 and flags % 2 == 1 then
        sum = sum + tokens
        local stamp = string.format('%d', now)
        local member = stamp .. ':' .. string.format('%d', sum) .. ':' .. tokens
        redis.call('ZADD', KEYS[1], stamp, member)
        granted = 1
    end
elseif flags >= 2 then
    -- walk the log from its oldest grant until enough tokens would have expired
    local need = sum + tokens - budget
    local first = 0
    while wait == 0 do
        local batch = redis.call('ZRANGE', KEYS[1], first, first + 99, 'WITHSCORES')
        if #batch == 0 then
            wait = window -- the sum counts more than the log holds: wait a whole window
        end
        for i = 1, #batch, 2 do
            need = need - tokens_of(batch[i])
            if need <= 0 then
                wait = tonumber(batch[i + 1]) + window - now
                break
            end
        end
        first = first + 100
    end
end

if sum <= 0 then
    redis.call('DEL', KEYS[1], KEYS[2])
elseif granted == 1 or changed or rebuilt then
    redis.call('HSET', KEYS[2], 'sum', string.format('%d', sum))
    -- both keys outlive the newest grant by exactly one window, then vanish (HSET
    -- keeps an existing key's expiry, so only a grant or a new meta sets it)
    if granted == 1 then
        local ttl = math.ceil(window / 1000)
        redis.call('PEXPIRE', KEYS[1], ttl)
        redis.call('PEXPIRE', KEYS[2], ttl)
    elseif rebuilt then
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl < 0 then
            ttl = math.ceil(window / 1000)
        end
        redis.call('PEXPIRE', KEYS[2], ttl)
    end
end
return {granted, budget - sum, wait}
"""


def consume_script(budget: int, window_us: int) -> str:
    """:data:`CONSUME` for one limiter's budget and window (integers, written in)."""
    return CONSUME.replace("@BUDGET@", str(int(budget))).replace("@WINDOW_US@", str(int(window_us)))


REFUND = """
-- Give back tokens from a user's newest grants (a call used fewer than it reserved).
-- KEYS[1] grant log (see CONSUME), KEYS[2] meta hash
-- ARGV[1] tokens to give back
-- returns the tokens given back: at most what the log holds (members that are not
-- grants, written by someone else, are dropped on the way and give nothing)
local left = tonumber(ARGV[1])
local given = 0
while left > 0 do
    local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    if #newest == 0 then
        break
    end
    local member, score = newest[1], newest[2]
    local head, tokens = string.match(member, '^(.*):(%d+)$')
    tokens = tonumber(tokens)
    redis.call('ZREM', KEYS[1], member)
    if tokens == nil then
        -- not a grant (CONSUME never wrote it): dropped, nothing to give back
    elseif tokens > left then
        -- the grant keeps its time and shrinks, as if the request had been smaller
        redis.call('ZADD', KEYS[1], score, head .. ':' .. (tokens - left))
        given = given + left
        left = 0
    else
        given = given + tokens
        left = left - tokens
    end
end
if given > 0 and redis.call('HEXISTS', KEYS[2], 'sum') == 1 then
    redis.call('HINCRBY', KEYS[2], 'sum', -given)
end
return given
"""

_TAG_SPECIAL = frozenset("%{}")
_TAG_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})
_NO_ANSWER = object()


class _DataError:
    """A reply refusing one user's keys (WRONGTYPE, a script failing on foreign data).

    The server answered, so it is healthy: returned through the guard instead of raised,
    so that one user's bad keys never open the breaker for every user.
    """

    __slots__ = ("error",)

    def __init__(self, error: BackendError) -> None:
        self.error = error


def _is_data_error(exc: BaseException) -> bool:
    # OOM, READONLY, NOPERM and the like are their own subclasses: the server's state
    if type(exc) is not redis_errors.ResponseError:
        return False
    message = str(exc)
    return message.startswith("WRONGTYPE") or "user_script" in message


_POLICY_WORDS = {
    "open": "granting every request unmetered (failure_mode='open')",
    "closed": "refusing every request (failure_mode='closed')",
    "raise": "raising BackendUnavailableError (failure_mode='raise')",
}


class RedisRateLimiter(RedisBackend):
    """A sliding-window token budget per user, shared through Redis by every process.

    Answers every call like :class:`MemoryRateLimiter` (drop-in), with the same
    exact sliding window enforced across processes: each check is one round trip
    running the :data:`CONSUME` script, atomic on the server and timed by the
    server's clock (Redis ``TIME``), never by the clients'.

    Per user, under ``{key_prefix}:{<user_id>}:``, a sorted set ``grants`` (score =
    grant time in microseconds, member ``<us>:<sum after it>:<tokens>``) and a hash
    ``meta`` (``sum`` of the live tokens). A check removes the expired grants and
    adjusts the sum: O(log n + expired), not O(n) (only a lost ``meta`` is rebuilt
    from the log, once). Both keys expire one window
    after the user's newest grant, so idle users vanish. The braces are a Redis
    Cluster hash tag: a user's two keys share a slot (see :meth:`keys`; a
    ``key_prefix`` holding braces sets the tag itself).

    ``acquire`` calls of this process queue per user in FIFO order (see
    :class:`AcquireQueues`): the head sleeps exactly until the script says its tokens
    fit (plus up to 5 % jitter, at most 50 ms, so other processes' waiters do not
    wake together) and retries; across processes there is no queue, whoever asks
    first after the budget frees up gets it. A cancellation while sleeping consumes
    nothing; one during the round trip may leave the tokens granted (counted
    against the user, never over the budget).

    **When Redis cannot answer** (refused connection, error, no reply within
    ``operation_timeout`` seconds, or skipped while the circuit breaker is open),
    ``failure_mode`` decides:

    =============  =====================  ========================  ===================
    failure_mode   ``check_and_consume``  ``acquire``               ``get_remaining``
    =============  =====================  ========================  ===================
    ``"open"``     True                   returns (granted)         the whole budget
    ``"closed"``   False                  raises RateLimitExceeded  0
    ``"raise"``    raises BackendError    raises BackendError       raises BackendError
    =============  =====================  ========================  ===================

    Fail-open, the default, keeps an application answering through a Redis outage,
    unmetered; fail-closed protects a paid API at the price of refusing everyone
    meanwhile (``retry_after`` = ``breaker_reset_after``, when Redis is asked
    again); "raise" leaves the decision to the caller (the :class:`BackendError`
    subclass :class:`BackendUnavailableError` for an unreachable or silent server).
    ``refund`` gives nothing back in the open and closed modes (the user stays
    charged, the safe side); ``reset`` is an explicit write whose caller must know
    it failed, so it raises in every mode. Each of these events counts once in
    ``stats().backend_errors`` (an open or closed answer also in ``granted`` or
    ``refused``), and the outage is logged once when it starts (WARNING, naming the
    policy) and once when Redis answers again (INFO), never per call; no user id or
    text is logged.

    Data under a user's keys that this limiter did not write is handled per user: a
    member of the grant log that is not a grant counts for nothing (a refund drops
    it), a key of another type makes that user's calls answer by ``failure_mode``
    (``reset`` deletes both keys and heals the user); neither counts as Redis
    failing, so other users are not affected.

    Every round trip runs behind a :class:`BackendGuard`: a deadline of
    ``operation_timeout`` seconds (None = only the client's socket timeout), so a
    frozen server cannot hold a check for the 5 s socket timeout, and a circuit
    breaker that after ``breaker_threshold`` consecutive failures stops asking Redis
    for ``breaker_reset_after`` seconds (answering by the policy at once), then lets
    one probe through. A check that timed out after its script was sent may still
    have been granted on the server: counted against the user, never over the budget.
    The default timeout (0.5 s) is hundreds of times a healthy round trip.

    A Redis that evicts keys under memory pressure (``maxmemory`` with an
    ``allkeys-*`` or ``volatile-*`` policy: these keys carry a TTL) may drop a
    user's grants, and that user's window silently starts empty again. Give the
    limiter a Redis that does not evict (``noeviction``): there memory pressure is
    an error, which ``failure_mode`` handles. Granted/refused counts are this
    process's.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        client: Redis | None = None,
        config: RateLimitConfig,
        key_prefix: str = "aiocache_llm:ratelimit",
        failure_mode: FailureMode = "open",
        operation_timeout: float | None = 0.5,
        breaker_threshold: int = 3,
        breaker_reset_after: float = 5.0,
    ) -> None:
        self._config = check_config(config)
        self._failure_mode: FailureMode = check_failure_mode(failure_mode)
        self._operation_timeout = check_optional_positive_number(
            "operation_timeout", operation_timeout
        )
        check_positive_int("breaker_threshold", breaker_threshold)
        self._retry_after = check_positive_number("breaker_reset_after", breaker_reset_after)
        self._budget = config.budget
        self._window_us = max(1, round(config.window_seconds * 1_000_000))
        super().__init__(url=url, client=client, key_prefix=key_prefix)
        self._guard = BackendGuard(
            f"rate limiter {self._prefix!r}",
            timeout=self._operation_timeout,
            failure_threshold=breaker_threshold,
            reset_after=breaker_reset_after,
        )
        # concurrent checks leave as one pipeline; each still runs atomically on its own
        self._consume = ScriptBatcher(
            self._redis, consume_script(self._budget, self._window_us), operation="check"
        )
        self._refund = self._redis.register_script(REFUND)
        self._queues = AcquireQueues(self._check_open, jitter=True)
        self._outage = False
        self._answers = 0  # round trips answered: tells a stale failure from an outage
        self._granted = 0
        self._granted_tokens = 0
        self._refunded_tokens = 0
        self._refused = 0
        self._backend_errors = 0

    def __repr__(self) -> str:
        return (
            f"RedisRateLimiter(key_prefix={self._prefix!r}, budget={self._budget}, "
            f"window_seconds={self._config.window_seconds:g}, "
            f"failure_mode={self._failure_mode!r}, breaker={self._guard.state.value}, "
            f"waiting={self._queues.waiting}, granted={self._granted}, "
            f"refused={self._refused}, backend_errors={self._backend_errors})"
        )

    @property
    def config(self) -> RateLimitConfig:
        """The budget and window this limiter enforces."""
        return self._config

    @property
    def failure_mode(self) -> FailureMode:
        """What this limiter answers when Redis cannot: ``"open"``, ``"closed"`` or ``"raise"``."""
        return self._failure_mode

    @property
    def operation_timeout(self) -> float | None:
        """Seconds one round trip may take before Redis counts as not answering."""
        return self._operation_timeout

    def keys(self, user_id: str) -> tuple[bytes, bytes]:
        """Return the Redis keys of ``user_id``: its grant log and its meta hash.

        They are ``{key_prefix}:{<tag>}:grants`` and ``...:meta``, where the hash tag
        is the user id with ``%``, ``{`` and ``}`` written ``%25``, ``%7B``, ``%7D``,
        so that no id can end the tag early and distinct ids keep distinct keys.
        """
        tag = check_id("user_id", user_id)
        if not _TAG_SPECIAL.isdisjoint(tag):
            tag = tag.translate(_TAG_ESCAPES)
        base = f"{self._prefix}:{{{tag}}}:".encode()
        return base + b"grants", base + b"meta"

    async def check_and_consume(self, user_id: str, tokens: int = 1) -> bool:
        """Grant ``tokens`` to ``user_id`` now if they fit in the window; else return False.

        One round trip, atomic on the server; none when ``tokens`` exceed the budget
        or ``acquire`` calls of this process wait for the user's budget (refused at
        once). Bad arguments raise before any I/O. When Redis cannot answer, returns
        True (``failure_mode="open"``) or False (``"closed"``), or raises
        :class:`BackendError` (``"raise"``).
        """
        self._check_open()
        keys = self.keys(user_id)
        check_positive_int("tokens", tokens)
        if tokens <= self._budget and not self._queues.blocked(user_id):
            try:
                granted, _, _ = await self._run("check_and_consume", keys, tokens, grant=True)
            except BackendError as exc:
                granted = self._fail_open(exc)
            if granted:
                self._granted += 1
                self._granted_tokens += tokens
                return True
        self._refused += 1
        return False

    async def get_remaining(self, user_id: str) -> int:
        """Return the tokens free in the user's window now; one round trip (it purges).

        When Redis cannot answer: the whole budget (``failure_mode="open"``), 0
        (``"closed"``), or :class:`BackendError` raised (``"raise"``).
        """
        self._check_open()
        keys = self.keys(user_id)
        try:
            _, remaining, _ = await self._run("get_remaining", keys, 0)
        except BackendError as exc:
            return self._budget if self._fail_open(exc) else 0
        return remaining

    async def acquire(self, user_id: str, tokens: int, *, timeout: float | None = None) -> None:
        """Wait until ``tokens`` fit in the user's window, then grant them.

        Same contract as :meth:`MemoryRateLimiter.acquire`; each attempt is one
        round trip and attempts are spaced by the server's own estimate of when the
        tokens fit, so a wait costs a handful of round trips, not a poll. When an
        attempt finds Redis unable to answer, the call returns at once as granted
        (``failure_mode="open"``), raises :class:`RateLimitExceeded` with
        ``retry_after=breaker_reset_after`` (``"closed"``), or raises
        :class:`BackendError` (``"raise"``).
        """
        self._check_open()
        keys = self.keys(user_id)
        check_positive_int("tokens", tokens)
        timeout = check_optional_positive_number("timeout", timeout)
        if tokens > self._budget:
            self._refused += 1
            raise over_budget(user_id, tokens, self._config)

        async def attempt(consume: bool) -> float | None:
            try:
                granted, _, wait_us = await self._run(
                    "acquire", keys, tokens, grant=consume, tell_wait=True
                )
            except BackendError as exc:
                if self._fail_open(exc):
                    return None
                raise backend_down(user_id, tokens, self._retry_after) from exc
            return None if granted or not wait_us else wait_us / 1_000_000

        try:
            retry_after = await self._queues.acquire(user_id, attempt, timeout)
        except RateLimitExceeded:
            self._refused += 1
            raise
        if retry_after is None:
            self._granted += 1
            self._granted_tokens += tokens
            return
        self._refused += 1
        raise timed_out(user_id, tokens, timeout, retry_after)

    async def reset(self, user_id: str) -> None:
        """Forget every grant of ``user_id`` (both keys deleted); one round trip.

        Raises :class:`BackendError` when Redis cannot answer, whatever the
        ``failure_mode``: a reset that did not happen must not pass for one.
        """
        self._check_open()
        keys = self.keys(user_id)
        await self._guarded("reset", lambda: self._redis.unlink(*keys))
        self._queues.nudge(user_id)

    async def refund(self, user_id: str, tokens: int) -> int:
        """Give back up to ``tokens`` of the user's newest grants; return how many.

        Same contract as :meth:`MemoryRateLimiter.refund`; one round trip running
        :data:`REFUND`, atomic on the server, O(grants touched). When Redis cannot
        answer, gives nothing back (returns 0) unless ``failure_mode="raise"``.
        """
        self._check_open()
        keys = self.keys(user_id)
        check_positive_int("tokens", tokens)
        try:
            given = int(
                await self._guarded("refund", lambda: self._refund(keys=list(keys), args=[tokens]))
            )
        except BackendError as exc:
            self._fail_open(exc)
            return 0
        self._refunded_tokens += given
        self._queues.nudge(user_id)
        return given

    async def stats(self) -> RateLimiterStats:
        """Return this process's grants, refusals and backend errors; no I/O."""
        self._check_open()
        return RateLimiterStats(
            granted=self._granted,
            granted_tokens=self._granted_tokens,
            refunded_tokens=self._refunded_tokens,
            refused=self._refused,
            backend_errors=self._backend_errors,
        )

    async def _run(
        self,
        operation: str,
        keys: tuple[bytes, bytes],
        tokens: int,
        *,
        grant: bool = False,
        tell_wait: bool = False,
    ) -> tuple[int, int, int]:
        """Run :data:`CONSUME` once: (granted, tokens free, microseconds until they fit).

        Only ``acquire`` asks for the wait (``tell_wait``), which costs O(grants that
        must expire); a refused ``check_and_consume`` stays O(log n + expired).
        """
        args = (tokens, int(grant) + 2 * int(tell_wait))
        granted, remaining, wait_us = await self._guarded(
            operation, lambda: self._consume.run(keys, args, operation=operation)
        )
        return int(granted), int(remaining), int(wait_us)

    async def _guarded(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` behind the guard: its result, or :class:`BackendError` if no answer.

        Not answering is the driver's error (mapped), no reply before the deadline, or
        not being sent while the breaker is open. Every such failure is counted here,
        once, whatever the policy then makes of it.
        """
        failures: list[BackendError] = []
        started = False
        answers_before = self._answers

        async def run() -> T | _DataError:
            nonlocal started
            started = True
            try:
                return await call()
            except BackendError as exc:  # batched: already mapped, the driver's error as cause
                cause = exc.__cause__
                if cause is not None and _is_data_error(cause):
                    return _DataError(exc)
                failures.append(exc)
                raise
            except DRIVER_ERRORS as exc:
                error = backend_error(exc, operation)
                if _is_data_error(exc):
                    error.__cause__ = exc
                    return _DataError(error)
                failures.append(error)
                raise error from exc
            except Exception as exc:
                failures.append(BackendError(f"redis {operation} failed: {exc!r}"))
                raise failures[-1] from exc

        result = await self._guard.call(run, _NO_ANSWER)
        if result is not _NO_ANSWER:
            self._answers += 1
            if self._outage:
                self._outage = False
                logger.info("rate limiter %r reaches Redis again: budgets enforced", self._prefix)
            if isinstance(result, _DataError):
                self._backend_errors += 1
                logger.debug("rate limiter %r: %s", self._prefix, result.error)
                raise result.error
            return result  # type: ignore[return-value]
        self._backend_errors += 1
        if failures:
            error = failures[0]
        elif started:
            error = BackendUnavailableError(
                f"redis {operation} failed: no reply within {self._operation_timeout} s"
            )
        else:
            error = BackendUnavailableError(
                f"redis {operation} not sent: Redis failed repeatedly, the circuit breaker "
                f"asks again within {self._retry_after:g} s"
            )
        # a failure while other calls were answered is a lone or stale one, not an outage
        if not self._outage and self._answers == answers_before:
            self._outage = True
            logger.warning(
                "rate limiter %r cannot reach Redis (%s): %s until it answers",
                self._prefix,
                error,
                _POLICY_WORDS[self._failure_mode],
            )
        raise error

    def _fail_open(self, error: BackendError) -> bool:
        """The policy's answer to ``error``: True = grant, False = refuse, or raise it ("raise")."""
        if self._failure_mode == "raise":
            raise error
        return self._failure_mode == "open"

    async def _release(self) -> None:
        self._queues.wake_all()
        await self._consume.aclose()
        await super()._release()
