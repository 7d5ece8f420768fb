"""The Lua scripts of ``RedisSemanticCache`` and the Redis data layout they maintain.

Keys, with ``p`` the key prefix, ``S`` a scope digest and ``D`` an entry digest
(both 64 hex characters)::

    p:s:S:vec     hash    D -> vector (float32, little-endian)
    p:s:S:exp     zset    D -> expiry (server ms), entries with a TTL only
    p:s:S:log     stream  changes: u=token o=a d=D v=vector x=expiry | u o=r d=D | u o=n
    p:s:S:v:D     string  the encoded value (SET PX with the entry's TTL)
    p:dim         string  the dimension of every vector of the cache
    p:lru         zset    "S:D" -> last use (server us), bounded caches only

Every write (``PUT``, ``INVALIDATE``, the removals a put makes while reaping or
evicting) changes the hash and appends to the scope's log in the same script, so a
mirror that replays the log after its cursor reaches exactly the hash's state.
Log entries carry a random token, so a log deleted and restarted within the same
millisecond is never mistaken for the old one. Each script's header names its
KEYS, ARGV and reply. Times are the server's (``TIME``), never a client's clock.
"""

from __future__ import annotations

__all__ = [
    "CHANGES",
    "FETCH",
    "INVALIDATE",
    "LOG_FLOOR",
    "PUT",
    "REAP_LIMIT",
    "SYNC",
    "SYNC_SLACK",
]

_LUA_HELPERS = """
local function try(...)
    -- redis.pcall with an error (another type under one of our keys) turned into nil
    local reply = redis.pcall(...)
    if type(reply) == 'table' and reply.err then
        return nil
    end
    return reply
end

local function token_of(entry)
    -- the token of a log entry: its first field, 'u'
    local fields = entry[2]
    if fields[1] == 'u' and fields[2] then
        return fields[2]
    end
    return ''
end

local function changes_after(log_key, cursor, token, limit)
    -- the log entries after the cursor entry, or nil when that entry is not in the log
    -- any more (trimmed, log deleted or restarted) or more than `limit` follow it
    local changes = try('XRANGE', log_key, cursor, '+', 'COUNT', limit + 1)
    if changes and #changes > 0 and #changes <= limit and changes[1][1] == cursor
            and token_of(changes[1]) == token then
        return changes
    end
    return nil
end

local function log_length(vectors_key, floor)
    -- a log keeps enough changes for mirrors to catch up, about a quarter of the scope
    return math.max(floor, math.floor((try('HLEN', vectors_key) or 0) / 4))
end

local function remove_entry(base, digest, floor, token)
    -- remove entry `digest` of the scope whose keys start with `base` and log it;
    -- returns true if its vector was there
    local vectors_key = base .. ':vec'
    local removed = try('HDEL', vectors_key, digest)
    try('UNLINK', base .. ':v:' .. digest)
    try('ZREM', base .. ':exp', digest)
    if removed ~= 1 then
        return false
    end
    if (try('HLEN', vectors_key) or 0) == 0 then
        -- an empty scope leaves nothing behind; mirrors find the log gone and resync
        redis.call('UNLINK', base .. ':log', base .. ':exp')
    else
        try('XADD', base .. ':log', 'MAXLEN', '~', log_length(vectors_key, floor), '*',
            'u', token, 'o', 'r', 'd', digest)
    end
    return true
end
"""

SYNC = (
    """
-- Bring a process's mirror of one scope up to date, or answer an exact repeat at once.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] dimension (string), KEYS[5] value of the exact query (string), KEYS[6] recency (zset)
-- ARGV[1] cursor: id of the last log entry the mirror holds ('' = no mirror),
-- ARGV[2] that entry's token, ARGV[3] recency member ('' = unbounded cache),
-- ARGV[4] slack: log entries beyond the scope's size still worth fetching over a snapshot,
-- ARGV[5] token for the log entry written when a live scope's log must be restarted,
-- ARGV[6] most entries a snapshot may hold in this reply (larger scopes are scanned)
-- returns {now ms, dimension or '', mode, ...} with mode
--   'e', value                         the exact query is stored (LRU touched)
--   'd', last id, last token, changes  the log entries after the cursor (cursor excluded)
--   's', last id, last token, hgetall, zrange-withscores   a snapshot of the scope
--   'S', last id, last token           the scope is too large for one reply: scan it, then
--                                      fetch the changes after this id
--   'x'                                the exact query's value key holds another type
--   'c'                                the vectors key holds another type
"""
    + _LUA_HELPERS
    + """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dim = try('GET', KEYS[4]) or ''
local value = redis.pcall('GET', KEYS[5])
if type(value) == 'table' and value.err then
    return {now, dim, 'x'}
end
if value then
    if ARGV[3] ~= '' then
        try('ZADD', KEYS[6], 'XX', t[1] * 1000000 + t[2], ARGV[3])
    end
    return {now, dim, 'e', value}
end
local size = try('HLEN', KEYS[1])
if size == nil then
    return {now, dim, 'c'}
end
if ARGV[1] ~= '' then
    local changes = changes_after(KEYS[2], ARGV[1], ARGV[2], size + tonumber(ARGV[4]))
    if changes then
        local last = changes[#changes]
        table.remove(changes, 1)
        return {now, dim, 'd', last[1], token_of(last), changes}
    end
end
local last_id, last_token = '', ''
if size > 0 then
    local tail = try('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if tail and #tail > 0 then
        last_id, last_token = tail[1][1], token_of(tail[1])
    elseif tail then
        -- the log vanished under a live scope: restart it so later syncs are incremental
        last_token = ARGV[5]
        last_id = redis.call('XADD', KEYS[2], '*', 'u', last_token, 'o', 'n')
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl > 0 then
            redis.call('PEXPIRE', KEYS[2], ttl)
        end
    end
end
if size > tonumber(ARGV[6]) then
    return {now, dim, 'S', last_id, last_token}
end
local vectors = try('HGETALL', KEYS[1]) or {}
local expiries = try('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES') or {}
return {now, dim, 's', last_id, last_token, vectors, expiries}
"""
)

CHANGES = (
    """
-- Return the log entries of a scope after a cursor (for a mirror built by scanning).
-- KEYS[1] scope log (stream)
-- ARGV[1] cursor: id of the last log entry the mirror reflects, ARGV[2] its token,
-- ARGV[3] most entries worth fetching
-- returns {last id, last token, changes} (cursor excluded), or {} when the cursor
-- entry is no longer in the log or more than ARGV[3] entries follow it
"""
    + _LUA_HELPERS
    + """
local changes = changes_after(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]))
if not changes then
    return {}
end
local last = changes[#changes]
table.remove(changes, 1)
return {last[1], token_of(last), changes}
"""
)

FETCH = """
-- Return the value of the first candidate that still exists; mark it most recently used.
-- KEYS[1..n] candidate value keys (best first), KEYS[n+1] recency index (zset)
-- ARGV[1..n] the candidates' recency members ('S:D'), ARGV[n+1] '1' if the cache is bounded
-- returns {i, value} for the first existing candidate i, {-i} if candidate i holds
-- another type than a string, {0} if none exists
local n = #KEYS - 1
for i = 1, n do
    local value = redis.pcall('GET', KEYS[i])
    if type(value) == 'table' and value.err then
        return {-i}
    end
    if value then
        if ARGV[n + 1] == '1' then
            local t = redis.call('TIME')
            redis.pcall('ZADD', KEYS[n + 1], 'XX', t[1] * 1000000 + t[2], ARGV[i])
        end
        return {i, value}
    end
end
return {0}
"""

PUT = (
    """
-- Store one entry, reap a few expired entries of its scope, evict beyond max_size.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] entry value (string), KEYS[5] dimension (string), KEYS[6] recency index (zset)
-- ARGV[1] entry digest, ARGV[2] vector bytes, ARGV[3] encoded value, ARGV[4] ttl ms
-- ('0' = never), ARGV[5] dimension, ARGV[6] max entries ('0' = unbounded), ARGV[7] scope
-- digest, ARGV[8] key prefix, ARGV[9] log floor, ARGV[10] reap limit, ARGV[11] token
-- returns {1, entries evicted} once stored, or {0, stored dimension} (nothing written)
-- when the cache already holds vectors of another dimension
"""
    + _LUA_HELPERS
    + """
local dim = try('GET', KEYS[5])
if dim and tonumber(dim) and tonumber(dim) ~= tonumber(ARGV[5]) then
    return {0, dim}
end
if dim ~= ARGV[5] then
    redis.call('SET', KEYS[5], ARGV[5])
end
local function claim(key, kind)
    -- garbage of another type under one of our keys is replaced, never written into
    local found = redis.call('TYPE', key)['ok']
    if found ~= 'none' and found ~= kind then
        redis.call('UNLINK', key)
        return true
    end
    return false
end
if claim(KEYS[1], 'hash') then
    redis.call('UNLINK', KEYS[2], KEYS[3])
end
claim(KEYS[2], 'stream')
claim(KEYS[3], 'zset')
claim(KEYS[6], 'zset')

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local floor = tonumber(ARGV[9])
local bounded = tonumber(ARGV[6]) > 0
local written = 0
local function token()
    written = written + 1
    return ARGV[11] .. '.' .. written
end

local base = ARGV[8] .. ':s:' .. ARGV[7]
local expired = try('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[10])) or {}
for _, digest in ipairs(expired) do
    remove_entry(base, digest, floor, token())
    if bounded then
        redis.call('ZREM', KEYS[6], ARGV[7] .. ':' .. digest)
    end
end

local fresh = redis.call('EXISTS', KEYS[1]) == 0
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[4])
local expires = 0
if ttl > 0 then
    expires = now + ttl
    redis.call('SET', KEYS[4], ARGV[3], 'PX', ttl)
    redis.call('ZADD', KEYS[3], expires, ARGV[1])
else
    redis.call('SET', KEYS[4], ARGV[3])
    redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', log_length(KEYS[1], floor), '*',
    'u', token(), 'o', 'a', 'd', ARGV[1], 'v', ARGV[2], 'x', expires)

-- the scope's keys live as long as its longest-lived entry, or forever
local lifetime = -1
if ttl > 0 then
    lifetime = redis.call('PTTL', KEYS[1])
    if fresh or (lifetime >= 0 and lifetime < ttl) then
        lifetime = ttl
    end
end
for i = 1, 3 do
    if lifetime < 0 then
        redis.call('PERSIST', KEYS[i])
    else
        redis.call('PEXPIRE', KEYS[i], lifetime)
    end
end

local evicted = 0
if bounded then
    redis.call('ZADD', KEYS[6], t[1] * 1000000 + t[2], ARGV[7] .. ':' .. ARGV[1])
    local overflow = redis.call('ZCARD', KEYS[6]) - tonumber(ARGV[6])
    if overflow > 0 then
        local victims = redis.call('ZPOPMIN', KEYS[6], overflow)
        for i = 1, #victims, 2 do
            local scope, digest = string.match(victims[i], '^(%x+):(%x+)$')
            if scope and #scope == 64 and #digest == 64
                    and remove_entry(ARGV[8] .. ':s:' .. scope, digest, floor, token()) then
                evicted = evicted + 1
            end
        end
    end
end
return {1, evicted}
"""
)

INVALIDATE = (
    """
-- Remove one entry and log its removal.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] entry value (string), KEYS[5] recency index (zset)
-- ARGV[1] entry digest, ARGV[2] scope key base ('p:s:S'), ARGV[3] recency member,
-- ARGV[4] log floor, ARGV[5] token
-- returns 1 if a live entry was removed, else 0
"""
    + _LUA_HELPERS
    + """
local live = redis.call('EXISTS', KEYS[4])
remove_entry(ARGV[2], ARGV[1], tonumber(ARGV[4]), ARGV[5])
try('ZREM', KEYS[5], ARGV[3])
return live
"""
)

SYNC_SLACK = 64
"""Log entries beyond a scope's size a mirror still fetches rather than take a snapshot."""

LOG_FLOOR = SYNC_SLACK
"""Changes a scope's log keeps at least; it keeps a quarter of the scope's size if more.

A quarter bounds the log's memory to about a quarter of the vectors' while mirrors
that sync now and then still catch up change by change; a mirror further behind
takes a snapshot, as it would beyond the scope's size plus :data:`SYNC_SLACK` anyway.
"""

REAP_LIMIT = 16
"""Expired entries of its scope a put removes at most (each is O(d) and logged)."""
