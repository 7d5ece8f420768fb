"""What both chat memories share: argument checks and the stored form of one message.

A message is stored as compact JSON ``{"role": ..., "content": ...}`` (UTF-8, key order
kept, nothing else), one element per message: a Redis ``LIST`` element or a ``bytes``
in memory. The format is plain JSON so other tools can read a conversation, and it is
data only: decoding never imports or constructs anything.
"""

from __future__ import annotations

from typing import Any

import orjson

from aiocache_llm.core.config import ChatMemoryConfig
from aiocache_llm.core.errors import (
    CorruptEntryError,
    InvalidInputError,
    InvalidInputTypeError,
    ValueTooLargeError,
)
from aiocache_llm.core.query import canonical_json
from aiocache_llm.core.validation import check_id, check_size_limit

__all__ = ["ChatMessageCodec", "check_config", "check_conv_id"]

_CONTENT_TYPES = (str, list, dict)


def check_conv_id(conv_id: object) -> str:
    """Return a conversation id: a non-empty ``str`` that UTF-8 can encode."""
    return check_id("conv_id", conv_id)


def check_config(config: object) -> ChatMemoryConfig:
    """Return ``config``, or the default :class:`ChatMemoryConfig` for ``None``."""
    if config is None:
        return ChatMemoryConfig()
    if not isinstance(config, ChatMemoryConfig):
        raise InvalidInputTypeError(
            f"config must be a ChatMemoryConfig or None, got {type(config).__name__}"
        )
    return config


class ChatMessageCodec:
    """Validates messages for a chat memory and turns them into bytes and back.

    ``encode`` raises before anything is stored: :class:`InvalidInputTypeError` for a
    role that is not a ``str`` or content that is not a ``str``/``list``/``dict`` (or
    holds something JSON cannot represent), :class:`InvalidInputError` for an unknown
    role, NaN/infinity, lone surrogates or containers that would not come back equal
    (tuples), and :class:`ValueTooLargeError` beyond ``max_message_bytes``.
    """

    __slots__ = ("_max_bytes", "_roles")

    def __init__(self, config: ChatMemoryConfig, max_message_bytes: int | None) -> None:
        limit = check_size_limit("max_message_bytes", max_message_bytes, allow_none=True)
        self._max_bytes = limit or None
        self._roles = config.roles

    @property
    def max_message_bytes(self) -> int | None:
        """The size bound on one encoded message in bytes, or ``None`` for no bound."""
        return self._max_bytes

    def encode(self, role: object, content: object) -> bytes:
        """Return the stored form of one message; O(size of content)."""
        if type(role) is not str:
            raise InvalidInputTypeError(f"role must be a str, got {type(role).__name__}")
        if role not in self._roles:
            raise InvalidInputError(
                f"role must be one of {sorted(self._roles)} (ChatMemoryConfig.roles), got {role!r}"
            )
        kind = type(content)
        if kind not in _CONTENT_TYPES:
            raise InvalidInputTypeError(
                f"content must be a str or a JSON list/dict of parts, got {kind.__name__}"
            )
        payload = canonical_json(content, what="content", sort_keys=False)
        if kind is not str and orjson.loads(payload) != content:
            raise InvalidInputError(
                "content does not survive a JSON round trip unchanged "
                "(tuples or other non-JSON containers inside it?)"
            )
        data = b'{"role":' + orjson.dumps(role) + b',"content":' + payload + b"}"
        if self._max_bytes is not None and len(data) > self._max_bytes:
            raise ValueTooLargeError(
                f"message is {len(data)} bytes encoded, above max_message_bytes={self._max_bytes}"
            )
        return data

    @staticmethod
    def decode(data: bytes | str, conv_id: str, position: int) -> dict[str, Any]:
        """Return the message stored as ``data`` as a new ``{"role", "content"}`` dict.

        Raises :class:`CorruptEntryError` naming the conversation and ``position``
        (0 = oldest) for anything that is not exactly such a message. The role is not
        checked against this memory's roles: another process may allow more.
        """
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _corrupt(conv_id, position, f"not JSON ({exc})") from exc
        if type(message) is not dict or message.keys() != {"role", "content"}:
            raise _corrupt(conv_id, position, "not a {'role', 'content'} object")
        role, content = message["role"], message["content"]
        if type(role) is not str or type(content) not in _CONTENT_TYPES:
            raise _corrupt(conv_id, position, "role is not a str or content not a str/list/dict")
        return {"role": role, "content": content}


def _corrupt(conv_id: str, position: int, reason: str) -> CorruptEntryError:
    return CorruptEntryError(
        f"conversation {conv_id!r}: stored message at position {position} (0 = oldest) "
        f"is not a chat message: {reason}"
    )
