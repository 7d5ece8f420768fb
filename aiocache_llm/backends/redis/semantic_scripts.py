"""The Lua scripts of ``RedisSemanticCache`` and the Redis data layout they maintain.

Keys, with ``p`` the key prefix, ``S`` a scope digest and ``D`` an entry digest
(both 64 hex characters)::

    p:s:S:vec     hash    D -> vector (float32, little-endian)
    p:s:S:txt     hash    D -> the text that was embedded (UTF-8), for verifiers
    p:s:S:exp     zset    D -> expiry (server ms), entries with a TTL only
    p:s:S:log     stream  changes: u=token o=a d=D v=vector x=expiry | u o=r d=D | u o=n
    p:s:S:v:D     string  the encoded value (SET PX with the entry's TTL)
    p:s:S:pr:D    set     keys of exact-cache entries promoted from entry D (same TTL)
    p:dim         string  the dimension of every vector of the cache
    p:lru         zset    "S:D" -> last use (server us), bounded caches only
    p:lru:exp     zset    "S:D" -> expiry (server ms), bounded caches, entries with a TTL

A promotion (see :mod:`aiocache_llm.backends.promotion`) is an entry of a
``RedisExactCache`` on the same server, ``E:X`` with ``E`` its key prefix and ``X``
a 64-character digest; that cache's bounded indexes are ``E:lru`` and ``E:lru:exp``.
Whenever entry ``D`` is removed (invalidated, replaced, reaped, evicted), the keys in
``p:s:S:pr:D`` are deleted and dropped from those indexes in the same script.

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
    "DROP_PROMOTIONS",
    "FETCH",
    "FETCH_TEXTS",
    "INVALIDATE",
    "LINK_PROMOTION",
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

local function claim(key, kind)
    -- garbage of another type under one of our keys is replaced, never written into
    local found = redis.call('TYPE', key)['ok']
    if found ~= 'none' and found ~= kind then
        redis.call('UNLINK', key)
        return true
    end
    return false
end

local function exact_prefix(key)
    -- the key prefix of an exact-cache entry key 'E:<64 hex>', or nil for anything else
    local prefix, digest = string.match(key, '^(.+):(%x+)$')
    if prefix and #digest == 64 then
        return prefix
    end
    return nil
end

local function drop_promotion(key)
    -- delete a promoted exact-cache entry and drop it from that cache's indexes
    local prefix = exact_prefix(key)
    if prefix then
        redis.call('UNLINK', key)
        try('ZREM', prefix .. ':lru', key)
        try('ZREM', prefix .. ':lru:exp', key)
    end
end

local function drop_promotions(promotions_key)
    -- delete every promotion recorded in `promotions_key`, then the record
    for _, key in ipairs(try('SMEMBERS', promotions_key) or {}) do
        drop_promotion(key)
    end
    redis.call('UNLINK', promotions_key)
end

local function remove_entry(base, digest, floor, token)
    -- remove entry `digest` of the scope whose keys start with `base` and log it;
    -- its promotions go with it; returns true if its vector was there
    local vectors_key = base .. ':vec'
    local removed = try('HDEL', vectors_key, digest)
    try('HDEL', base .. ':txt', digest)
    try('UNLINK', base .. ':v:' .. digest)
    try('ZREM', base .. ':exp', digest)
    drop_promotions(base .. ':pr:' .. digest)
    if removed ~= 1 then
        return false
    end
    if (try('HLEN', vectors_key) or 0) == 0 then
        -- an empty scope leaves nothing behind; mirrors find the log gone and resync
        redis.call('UNLINK', base .. ':log', base .. ':exp', base .. ':txt')
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
--   'e', value, ms left                the exact query is stored (LRU touched); ms left
--                                      is its value's remaining lifetime (-1 = none)
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
    return {now, dim, 'e', value, redis.call('PTTL', KEYS[5])}
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
-- returns {i, value, ms left} for the first existing candidate i (ms left: its
-- remaining lifetime, -1 = none), {-i} if candidate i holds another type than a
-- string, {0} if none exists
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
        return {i, value, redis.call('PTTL', KEYS[i])}
    end
end
return {0}
"""

FETCH_TEXTS = """
-- The texts of some candidates (for a verifier) and the value of the first that exists.
-- KEYS[1..n] candidate value keys (best first), KEYS[n+1] scope texts (hash),
-- KEYS[n+2] recency index (zset)
-- ARGV[1..n] the candidates' digests, ARGV[n+1..2n] their recency members ('S:D'),
-- ARGV[2n+1] '1' to mark the first existing candidate most recently used
-- returns {i, value, ms left, texts} as FETCH does for the first existing candidate i
-- ({-i, 0, 0, texts} if it holds another type than a string, {0, 0, 0, texts} if none
-- exists), where texts[j] is candidate j's text, 0 if its value is gone, or 1 if it
-- has no text (stored by an earlier version)
local n = (#KEYS - 2)
local texts = {}
local first, value, left = 0, 0, 0
for i = 1, n do
    local exists = redis.call('EXISTS', KEYS[i]) == 1
    if exists and first == 0 then
        local found = redis.pcall('GET', KEYS[i])
        if type(found) == 'table' and found.err then
            first = -i
        else
            first, value, left = i, found, redis.call('PTTL', KEYS[i])
            if ARGV[2 * n + 1] == '1' then
                local t = redis.call('TIME')
                redis.pcall('ZADD', KEYS[n + 2], 'XX', t[1] * 1000000 + t[2], ARGV[n + i])
            end
        end
    end
    if exists then
        local text = redis.pcall('HGET', KEYS[n + 1], ARGV[i])
        if type(text) ~= 'string' then
            text = 1
        end
        texts[i] = text
    else
        texts[i] = 0
    end
end
return {first, value, left, texts}
"""

PUT = (
    """
-- Store one entry, reap a few expired entries of its scope, evict beyond max_size.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] entry value (string), KEYS[5] dimension (string), KEYS[6] recency index (zset),
-- KEYS[7] expiry index of a bounded cache (zset), KEYS[8] the entry's promotions (set),
-- KEYS[9] scope texts (hash)
-- ARGV[1] entry digest, ARGV[2] vector bytes, ARGV[3] encoded value, ARGV[4] ttl ms
-- ('0' = never), ARGV[5] dimension, ARGV[6] max entries ('0' = unbounded), ARGV[7] scope
-- digest, ARGV[8] key prefix, ARGV[9] log floor, ARGV[10] reap limit, ARGV[11] token,
-- ARGV[12] the entry's text
-- returns {1, live entries evicted} once stored, or {0, stored dimension} (nothing
-- written) when the cache already holds vectors of another dimension
-- A bounded cache reaps expired entries of any scope before it evicts a live one (as
-- many as the bound needs, plus up to the reap limit); those are not evictions.
-- Replacing an entry deletes its promotions: they copy the value it replaces.
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
if claim(KEYS[1], 'hash') then
    redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[9])
end
claim(KEYS[9], 'hash')
claim(KEYS[2], 'stream')
claim(KEYS[3], 'zset')
claim(KEYS[6], 'zset')
claim(KEYS[7], 'zset')
drop_promotions(KEYS[8])

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
        redis.call('ZREM', KEYS[7], ARGV[7] .. ':' .. digest)
    end
end

local fresh = redis.call('EXISTS', KEYS[1]) == 0
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[9], ARGV[1], ARGV[12])
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
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[9]}) do
    if lifetime < 0 then
        redis.call('PERSIST', key)
    else
        redis.call('PEXPIRE', key, lifetime)
    end
end

local function remove_member(member)
    -- remove the entry a recency member 'S:D' names; true if it was there
    local scope, digest = string.match(member, '^(%x+):(%x+)$')
    return scope ~= nil and #scope == 64 and #digest == 64
        and remove_entry(ARGV[8] .. ':s:' .. scope, digest, floor, token())
end

local evicted = 0
if bounded then
    local member = ARGV[7] .. ':' .. ARGV[1]
    redis.call('ZADD', KEYS[6], t[1] * 1000000 + t[2], member)
    if ttl > 0 then
        redis.call('ZADD', KEYS[7], expires, member)
    else
        redis.call('ZREM', KEYS[7], member)
    end
    local overflow = redis.call('ZCARD', KEYS[6]) - tonumber(ARGV[6])
    -- expired entries of any scope still hold slots until reaped: they go first
    local stale = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now,
        'LIMIT', 0, math.max(overflow, 0) + tonumber(ARGV[10]))
    for _, old in ipairs(stale) do
        redis.call('ZREM', KEYS[7], old)
        if redis.call('ZREM', KEYS[6], old) == 1 then
            overflow = overflow - 1
        end
        remove_member(old)
    end
    if overflow > 0 then
        local victims = redis.call('ZPOPMIN', KEYS[6], overflow)
        for i = 1, #victims, 2 do
            redis.call('ZREM', KEYS[7], victims[i])
            if remove_member(victims[i]) then
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
-- Remove one entry (and its promotions) and log its removal.
-- KEYS[1] scope vectors (hash), KEYS[2] scope log (stream), KEYS[3] scope expiries (zset),
-- KEYS[4] entry value (string), KEYS[5] recency index (zset), KEYS[6] expiry index
-- (zset), KEYS[7] the entry's promotions (set)
-- ARGV[1] entry digest, ARGV[2] scope key base ('p:s:S'), ARGV[3] recency member,
-- ARGV[4] log floor, ARGV[5] token
-- returns 1 if a live entry was removed, else 0
"""
    + _LUA_HELPERS
    + """
local live = redis.call('EXISTS', KEYS[4])
remove_entry(ARGV[2], ARGV[1], tonumber(ARGV[4]), ARGV[5])
try('ZREM', KEYS[5], ARGV[3])
try('ZREM', KEYS[6], ARGV[3])
return live
"""
)

LINK_PROMOTION = (
    """
-- Tie a promoted exact-cache entry to the entry it copies, so that it goes with it.
-- KEYS[1] the entry's value (string), KEYS[2] the entry's promotions (set),
-- KEYS[3] the promoted entry ('E:X', in a RedisExactCache on this server)
-- returns 1 once tied (the promotion then expires no later than the entry), or 0 when
-- the entry is gone (the promotion is deleted at once)
"""
    + _LUA_HELPERS
    + """
local left = redis.call('PTTL', KEYS[1])
if left == -2 then
    drop_promotion(KEYS[3])
    return 0
end
claim(KEYS[2], 'set')
redis.call('SADD', KEYS[2], KEYS[3])
if left < 0 then
    redis.call('PERSIST', KEYS[2])
    return 1
end
redis.call('PEXPIRE', KEYS[2], left)
local own = redis.call('PTTL', KEYS[3])
if own == -1 or own > left then
    -- put with the lifetime the entry had when it was read: trim it to what is left
    redis.call('PEXPIRE', KEYS[3], left)
    local prefix = exact_prefix(KEYS[3])
    if prefix and try('ZSCORE', prefix .. ':lru', KEYS[3]) then
        local t = redis.call('TIME')
        try('ZADD', prefix .. ':lru:exp', t[1] * 1000 + math.floor(t[2] / 1000) + left, KEYS[3])
    end
end
return 1
"""
)

DROP_PROMOTIONS = (
    """
-- Delete the promotions recorded for some entries, and the records (clear()).
-- KEYS[1..n] entries' promotions (sets)
-- returns the number of records handled
"""
    + _LUA_HELPERS
    + """
for _, key in ipairs(KEYS) do
    drop_promotions(key)
end
return #KEYS
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
