"""``RedisChatMemory``: conversation histories shared by every process that uses the same prefix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aiocache_llm.backends.chat_messages import (
    ChatMessageCodec,
    check_config,
    check_conv_id,
    check_messages,
    no_start_error,
)
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES
from aiocache_llm.core.config import ChatMemoryConfig
from aiocache_llm.core.errors import BackendError, CorruptEntryError
from aiocache_llm.core.stats import ChatMemoryStats

__all__ = ["RedisChatMemory"]

APPEND_MESSAGES = """
-- Append messages to a conversation; beyond ARGV[1] messages, trim it to the oldest of the
-- newest ARGV[1] that may start a history; refresh the expiry.
-- KEYS[1] conversation key (a list of stored messages, oldest first)
-- ARGV[1] messages to keep, ARGV[2] ttl in ms ('0' = none),
-- ARGV[3..] the encoded messages, oldest first
-- returns the number of messages kept, or -1 (nothing written) when a trim is needed and
-- none of the newest ARGV[1] messages may start a history
-- The rule is chat_messages.first_kept: a message may start unless its stored form
-- begins with a continuation prefix (chat_messages.CONTINUATION_PREFIXES).
local continuation = '{"may_start":false,'
local seed_tool = '{"role":"tool",'
local function may_start(message)
    return string.sub(message, 1, #continuation) ~= continuation
        and string.sub(message, 1, #seed_tool) ~= seed_tool
end
local keep = tonumber(ARGV[1])
-- LLEN first: on a key that is not a list it fails before anything is written
local stored = redis.call('LLEN', KEYS[1])
local total = stored + #ARGV - 2
local start = -1
if total <= keep then
    start = 0
else
    for index = total - keep, total - 1 do
        local message
        if index < stored then
            -- counted from the tail: the window is the newest messages
            message = redis.call('LINDEX', KEYS[1], index - stored)
        else
            message = ARGV[3 + index - stored]
        end
        if may_start(message) then
            start = index
            break
        end
    end
end
if start < 0 then
    return -1
end
-- in slices: unpack has a stack limit
for first = 3, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
if start > 0 then
    redis.call('LTRIM', KEYS[1], start, -1)
end
if ARGV[2] ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return total - start
"""


_KEY_SPECIAL = frozenset("%:")
_KEY_ESCAPES = str.maketrans({"%": "%25", ":": "%3A"})


class RedisChatMemory(RedisBackend):
    """A bounded message history per conversation, shared through Redis.

    Answers every call like :class:`MemoryChatMemory` (drop-in). A conversation is a
    Redis ``LIST`` under ``{key_prefix}:{conv_id}`` (any Unicode id, with ``%`` and
    ``:`` escaped, see :meth:`key`) holding one compact JSON element per message,
    oldest first, so other tools can read it: ``{"role", "content"}`` (the form every
    version writes and reads) or ``{"may_start": bool, "message": {...}}`` for a
    message of any other shape or a tool result (see ``chat_messages``).

    Every append is one round trip: the ``APPEND_MESSAGES`` Lua script pushes, trims
    (beyond the bound, to the oldest of the newest ``2 * max_turns`` messages that may
    start a history, found by ``LINDEX`` from the tail: usually one element looked at) and refreshes
    the expiry with ``PEXPIRE`` (milliseconds, so sub-second TTLs work) atomically on
    the server. A script rather than a MULTI/EXEC pipeline because a script stops at
    its first failing command: if the key holds something that is not a list,
    ``LLEN`` fails and nothing else runs, while in a transaction ``PEXPIRE`` would
    still change that key's expiry. Cancelling a call may leave its command executed
    or not, never half executed. Concurrent appends from any number of processes are
    serialized by Redis: none is lost and each writer's messages keep its order.

    ``get_history`` is one ``LRANGE``, O(messages kept); reads do not refresh the TTL.
    ``clear`` is one ``UNLINK``. An append that Redis did not confirm raises
    :class:`BackendUnavailableError`/:class:`BackendError`, never drops silently; data
    under a conversation's key that this library did not write (a non-list, or an
    element that is not such a message) makes ``get_history`` raise
    :class:`CorruptEntryError` naming the conversation and position, never skipped.
    Stats are this process's counters and cost no I/O.

    Processes sharing a prefix should share the config: each append applies its own
    instance's ``max_turns`` and TTL to the whole conversation (an instance without a
    TTL leaves the key's current expiry as it is).
    """

    supports_cluster = True

    def __init__(
        self,
        *,
        url: str | None = None,
        client: Redis | None = None,
        config: ChatMemoryConfig | None = None,
        key_prefix: str = "aiocache_llm:chat",
        max_message_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self._config = check_config(config)
        self._codec = ChatMessageCodec(self._config, max_message_bytes)
        ttl = self._config.ttl_seconds
        self._ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        super().__init__(url=url, client=client, key_prefix=key_prefix)
        self._append_messages = self._redis.register_script(APPEND_MESSAGES)
        self._appended = 0
        self._reads = 0
        self._cleared = 0

    def __repr__(self) -> str:
        return (
            f"RedisChatMemory(key_prefix={self._prefix!r}, max_turns={self._config.max_turns}, "
            f"ttl_seconds={self._config.ttl_seconds}, appended={self._appended}, "
            f"reads={self._reads}, cleared={self._cleared})"
        )

    @property
    def config(self) -> ChatMemoryConfig:
        """The bounds this memory keeps."""
        return self._config

    def key(self, conv_id: str) -> str:
        """Return the Redis key of a conversation: ``{key_prefix}:{conv_id}``.

        ``%`` and ``:`` in the id are written ``%25`` and ``%3A``: the last segment
        of a key is then always the conversation, so tenants whose prefixes nest
        (``acme`` and ``acme:eu``) can never read each other's conversations.
        """
        conv_id = check_conv_id(conv_id)
        if not _KEY_SPECIAL.isdisjoint(conv_id):
            conv_id = conv_id.translate(_KEY_ESCAPES)
        return f"{self._prefix}:{conv_id}"

    async def append(self, conv_id: str, role: str, content: Any) -> None:
        """Append ``{"role": role, "content": content}``, trim, refresh the TTL; atomically.

        ``content`` is a ``str`` or a JSON ``list``/``dict`` of parts (``None`` is
        refused: an assistant reply made of tool calls goes through
        :meth:`append_message` with its ``tool_calls``). Trimming keeps at most the
        newest ``2 * max_turns`` messages, starting at a message that may start a
        history (see :meth:`append_messages`). One round trip. Bad input raises
        :class:`InvalidInputError`/:class:`InvalidInputTypeError` (or
        :class:`ValueTooLargeError`) before any I/O.
        """
        self._check_open()
        key = self.key(conv_id)
        await self._store(key, conv_id, [self._codec.encode(role, content)])

    async def append_message(self, conv_id: str, message: Mapping[str, Any]) -> None:
        """Append one message dict as given, trim, refresh the TTL; atomically.

        ``message`` is any OpenAI/Anthropic chat message: ``content`` a ``str``, a list
        of parts (``tool_use``/``tool_result`` blocks included) or ``None`` for an
        assistant reply in ``tool_calls``; ``tool_call_id``/``name`` a ``str``; other
        keys JSON data. ``get_history`` returns it with the same keys, in the same
        order. Raises like :meth:`append_messages`.
        """
        self._check_open()
        key = self.key(conv_id)
        await self._store(key, conv_id, [self._codec.encode_message(message)])

    async def append_messages(self, conv_id: str, messages: Iterable[Mapping[str, Any]]) -> None:
        """Append message dicts in order, trim, refresh the TTL; all in one atomic step.

        Use it for an assistant tool call and its results, so that no reader (and
        no trim) ever sees the call without its results. Beyond ``2 * max_turns``
        messages the history is trimmed to the oldest of the newest ``2 * max_turns``
        that may start a history: never a tool result (a ``tool`` message, or a
        ``user`` message made only of ``tool_result`` blocks), so tool results whose
        call is trimmed go with it and the history may hold fewer messages than the
        bound, never more. Within the bound nothing is dropped. An empty ``messages``
        does nothing.

        One round trip: the ``APPEND_MESSAGES`` Lua script decides the trim on the
        server from each stored message's first bytes. Raises
        :class:`InvalidInputError`/:class:`InvalidInputTypeError` (or
        :class:`ValueTooLargeError`) for a bad message before any I/O, and
        :class:`InvalidInputError` when a trim is needed and none of the newest
        ``2 * max_turns`` messages could start the history (a call whose results
        exceed the bound); in every case nothing is stored.
        """
        self._check_open()
        key = self.key(conv_id)
        encoded = [self._codec.encode_message(message) for message in check_messages(messages)]
        if encoded:
            await self._store(key, conv_id, encoded)

    async def _store(self, key: str, conv_id: str, encoded: list[bytes]) -> None:
        keep = self._config.max_messages
        try:
            await self._ready()
            kept = await self._append_messages(keys=[key], args=[keep, self._ttl_ms, *encoded])
        except DRIVER_ERRORS as exc:
            raise _map_error(exc, "append", conv_id) from exc
        if kept == -1:
            raise no_start_error(keep)
        self._appended += len(encoded)

    async def get_history(self, conv_id: str) -> list[dict[str, Any]]:
        """Return the messages oldest first, each as appended (``[]`` if none or expired).

        One round trip. The dicts are new objects: mutating them changes nothing stored.
        """
        self._check_open()
        key = self.key(conv_id)
        try:
            await self._ready()
            stored: list[bytes | str] = await self._redis.lrange(key, 0, -1)
        except DRIVER_ERRORS as exc:
            raise _map_error(exc, "get_history", conv_id) from exc
        history = [
            self._codec.decode(data, conv_id, position) for position, data in enumerate(stored)
        ]
        self._reads += 1
        return history

    async def clear(self, conv_id: str) -> None:
        """Delete the conversation's key; doing so for an unknown one is not an error."""
        self._check_open()
        key = self.key(conv_id)
        try:
            await self._ready()
            await self._redis.unlink(key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc
        self._cleared += 1

    async def stats(self) -> ChatMemoryStats:
        """Return how many messages this process appended, histories read and clears done."""
        self._check_open()
        return ChatMemoryStats(appended=self._appended, reads=self._reads, cleared=self._cleared)


def _map_error(exc: BaseException, operation: str, conv_id: str) -> BackendError:
    if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("WRONGTYPE"):
        return CorruptEntryError(
            f"conversation {conv_id!r}: its key holds a Redis value that is not a list "
            "of chat messages (written by someone else?)"
        )
    return backend_error(exc, operation)
