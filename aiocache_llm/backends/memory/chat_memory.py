"""``MemoryChatMemory``: bounded conversation histories with expiry, in one process."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from typing import Any

from aiocache_llm.backends.chat_messages import ChatMessageCodec, check_config, check_conv_id
from aiocache_llm.core.clock import Clock
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES
from aiocache_llm.core.config import ChatMemoryConfig
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.stats import ChatMemoryStats
from aiocache_llm.core.validation import check_callable

__all__ = ["MemoryChatMemory"]


class _Conversation:
    __slots__ = ("expires_at", "messages")

    def __init__(self, max_messages: int) -> None:
        self.messages: deque[bytes] = deque(maxlen=max_messages)
        self.expires_at = math.inf


class MemoryChatMemory(AsyncResource):
    """A bounded message history per conversation, in this process.

    ``append`` adds a message and keeps the newest ``2 * config.max_turns``, dropping
    the oldest; ``get_history`` returns them oldest first as ``{"role", "content"}``
    dicts. ``config.ttl_seconds`` (None = never) is how long a conversation lives
    after its last append: every append refreshes it, reads do not. ``clock`` (seconds,
    monotonic; default ``time.monotonic``) is injectable so tests control expiry.

    ``content`` is a ``str`` (any Unicode, the empty string included: a model may
    answer with nothing, and dropping that reply would break the turn pairing) or a
    JSON ``list``/``dict`` of message parts. Messages are held as encoded JSON, so the
    history returned is always a fresh copy and a message larger than
    ``max_message_bytes`` (default 16 MiB, None or 0 = unbounded) raises
    :class:`ValueTooLargeError`. Bad input raises before anything changes.

    Every method completes without yielding to the event loop, so each is atomic with
    respect to other tasks and cancellation cannot leave it half done. ``append`` is
    O(1) plus the size of the message, ``get_history`` O(messages kept). Because every
    conversation shares one TTL and the clock is monotonic, last-append order is
    expiry order: conversations are kept in that order and expired ones are purged
    from the front on every call, O(1) amortized, so expired conversations never
    accumulate. Without a TTL conversations live until ``clear``.
    """

    def __init__(
        self,
        config: ChatMemoryConfig | None = None,
        *,
        clock: Clock | None = None,
        max_message_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self._config = check_config(config)
        self._codec = ChatMessageCodec(self._config, max_message_bytes)
        self._clock: Clock = time.monotonic if clock is None else check_callable("clock", clock)
        # conv_id -> conversation, least recently appended first (= soonest to expire)
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._appended = 0
        self._reads = 0
        self._cleared = 0

    def __repr__(self) -> str:
        return (
            f"MemoryChatMemory(max_turns={self._config.max_turns}, "
            f"ttl_seconds={self._config.ttl_seconds}, "
            f"conversations={len(self._conversations)}, appended={self._appended}, "
            f"reads={self._reads}, cleared={self._cleared})"
        )

    @property
    def config(self) -> ChatMemoryConfig:
        """The bounds this memory keeps."""
        return self._config

    async def append(self, conv_id: str, role: str, content: Any) -> None:
        """Append a message, keep the newest ``2 * max_turns``, refresh the TTL; atomically.

        Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` (or
        :class:`ValueTooLargeError`) naming the bad argument, leaving the history as
        it was.
        """
        self._check_open()
        conv_id = check_conv_id(conv_id)
        data = self._codec.encode(role, content)
        now = self._clock()
        self._purge_expired(now)
        conversation = self._conversations.get(conv_id)
        if conversation is None:
            conversation = self._conversations[conv_id] = _Conversation(self._config.max_messages)
        else:
            self._conversations.move_to_end(conv_id)
        conversation.messages.append(data)
        ttl = self._config.ttl_seconds
        conversation.expires_at = math.inf if ttl is None else now + ttl
        self._appended += 1

    async def get_history(self, conv_id: str) -> list[dict[str, Any]]:
        """Return the conversation's messages oldest first (``[]`` if none or expired).

        The dicts are new objects: mutating them never changes what is stored.
        """
        self._check_open()
        conv_id = check_conv_id(conv_id)
        now = self._clock()
        self._purge_expired(now)
        conversation = self._conversations.get(conv_id)
        history = (
            []
            if conversation is None or conversation.expires_at <= now
            else [
                self._codec.decode(data, conv_id, position)
                for position, data in enumerate(conversation.messages)
            ]
        )
        self._reads += 1
        return history

    async def clear(self, conv_id: str) -> None:
        """Forget the conversation; doing so for an unknown one is not an error."""
        self._check_open()
        conv_id = check_conv_id(conv_id)
        self._conversations.pop(conv_id, None)
        self._cleared += 1

    async def stats(self) -> ChatMemoryStats:
        """Return how many messages were appended, histories read and clears done."""
        self._check_open()
        return ChatMemoryStats(appended=self._appended, reads=self._reads, cleared=self._cleared)

    def _purge_expired(self, now: float) -> None:
        conversations = self._conversations
        while conversations:
            conversation = next(iter(conversations.values()))
            if conversation.expires_at > now:
                return
            conversations.popitem(last=False)

    async def _release(self) -> None:
        self._conversations.clear()
