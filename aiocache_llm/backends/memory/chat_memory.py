"""``MemoryChatMemory``: bounded conversation histories with expiry, in one process."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from typing import Any

from aiocache_llm.backends.chat_messages import (
    ChatMessageCodec,
    check_config,
    check_conv_id,
    check_messages,
    first_kept,
)
from aiocache_llm.core.clock import Clock
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES
from aiocache_llm.core.config import ChatMemoryConfig
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.stats import ChatMemoryStats
from aiocache_llm.core.validation import check_callable

__all__ = ["MemoryChatMemory"]


class _Conversation:
    __slots__ = ("expires_at", "messages")

    def __init__(self) -> None:
        # no maxlen: how many old messages go is the trim rule's decision (first_kept)
        self.messages: deque[bytes] = deque()
        self.expires_at = math.inf


class MemoryChatMemory(AsyncResource):
    """A bounded message history per conversation, in this process.

    ``append(conv_id, role, content)`` adds a ``{"role", "content"}`` message,
    ``append_message``/``append_messages`` add whole OpenAI/Anthropic message dicts
    (tool calls and tool results included); each keeps at most the newest
    ``2 * config.max_turns`` messages, dropping the oldest, and never leaves a history
    that begins with a tool result (see :meth:`append_messages`). ``get_history``
    returns the messages oldest first, each exactly as it was given.
    ``config.ttl_seconds`` (None = never) is how long a conversation lives after its
    last append: every append refreshes it, reads do not. ``clock`` (seconds,
    monotonic; default ``time.monotonic``) is injectable so tests control expiry.

    ``content`` is a ``str`` (any Unicode, the empty string included: a model may
    answer with nothing, and dropping that reply would break the turn pairing) or a
    JSON ``list``/``dict`` of message parts. Messages are held as encoded JSON, so the
    history returned is always a fresh copy and a message larger than
    ``max_message_bytes`` (default 16 MiB, None or 0 = unbounded) raises
    :class:`ValueTooLargeError`. Bad input raises before anything changes.

    Every method completes without yielding to the event loop, so each is atomic with
    respect to other tasks and cancellation cannot leave it half done. An append is
    O(size of its messages) plus the messages looked at to find where the history
    starts (usually one), ``get_history`` O(messages kept). Because every
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
        """Append ``{"role": role, "content": content}``, trim, refresh the TTL; atomically.

        ``content`` is a ``str`` or a JSON ``list``/``dict`` of parts (``None`` is
        refused: an assistant reply made of tool calls goes through
        :meth:`append_message` with its ``tool_calls``). Trimming keeps at most the
        newest ``2 * max_turns`` messages, starting at a message that may start a
        history (see :meth:`append_messages`). Raises :class:`InvalidInputError`/
        :class:`InvalidInputTypeError` (or :class:`ValueTooLargeError`) naming the bad
        argument, leaving the history as it was.
        """
        self._check_open()
        conv_id = check_conv_id(conv_id)
        self._store(conv_id, [self._codec.encode(role, content)])

    async def append_message(self, conv_id: str, message: Mapping[str, Any]) -> None:
        """Append one message dict as given, trim, refresh the TTL; atomically.

        ``message`` is any OpenAI/Anthropic chat message: ``content`` a ``str``, a list
        of parts (``tool_use``/``tool_result`` blocks included) or ``None`` for an
        assistant reply in ``tool_calls``; ``tool_call_id``/``name`` a ``str``; other
        keys JSON data. ``get_history`` returns it with the same keys, in the same
        order. Raises like :meth:`append_messages`.
        """
        self._check_open()
        conv_id = check_conv_id(conv_id)
        self._store(conv_id, [self._codec.encode_message(message)])

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

        Raises :class:`InvalidInputError`/:class:`InvalidInputTypeError` (or
        :class:`ValueTooLargeError`) for a bad message, and :class:`InvalidInputError`
        when a trim is needed and none of the newest ``2 * max_turns`` messages could
        start the history (a call whose results exceed the bound); in every case
        nothing is stored. O(size of the messages), plus the
        messages looked at to find where the history starts (usually one).
        """
        self._check_open()
        conv_id = check_conv_id(conv_id)
        encoded = [self._codec.encode_message(message) for message in check_messages(messages)]
        if encoded:
            self._store(conv_id, encoded)

    def _store(self, conv_id: str, encoded: list[bytes]) -> None:
        now = self._clock()
        self._purge_expired(now)
        conversation = self._conversations.get(conv_id)
        stored = () if conversation is None else conversation.messages
        start = first_kept(stored, encoded, self._config.max_messages)  # may raise: no change
        if conversation is None:
            conversation = self._conversations[conv_id] = _Conversation()
        else:
            self._conversations.move_to_end(conv_id)
        messages = conversation.messages
        messages.extend(encoded)
        for _ in range(start):
            messages.popleft()
        ttl = self._config.ttl_seconds
        conversation.expires_at = math.inf if ttl is None else now + ttl
        self._appended += len(encoded)

    async def get_history(self, conv_id: str) -> list[dict[str, Any]]:
        """Return the messages oldest first, each as appended (``[]`` if none or expired).

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
