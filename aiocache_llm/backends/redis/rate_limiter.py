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
    check_release_tokens,
    check_reservation,
    check_reserve_timeout,
    check_tokens,
    over_budget,
    timed_out,
)
from aiocache_llm.backends.redis.batching import ScriptBatcher
from aiocache_llm.backends.redis.cluster import is_slot_in_motion
from aiocache_llm.backends.redis.connection import (
    DRIVER_ERRORS,
    RedisBackend,
    backend_error,
    request_topology_refresh,
)
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
from aiocache_llm.protocols import Reservation

__all__ = ["RedisRateLimiter"]

logger = logging.getLogger("aiocache_llm.rate_limiter")

T = TypeVar("T")

# CONSUME's flags
_GRANT = 1
_TELL_WAIT = 2
_RECORD = 4

CONSUME = """
-- Purge a user's expired grants, then grant tokens if they fit (or record them as used
-- whether they fit or not), or tell when they would fit.
-- A template: @BUDGET@ and @WINDOW_US@ are written in per limiter (see consume_script),
-- which spares two arguments on every call.
-- KEYS[1] grant log: sorted set, score = grant time in us on the server clock, member
--         "<us>:<seq>:<tokens>"; "<us>:<seq>" is the grant's id (seq counts the user's
--         grants, so ids never repeat) and its tokens shrink as they are given back
-- KEYS[2] meta: hash; sum = tokens in the log, seq = the newest grant's seq, span = the
--         longest window (us) that granted from the log, until = when that window's
--         need for the log ends (us; written once a shorter window shares the log)
-- ARGV[1] tokens, an integer in [0, 2^53) (0: only purge and count)
-- ARGV[2] flags: 1 = grant the tokens if they fit, 2 = tell when they would fit (and
--         the id of a grant), 4 = record the tokens as used now, fitting or not
-- returns {1 if granted or recorded else 0, tokens free in our window after the call
--          (never below 0), us until the tokens would fit (0 when they fit now or flag
--          2 is unset)}, and with flag 2 the id of the grant written ('' when none)
-- Every number is an integer below 2^53, exact in a Lua double (the log's total
-- saturates there); each one written back is formatted with %d, never as 1e+15.
local budget = @BUDGET@
local window = @WINDOW_US@
local most = 9007199254740991
local format = string.format
local tokens = tonumber(ARGV[1])
local flags = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function tokens_of(member)
    -- a member this script did not write counts for nothing (it never was a grant)
    return tonumber(string.match(member, ':(%d+)$')) or 0
end

local meta = redis.call('HMGET', KEYS[2], 'sum', 'seq', 'span', 'until')
local sum = tonumber(meta[1])
local seq = tonumber(meta[2]) or 0
local span = tonumber(meta[3])
local until_field = tonumber(meta[4])
local span_until = until_field
-- Limiters with different windows may share the log (a rolling deploy). A longer
-- window than ours needs its grants kept for that window after its newest one: the
-- log keeps every grant that long, and we count only those of our window. Until a
-- shorter window shows up, the longer one's newest grant is told by the log's expiry.
local keep = window
local register = false
if span ~= nil and span > window then
    if span_until == nil then
        span_until = now + redis.call('PTTL', KEYS[1]) * 1000
        register = span_until > now
    end
    if span_until > now then
        keep = span
    end
end

-- a grant made at t counts in a window w while now < t + w
local horizon = format('%d', now - keep)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon)
local changed = #expired > 0
if changed then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
end
local rebuilt = sum == nil
if rebuilt then
    -- no meta (first grant, or lost): count the live log, O(n) once
    sum = 0
    for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
        sum = sum + tokens_of(member)
        seq = math.max(seq, tonumber(string.match(member, '^%d+:(%d+):')) or 0)
    end
else
    for _, member in ipairs(expired) do
        sum = sum - tokens_of(member)
    end
end
-- the tokens of our window: the whole log, unless it keeps grants for a longer one
local own = '-inf'
local mine = sum
if keep > window then
    own = '(' .. format('%d', now - window)
    mine = 0
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], own, '+inf')) do
        mine = mine + tokens_of(member)
    end
end

local add = 0
local wait = 0
if flags >= 4 then
    add = math.min(tokens, most - sum)
elseif mine + tokens <= budget and sum + tokens <= most then
    if flags % 2 == 1 then
        add = tokens
    end
elseif flags % 4 >= 2 then
    -- walk our window from its oldest grant until enough tokens would have expired
    local need = mine + tokens - budget
    local first = 0
    if need <= 0 then
        wait = window -- the log's total is saturated: at most a window
    end
    while wait == 0 do
        local batch = redis.call(
            'ZRANGEBYSCORE', KEYS[1], own, '+inf', 'WITHSCORES', 'LIMIT', first, 100)
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

local id = ''
if add > 0 then
    seq = seq + 1
    sum = sum + add
    mine = mine + add
    local stamp = format('%d', now)
    id = stamp .. ':' .. format('%d', seq)
    redis.call('ZADD', KEYS[1], stamp, id .. ':' .. format('%d', add))
end

if sum <= 0 then
    redis.call('DEL', KEYS[1], KEYS[2])
elseif add > 0 then
    local ttl = window
    if keep > window then
        -- a longer window's need, which our grant does not change
        ttl = math.max(window, span_until - now)
        redis.call('HSET', KEYS[2], 'sum', format('%d', sum), 'seq', format('%d', seq))
        if register then
            redis.call('HSET', KEYS[2], 'until', format('%d', span_until))
        end
    elseif span == window and until_field == nil then
        redis.call('HSET', KEYS[2], 'sum', format('%d', sum), 'seq', format('%d', seq))
    elseif until_field == nil then
        -- ours is now the longest window granting from the log
        redis.call('HSET', KEYS[2], 'sum', format('%d', sum), 'seq', format('%d', seq),
            'span', format('%d', window))
    else
        -- and a shorter one shares it: it reads until when we need our grants kept
        redis.call('HSET', KEYS[2], 'sum', format('%d', sum), 'seq', format('%d', seq),
            'span', format('%d', window), 'until', format('%d', now + window))
    end
    -- both keys outlive the grants they keep, then vanish (HSET keeps an existing
    -- key's expiry, so only a new grant or a new meta sets it)
    ttl = math.ceil(ttl / 1000)
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
elseif changed or rebuilt or register then
    redis.call('HSET', KEYS[2], 'sum', format('%d', sum), 'seq', format('%d', seq))
    if register then
        redis.call('HSET', KEYS[2], 'until', format('%d', span_until))
    end
    if rebuilt then
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl < 0 then
            ttl = math.ceil(window / 1000)
        end
        redis.call('PEXPIRE', KEYS[2], ttl)
    end
end
local answered = 0
if add > 0 or flags >= 4 then
    answered = 1
end
local free = budget - mine
if free < 0 then
    free = 0
end
if flags % 4 >= 2 then
    return {answered, free, wait, id}
end
return {answered, free, wait}
"""


def consume_script(budget: int, window_us: int) -> str:
    """:data:`CONSUME` for one limiter's budget and window (integers, written in)."""
    return CONSUME.replace("@BUDGET@", str(int(budget))).replace("@WINDOW_US@", str(int(window_us)))


RELEASE = """
-- Give back tokens of one grant: a reservation whose call used fewer than it reserved.
-- A template: @WINDOW_US@ is written in per limiter (see release_script).
-- KEYS[1] grant log (see CONSUME), KEYS[2] meta hash
-- ARGV[1] the grant's time (us: its score), ARGV[2] its id "<us>:<seq>",
-- ARGV[3] tokens to give back, an integer in [1, 2^53)
-- returns the tokens given back: at most what the grant still holds; 0 once it has
-- left our window (its tokens are free already) or the log. Never another grant's.
local window = @WINDOW_US@
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
if tonumber(ARGV[1]) + window <= now then
    return 0
end
local head = ARGV[2] .. ':'
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])) do
    if string.sub(member, 1, #head) == head then
        local held = tonumber(string.sub(member, #head + 1)) or 0
        local given = math.min(held, tonumber(ARGV[3]))
        redis.call('ZREM', KEYS[1], member)
        if held > given then
            -- the grant keeps its time and shrinks, as if the request had been smaller
            redis.call('ZADD', KEYS[1], ARGV[1], head .. string.format('%d', held - given))
        end
        if given > 0 and redis.call('HEXISTS', KEYS[2], 'sum') == 1 then
            redis.call('HINCRBY', KEYS[2], 'sum', string.format('%d', -given))
        end
        return given
    end
end
return 0
"""


def release_script(window_us: int) -> str:
    """:data:`RELEASE` for one limiter's window (an integer, written in)."""
    return RELEASE.replace("@WINDOW_US@", str(int(window_us)))


REFUND = """
-- Give back tokens from a user's newest grants (a call used fewer than it reserved).
-- KEYS[1] grant log (see CONSUME), KEYS[2] meta hash
-- ARGV[1] tokens to give back, an integer in [1, 2^53)
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
        redis.call('ZADD', KEYS[1], score, head .. ':' .. string.format('%d', tokens - left))
        given = given + left
        left = 0
    else
        given = given + tokens
        left = left - tokens
    end
end
if given > 0 and redis.call('HEXISTS', KEYS[2], 'sum') == 1 then
    redis.call('HINCRBY', KEYS[2], 'sum', string.format('%d', -given))
end
return given
"""

_TAG_SPECIAL = frozenset("%{}")
_TAG_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})
_NO_ANSWER = object()


class _LogGrant:
    """A :class:`Reservation`'s handle: its grant's id ``<us>:<seq>`` in the user's log."""

    __slots__ = ("at", "id")

    def __init__(self, grant_id: bytes) -> None:
        self.id = grant_id
        self.at = grant_id.split(b":", 1)[0]  # the grant's time in us: its score

    def __repr__(self) -> str:
        return f"_LogGrant({self.id!r})"


class _DataError:
    """A reply refusing one user's keys (WRONGTYPE, a script failing on foreign data).

    The server answered, so it is healthy: returned through the guard instead of raised,
    so that one user's bad keys never open the breaker for every user.
    """

    __slots__ = ("error",)

    def __init__(self, error: BackendError) -> None:
        self.error = error


def _is_data_error(exc: BaseException) -> bool:
    """An error of this key, not of its node: it never counts against the node's breaker.

    A user's keys of another type or a failing script; on a cluster, the user's slot
    being migrated (TRYAGAIN until both keys are on one node, see
    :func:`is_slot_in_motion`): the node answered, its other users must not fail.
    """
    if is_slot_in_motion(exc):
        return True
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
    grant time in microseconds, member ``<us>:<seq>:<tokens>``) and a hash ``meta``
    (``sum`` of the live tokens, the grant counter ``seq``, and ``span``/``until``: the
    longest window the log serves, see below). A check removes the expired grants and
    adjusts the sum: O(log n + expired), not O(n) (only a lost ``meta`` is rebuilt
    from the log, once). Both keys expire one window
    after the user's newest grant, so idle users vanish. The braces are a Redis
    Cluster hash tag: a user's two keys share a slot (see :meth:`keys`; a
    ``key_prefix`` holding braces sets the tag itself).

    Reservations, debts and exactness are as on :class:`MemoryRateLimiter`:
    :meth:`reserve` returns a :class:`Reservation` whose :meth:`release` gives back
    only that grant's tokens (one round trip, O(log n)); :meth:`record_usage` records
    tokens used beyond a reservation, even past the budget. Budgets, token counts and a
    user's total are exact integers up to ``MAX_TOKENS`` (2**53 - 1): the scripts
    never write a number in exponent form, and larger values are refused with
    :class:`InvalidInputError` before any I/O.

    **Different windows on one prefix** (a rolling deploy changing ``window_seconds``)
    each keep their guarantee: the log keeps every grant for the longest window whose
    limiter granted less than that window ago, and each limiter counts the grants of
    its own window, all processes' included. A limiter whose window is shorter than a
    live longer one pays O(grants in its window) per check until the longer one has
    been idle for its window; with one window per prefix nothing changes.

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

    supports_cluster = True

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
        self._breaker_threshold = breaker_threshold
        self._guard = self._new_guard(f"rate limiter {self._prefix!r}")
        # on a cluster, one guard per primary (by node name): a failing primary opens
        # the breaker of its own users only
        self._node_guards: dict[str, BackendGuard] = {}
        self._guard_nodes: dict[BackendGuard, str] = {}
        # concurrent checks leave as one pipeline; each still runs atomically on its own
        self._consume = ScriptBatcher(
            self._redis, consume_script(self._budget, self._window_us), operation="check"
        )
        self._refund = self._redis.register_script(REFUND)
        self._release_script = self._redis.register_script(release_script(self._window_us))
        self._queues = AcquireQueues(self._check_open, jitter=True)
        # per guard (one per node on a cluster): whether an outage was logged, and the
        # round trips answered (tells a stale failure from an outage)
        self._outages: set[BackendGuard] = set()
        self._answers: dict[BackendGuard, int] = {}
        self._granted = 0
        self._granted_tokens = 0
        self._refunded_tokens = 0
        self._recorded_tokens = 0
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
        once). Bad arguments (``tokens`` not an ``int`` in [1, ``MAX_TOKENS``]) raise
        before any I/O. When Redis cannot answer, returns True (``failure_mode="open"``)
        or False (``"closed"``), or raises :class:`BackendError` (``"raise"``).
        """
        self._check_open()
        keys = self.keys(user_id)
        check_tokens(tokens)
        if tokens <= self._budget and not self._queues.blocked(user_id):
            try:
                granted, _, _, _ = await self._run("check_and_consume", keys, tokens, _GRANT)
            except BackendError as exc:
                granted = self._fail_open(exc)
            if granted:
                self._granted += 1
                self._granted_tokens += tokens
                return True
        self._refused += 1
        return False

    async def get_remaining(self, user_id: str) -> int:
        """Return the tokens free in the user's window now (never below 0); one round trip.

        When Redis cannot answer: the whole budget (``failure_mode="open"``), 0
        (``"closed"``), or :class:`BackendError` raised (``"raise"``).
        """
        self._check_open()
        keys = self.keys(user_id)
        try:
            _, remaining, _, _ = await self._run("get_remaining", keys, 0, 0)
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
        check_tokens(tokens)
        timeout = check_optional_positive_number("timeout", timeout)
        await self._reserve("acquire", user_id, keys, tokens, timeout)

    async def reset(self, user_id: str) -> None:
        """Forget every grant of ``user_id`` (both keys deleted); one round trip.

        Raises :class:`BackendError` when Redis cannot answer, whatever the
        ``failure_mode``: a reset that did not happen must not pass for one.
        """
        self._check_open()
        keys = self.keys(user_id)
        await self._guarded("reset", lambda: self._redis.unlink(*keys), keys[0])
        self._queues.nudge(user_id)

    async def refund(self, user_id: str, tokens: int) -> int:
        """Give back up to ``tokens`` of the user's newest grants; return how many.

        Same contract as :meth:`MemoryRateLimiter.refund` (only right when the newest
        grants are the caller's own: a call settles its grant with :meth:`release`);
        one round trip running :data:`REFUND`, atomic on the server, O(grants touched).
        When Redis cannot answer, gives nothing back (returns 0) unless
        ``failure_mode="raise"``.
        """
        self._check_open()
        keys = self.keys(user_id)
        check_tokens(tokens)
        try:
            given = int(
                await self._guarded(
                    "refund", lambda: self._refund(keys=list(keys), args=[tokens]), keys[0]
                )
            )
        except BackendError as exc:
            self._fail_open(exc)
            return 0
        self._refunded_tokens += given
        self._queues.nudge(user_id)
        return given

    async def reserve(
        self, user_id: str, tokens: int, *, timeout: float | None = None
    ) -> Reservation:
        """Grant ``tokens`` like :meth:`acquire` and return the :class:`Reservation`.

        Same contract as :meth:`MemoryRateLimiter.reserve`: ``timeout=0`` is one round
        trip that grants or raises :class:`RateLimitExceeded` with the server's
        ``retry_after``. When Redis cannot answer: a reservation holding no grant
        (``failure_mode="open"``; releasing it gives nothing back), or the error of
        :meth:`acquire`.
        """
        self._check_open()
        keys = self.keys(user_id)
        check_tokens(tokens)
        timeout = check_reserve_timeout(timeout)
        return await self._reserve("reserve", user_id, keys, tokens, timeout)

    async def release(self, reservation: Reservation, tokens: int | None = None) -> int:
        """Give back up to ``tokens`` (None: all) of what ``reservation`` still holds.

        Same contract as :meth:`MemoryRateLimiter.release`: only that grant shrinks,
        and nothing is given back once it left this limiter's window. One round trip
        running :data:`RELEASE`, atomic on the server, O(log n); none for a
        reservation holding no grant. When Redis cannot answer, gives nothing back
        (returns 0) unless ``failure_mode="raise"``.
        """
        self._check_open()
        check_reservation(reservation, _LogGrant, "RedisRateLimiter")
        tokens = check_release_tokens(tokens)
        grant = reservation.handle
        if not isinstance(grant, _LogGrant):
            return 0  # granted while Redis could not answer: nothing was recorded
        keys = self.keys(reservation.user_id)
        args: list[bytes | int] = [
            grant.at,
            grant.id,
            reservation.tokens if tokens is None else tokens,
        ]
        try:
            given = int(
                await self._guarded(
                    "release", lambda: self._release_script(keys=list(keys), args=args), keys[0]
                )
            )
        except BackendError as exc:
            self._fail_open(exc)
            return 0
        if given:
            self._refunded_tokens += given
            self._queues.nudge(reservation.user_id)
        return given

    async def record_usage(self, user_id: str, tokens: int) -> None:
        """Record ``tokens`` as used by ``user_id`` now, whether or not they fit.

        Same contract as :meth:`MemoryRateLimiter.record_usage`; one round trip
        running :data:`CONSUME`, atomic on the server. When Redis cannot answer,
        nothing is recorded unless ``failure_mode="raise"`` (which raises
        :class:`BackendError`).
        """
        self._check_open()
        keys = self.keys(user_id)
        check_tokens(tokens)
        try:
            await self._run("record_usage", keys, tokens, _RECORD)
        except BackendError as exc:
            self._fail_open(exc)
            return
        self._recorded_tokens += tokens

    async def stats(self) -> RateLimiterStats:
        """Return this process's grants, refusals and backend errors; no I/O."""
        self._check_open()
        return RateLimiterStats(
            granted=self._granted,
            granted_tokens=self._granted_tokens,
            refunded_tokens=self._refunded_tokens,
            recorded_tokens=self._recorded_tokens,
            refused=self._refused,
            backend_errors=self._backend_errors,
        )

    async def _reserve(
        self,
        operation: str,
        user_id: str,
        keys: tuple[bytes, bytes],
        tokens: int,
        timeout: float | None,
    ) -> Reservation:
        """Grant ``tokens`` once they fit (``timeout`` 0: now or never); arguments checked."""
        if tokens > self._budget:
            self._refused += 1
            raise over_budget(user_id, tokens, self._config)
        grant: _LogGrant | None = None

        async def attempt(consume: bool) -> float | None:
            nonlocal grant
            try:
                granted, _, wait_us, grant_id = await self._run(
                    operation, keys, tokens, (_GRANT if consume else 0) | _TELL_WAIT
                )
            except BackendError as exc:
                if self._fail_open(exc):
                    return None
                raise backend_down(user_id, tokens, self._retry_after) from exc
            if granted:
                grant = _LogGrant(grant_id)
                return None
            return wait_us / 1_000_000 if wait_us else None

        queues = self._queues
        try:
            if timeout == 0:
                retry_after = await queues.attempt_now(user_id, attempt)
            else:
                retry_after = await queues.acquire(user_id, attempt, timeout)
        except RateLimitExceeded:
            self._refused += 1
            raise
        if retry_after is None:
            self._granted += 1
            self._granted_tokens += tokens
            return Reservation(user_id, tokens, grant)
        self._refused += 1
        raise timed_out(user_id, tokens, timeout, retry_after)

    async def _run(
        self, operation: str, keys: tuple[bytes, bytes], tokens: int, flags: int
    ) -> tuple[int, int, int, bytes]:
        """Run :data:`CONSUME` once: (granted or recorded, tokens free, us until they
        fit, the id of the grant written: only with ``_TELL_WAIT``, else ``b""``).

        Only ``acquire``/``reserve`` ask for the wait (``_TELL_WAIT``), which costs
        O(grants that must expire); a refused ``check_and_consume`` stays O(log n +
        expired).
        """
        reply = await self._guarded(
            operation,
            lambda: self._consume.run(keys, (tokens, flags), operation=operation),
            keys[0],
        )
        return int(reply[0]), int(reply[1]), int(reply[2]), reply[3] if len(reply) > 3 else b""

    def _new_guard(self, name: str) -> BackendGuard:
        return BackendGuard(
            name,
            timeout=self._operation_timeout,
            failure_threshold=self._breaker_threshold,
            reset_after=self._retry_after,
        )

    def _guard_for(self, key: bytes) -> BackendGuard:
        """The guard of the node serving ``key``: the limiter's own on a single server.

        On a cluster each primary gets its own guard (deadline and breaker), so a
        failing primary opens the breaker for the users whose keys it serves, never
        for the others. Once the cluster promotes a replica, the slot's new primary
        has a guard of its own, closed. O(1).
        """
        name = self.node_of(key)
        if name is None:
            return self._guard
        guard = self._node_guards.get(name)
        if guard is None:
            guard = self._node_guards[name] = self._new_guard(
                f"rate limiter {self._prefix!r} on {name}"
            )
            self._guard_nodes[guard] = name
        return guard

    async def _guarded(self, operation: str, call: Callable[[], Awaitable[T]], key: bytes) -> T:
        """Run ``call`` behind the guard of ``key``'s node: its result, or
        :class:`BackendError` if no answer.

        Not answering is the driver's error (mapped), no reply before the deadline, or
        not being sent while the breaker is open. Every such failure is counted here,
        once, whatever the policy then makes of it.
        """
        failures: list[BackendError] = []
        started = False
        guard = self._guard_for(key)
        answers_before = self._answers.get(guard, 0)

        async def run() -> T | _DataError:
            nonlocal started
            started = True
            try:
                await self._ready()  # a cluster client's topology, fetched once
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

        result = await guard.call(run, _NO_ANSWER)
        if result is not _NO_ANSWER:
            self._answers[guard] = self._answers.get(guard, 0) + 1
            if guard in self._outages:
                self._outages.discard(guard)
                logger.info("%s reaches Redis again: budgets enforced", guard.name)
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
        if self._cluster is not None and not isinstance(
            error.__cause__, redis_errors.ResponseError
        ):
            # the node may be gone or frozen: let the client look for its successor
            request_topology_refresh(self._cluster, self._guard_nodes.get(guard))
        # a failure while other calls were answered is a lone or stale one, not an outage
        if guard not in self._outages and self._answers.get(guard, 0) == answers_before:
            self._outages.add(guard)
            logger.warning(
                "%s cannot reach Redis (%s): %s until it answers",
                guard.name,
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
