"""``RedisChatMemory``: conversation histories shared by every process that uses the same prefix."""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aiocache_llm.backends.chat_messages import ChatMessageCodec, check_config, check_conv_id
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES
from aiocache_llm.core.config import ChatMemoryConfig
from aiocache_llm.core.errors import BackendError, CorruptEntryError
from aiocache_llm.core.stats import ChatMemoryStats

__all__ = ["RedisChatMemory"]

APPEND_MESSAGE = """
-- Append one message to a conversation, keep only the newest, refresh the expiry.
-- KEYS[1] conversation key (a list of JSON messages, oldest first)
-- ARGV[1] encoded message, ARGV[2] messages to keep, ARGV[3] ttl in ms ('0' = none)
-- returns the number of messages kept
local length = redis.call('RPUSH', KEYS[1], ARGV[1])
local keep = tonumber(ARGV[2])
if length > keep then
    redis.call('LTRIM', KEYS[1], -keep, -1)
    length = keep
end
if ARGV[3] ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return length
"""


_KEY_SPECIAL = frozenset("%:")
_KEY_ESCAPES = str.maketrans({"%": "%25", ":": "%3A"})


class RedisChatMemory(RedisBackend):
    """A bounded message history per conversation, shared through Redis.

    Answers every call like :class:`MemoryChatMemory` (drop-in). A conversation is a
    Redis ``LIST`` under ``{key_prefix}:{conv_id}`` (any Unicode id, with ``%`` and
    ``:`` escaped, see :meth:`key`) holding one compact JSON ``{"role", "content"}``
    per message, oldest first, so other tools can read it.

    ``append`` is one round trip: the ``APPEND_MESSAGE`` Lua script pushes, trims to
    the newest ``2 * max_turns`` and refreshes the expiry with ``PEXPIRE`` (milliseconds,
    so sub-second TTLs work) atomically on the server. A script rather than a
    MULTI/EXEC pipeline because a script stops at its first failing command: if the key
    holds something that is not a list, ``RPUSH`` fails and nothing else runs, while
    in a transaction ``PEXPIRE`` would still change that key's expiry. Cancelling a
    call may leave its command executed or not, never half executed. Concurrent
    appends from any number of processes are serialized by Redis: none is lost and
    each writer's messages keep its order.

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
        self._append_message = self._redis.register_script(APPEND_MESSAGE)
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
        """Append a message, keep the newest ``2 * max_turns``, refresh the TTL; atomically.

        One round trip. Bad input raises :class:`InvalidInputError`/
        :class:`InvalidInputTypeError` (or :class:`ValueTooLargeError`) before any I/O.
        """
        self._check_open()
        key = self.key(conv_id)
        data = self._codec.encode(role, content)
        try:
            await self._append_message(
                keys=[key], args=[data, self._config.max_messages, self._ttl_ms]
            )
        except DRIVER_ERRORS as exc:
            raise _map_error(exc, "append", conv_id) from exc
        self._appended += 1

    async def get_history(self, conv_id: str) -> list[dict[str, Any]]:
        """Return the conversation's messages oldest first (``[]`` if none or expired).

        One round trip. The dicts are new objects: mutating them changes nothing stored.
        """
        self._check_open()
        key = self.key(conv_id)
        try:
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
