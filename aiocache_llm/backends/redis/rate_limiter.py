"""``RedisRateLimiter``: the sliding-window token budget shared by every process of a fleet."""

from __future__ import annotations

from redis.asyncio import Redis

from aiocache_llm.backends.rate_limits import AcquireQueues, check_config, over_budget, timed_out
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.core.config import RateLimitConfig
from aiocache_llm.core.stats import RateLimiterStats
from aiocache_llm.core.validation import (
    check_id,
    check_optional_positive_number,
    check_positive_int,
)

__all__ = ["RedisRateLimiter"]

CONSUME = """
-- Purge a user's expired grants, then grant tokens if they fit, or tell when they would.
-- KEYS[1] grant log: sorted set, score = grant time in us on the server clock,
--         member "<us>:<seq>:<tokens>" (unique even for grants within one us)
-- KEYS[2] meta: hash, sum = tokens in the log, seq = last grant's sequence number
-- ARGV[1] budget, ARGV[2] window in us, ARGV[3] tokens (0: only purge and count),
-- ARGV[4] '1' to grant the tokens if they fit, ARGV[5] '1' to tell when they would fit
-- returns {1 if granted else 0, tokens free in the window after the call,
--          us until the tokens would fit (0 when they fit now or ARGV[5] is '0')}
local budget = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function tokens_of(member)
    return tonumber(string.match(member, ':(%d+)$'))
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
    if tokens > 0 and ARGV[4] == '1' then
        local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
        local stamp = string.format('%d', now)
        redis.call('ZADD', KEYS[1], stamp, stamp .. ':' .. seq .. ':' .. tokens)
        sum = sum + tokens
        granted = 1
        changed = true
    end
elseif ARGV[5] == '1' then
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
elseif changed or rebuilt then
    redis.call('HSET', KEYS[2], 'sum', string.format('%d', sum))
    -- both keys outlive the newest grant by exactly one window, then vanish
    local ttl = redis.call('PTTL', KEYS[1])
    if granted == 1 or ttl < 0 then
        ttl = math.ceil(window / 1000)
    end
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
end
return {granted, budget - sum, wait}
"""

REFUND = """
-- Give back tokens from a user's newest grants (a call used fewer than it reserved).
-- KEYS[1] grant log (see CONSUME), KEYS[2] meta hash
-- ARGV[1] tokens to give back
-- returns the tokens given back: at most what the log holds
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
    if tokens > left then
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


class RedisRateLimiter(RedisBackend):
    """A sliding-window token budget per user, shared through Redis by every process.

    Answers every call like :class:`MemoryRateLimiter` (drop-in), with the same
    exact sliding window enforced across processes: each check is one round trip
    running the :data:`CONSUME` script, atomic on the server and timed by the
    server's clock (Redis ``TIME``), never by the clients'.

    Per user, under ``{key_prefix}:{<user_id>}:``, a sorted set ``grants`` (score =
    grant time in microseconds, member ``<us>:<seq>:<tokens>``) and a hash ``meta``
    (``sum`` of the live tokens, ``seq``). A check removes the expired grants and
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

    Driver errors become :class:`BackendUnavailableError`/:class:`BackendError` and
    are counted in ``stats().backend_errors``; granted/refused counts are this
    process's.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        client: Redis | None = None,
        config: RateLimitConfig,
        key_prefix: str = "aiocache_llm:ratelimit",
    ) -> None:
        self._config = check_config(config)
        self._budget = config.budget
        self._window_us = max(1, round(config.window_seconds * 1_000_000))
        super().__init__(url=url, client=client, key_prefix=key_prefix)
        self._consume = self._redis.register_script(CONSUME)
        self._refund = self._redis.register_script(REFUND)
        self._queues = AcquireQueues(self._check_open, jitter=True)
        self._granted = 0
        self._granted_tokens = 0
        self._refunded_tokens = 0
        self._refused = 0
        self._backend_errors = 0

    def __repr__(self) -> str:
        return (
            f"RedisRateLimiter(key_prefix={self._prefix!r}, budget={self._budget}, "
            f"window_seconds={self._config.window_seconds:g}, "
            f"waiting={self._queues.waiting}, granted={self._granted}, "
            f"refused={self._refused}, backend_errors={self._backend_errors})"
        )

    @property
    def config(self) -> RateLimitConfig:
        """The budget and window this limiter enforces."""
        return self._config

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
        once). Bad arguments raise before any I/O.
        """
        self._check_open()
        keys = self.keys(user_id)
        check_positive_int("tokens", tokens)
        if tokens <= self._budget and not self._queues.blocked(user_id):
            granted, _, _ = await self._run("check_and_consume", keys, tokens, grant=True)
            if granted:
                self._granted += 1
                self._granted_tokens += tokens
                return True
        self._refused += 1
        return False

    async def get_remaining(self, user_id: str) -> int:
        """Return the tokens free in the user's window now; one round trip (it purges)."""
        self._check_open()
        keys = self.keys(user_id)
        _, remaining, _ = await self._run("get_remaining", keys, 0)
        return remaining

    async def acquire(self, user_id: str, tokens: int, *, timeout: float | None = None) -> None:
        """Wait until ``tokens`` fit in the user's window, then grant them.

        Same contract as :meth:`MemoryRateLimiter.acquire`; each attempt is one
        round trip and attempts are spaced by the server's own estimate of when the
        tokens fit, so a wait costs a handful of round trips, not a poll.
        """
        self._check_open()
        keys = self.keys(user_id)
        check_positive_int("tokens", tokens)
        timeout = check_optional_positive_number("timeout", timeout)
        if tokens > self._budget:
            self._refused += 1
            raise over_budget(user_id, tokens, self._config)

        async def attempt(consume: bool) -> float | None:
            granted, _, wait_us = await self._run(
                "acquire", keys, tokens, grant=consume, tell_wait=True
            )
            return None if granted or not wait_us else wait_us / 1_000_000

        retry_after = await self._queues.acquire(user_id, attempt, timeout)
        if retry_after is None:
            self._granted += 1
            self._granted_tokens += tokens
            return
        self._refused += 1
        raise timed_out(user_id, tokens, timeout, retry_after)

    async def reset(self, user_id: str) -> None:
        """Forget every grant of ``user_id`` (both keys deleted); one round trip."""
        self._check_open()
        keys = self.keys(user_id)
        try:
            await self._redis.unlink(*keys)
        except DRIVER_ERRORS as exc:
            self._backend_errors += 1
            raise backend_error(exc, "reset") from exc
        self._queues.nudge(user_id)

    async def refund(self, user_id: str, tokens: int) -> int:
        """Give back up to ``tokens`` of the user's newest grants; return how many.

        Same contract as :meth:`MemoryRateLimiter.refund`; one round trip running
        :data:`REFUND`, atomic on the server, O(grants touched).
        """
        self._check_open()
        keys = self.keys(user_id)
        check_positive_int("tokens", tokens)
        try:
            given = int(await self._refund(keys=list(keys), args=[tokens]))
        except DRIVER_ERRORS as exc:
            self._backend_errors += 1
            raise backend_error(exc, "refund") from exc
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
        args = [self._budget, self._window_us, tokens, int(grant), int(tell_wait)]
        try:
            granted, remaining, wait_us = await self._consume(keys=list(keys), args=args)
        except DRIVER_ERRORS as exc:
            self._backend_errors += 1
            raise backend_error(exc, operation) from exc
        return int(granted), int(remaining), int(wait_us)

    async def _release(self) -> None:
        self._queues.wake_all()
        await super()._release()
