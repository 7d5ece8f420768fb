"""What both chat memories share: argument checks, the stored form of a message, the trim rule.

Stored forms (one per message: a Redis ``LIST`` element, or a ``bytes`` in memory),
both compact UTF-8 JSON so other tools can read a conversation, both data only:
decoding never imports or constructs anything.

- The seed form ``{"role": ..., "content": ...}`` (key order kept, nothing else): what
  every earlier version wrote and still reads. It is written for any message of
  exactly that shape whose trim flag (below) it implies, so simple conversations stay
  readable by processes that have not been upgraded.
- The tagged form ``{"may_start":true|false,"message":{...}}``: any other message
  (``content`` ``None`` or absent, ``tool_calls``, ``tool_call_id``, ``name``, ...),
  the message kept exactly as given, key order included.

The trim rule: a trimmed history must never begin with a tool result, or it would hold
results whose assistant tool call was trimmed, which the OpenAI and Anthropic APIs
refuse. So a trim goes to the oldest of the newest ``2 * max_turns`` messages that "may
start" a history (fewer messages may be kept, never more). A message may start a
history unless it is a tool result: a ``tool`` (or legacy ``function``) message, or a
``user`` message whose content is only Anthropic ``tool_result`` blocks. Within the
bound nothing is dropped: a history begins with a tool result only if one was
appended first. The flag is readable from the first bytes of the stored form
(:func:`may_start`), so the Redis Lua script decides trims without parsing JSON:
a tagged element says it, a seed element may start unless its role is ``tool``.
:func:`first_kept` is that rule in Python; ``APPEND_MESSAGES`` in the Redis backend
is the same rule in Lua.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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

__all__ = [
    "CONTINUATION_PREFIXES",
    "ChatMessageCodec",
    "check_config",
    "check_conv_id",
    "check_messages",
    "first_kept",
    "may_start",
    "no_start_error",
]

_CONTENT_TYPES = (str, list, dict)
_RESULT_ROLES = frozenset({"tool", "function"})
# an assistant message may leave content None (or out) when one of these carries the reply
_REPLY_FIELDS = ("tool_calls", "function_call", "refusal", "audio")
_STR_FIELDS = ("tool_call_id", "name")

_TAG_START = b'{"may_start":true,"message":'
_TAG_CONTINUATION = b'{"may_start":false,"message":'
_SEED_TOOL = b'{"role":"tool",'
# exactly the Lua script's literals, so both twins classify any bytes alike
CONTINUATION_PREFIXES: tuple[bytes, ...] = (b'{"may_start":false,', _SEED_TOOL)
"""A stored message that begins with one of these may not start a history (Lua knows them too)."""


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


def check_messages(messages: object) -> list[object]:
    """Return ``messages`` (an iterable of message mappings, not one mapping) as a list."""
    if isinstance(messages, (str, bytes, bytearray, Mapping)):
        raise InvalidInputTypeError(
            f"messages must be a list of message dicts, got {type(messages).__name__}"
        )
    if not isinstance(messages, Iterable):
        raise InvalidInputTypeError(
            f"messages must be a list of message dicts, got {type(messages).__name__}"
        )
    return list(messages)


def may_start(data: bytes) -> bool:
    """Whether the stored message ``data`` may be the first of a history; O(1).

    Bytes this library did not write may start (``get_history`` reports them).
    """
    return not data.startswith(CONTINUATION_PREFIXES)


def first_kept(stored: Sequence[bytes], added: Sequence[bytes], keep: int) -> int:
    """Return the index in ``stored + added`` of the oldest message to keep after an append.

    Within the bound (``keep`` messages) nothing is dropped: 0. Beyond it, the first
    message that :func:`may_start` among the newest ``keep``, so at most ``keep``
    messages are kept and a trimmed history begins with a clean turn (tool results
    whose call is cut off go too: fewer than ``keep`` may be kept, never more).
    Raises :class:`InvalidInputError` (from :func:`no_start_error`) when a trim is
    needed and none of them may start: nothing may be appended then. O(1) when the
    first candidate may start (the usual case), else O(messages looked at).
    """
    stored_count = len(stored)
    total = stored_count + len(added)
    if total <= keep:
        return 0
    for index in range(total - keep, total):
        data = stored[index] if index < stored_count else added[index - stored_count]
        if may_start(data):
            return index
    raise no_start_error(keep)


def no_start_error(keep: int) -> InvalidInputError:
    """The error of an append whose trim would leave a history made only of tool results."""
    return InvalidInputError(
        f"nothing appended: the conversation would exceed {keep} messages (2 * max_turns) "
        f"and none of the newest {keep} could start a trimmed history (they are all tool "
        "results: a tool call with more results than the bound holds?)"
    )


class ChatMessageCodec:
    """Validates messages for a chat memory and turns them into bytes and back.

    ``encode`` (the ``(role, content)`` form) and ``encode_message`` (a message dict)
    raise before anything is stored: :class:`InvalidInputTypeError` for a field of the
    wrong type (or a value JSON cannot represent), :class:`InvalidInputError` for an
    unknown role, a missing field, NaN/infinity, lone surrogates or containers that
    would not come back equal (tuples), and :class:`ValueTooLargeError` beyond
    ``max_message_bytes``. Both are O(size of the message).
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
        """Return the stored form of the message ``{"role": role, "content": content}``.

        ``content`` is a ``str`` or a JSON ``list``/``dict`` of parts. ``None`` is
        refused: with nothing else in the message it carries no reply (an assistant
        reply made of tool calls goes through ``encode_message`` with its ``tool_calls``).
        """
        role = self._check_role(role, "role")
        kind = type(content)
        if kind not in _CONTENT_TYPES:
            hint = (
                " (an assistant reply with content None carries tool_calls: "
                "store the whole message with append_message)"
                if content is None
                else ""
            )
            raise InvalidInputTypeError(
                f"content must be a str or a JSON list/dict of parts, got {kind.__name__}{hint}"
            )
        payload = canonical_json(content, what="content", sort_keys=False)
        if kind is not str and orjson.loads(payload) != content:
            raise InvalidInputError(
                "content does not survive a JSON round trip unchanged "
                "(tuples or other non-JSON containers inside it?)"
            )
        data = b'{"role":' + orjson.dumps(role) + b',"content":' + payload + b"}"
        return self._finish(data, role, content, seed_shaped=True)

    def encode_message(self, message: object) -> bytes:
        """Return the stored form of one message dict, kept exactly as given.

        The message is a mapping of JSON data with a known ``role``; ``content`` is a
        ``str``, a JSON ``list`` (parts, Anthropic ``tool_use``/``tool_result`` blocks
        included) or ``dict``, or ``None``/absent only for an assistant message whose
        reply is in ``tool_calls``, ``function_call``, ``refusal`` or ``audio``;
        ``tool_calls`` is a list of objects; ``tool_call_id`` and ``name`` are ``str``.
        Other keys are stored as given.
        """
        if not isinstance(message, Mapping):
            raise InvalidInputTypeError(
                f"message must be a dict (a mapping), got {type(message).__name__}"
            )
        message = dict(message)
        if "role" not in message:
            raise InvalidInputError("message has no 'role'")
        role = self._check_role(message["role"], "message['role']")
        content = message.get("content")
        if content is None:
            if role != "assistant" or not any(message.get(f) for f in _REPLY_FIELDS):
                raise InvalidInputError(
                    f"message['content'] is {'None' if 'content' in message else 'missing'}: "
                    "only an assistant message whose reply is in tool_calls, function_call, "
                    "refusal or audio may leave it out"
                )
        elif type(content) not in _CONTENT_TYPES:
            raise InvalidInputTypeError(
                "message['content'] must be a str, a JSON list of parts, a dict or None, "
                f"got {type(content).__name__}"
            )
        if "tool_calls" in message:
            calls = message["tool_calls"]
            if type(calls) is not list or not all(type(call) is dict for call in calls):
                raise InvalidInputTypeError(
                    "message['tool_calls'] must be a list of objects, got "
                    f"{type(calls).__name__} (leave out fields that are None, e.g. "
                    "model_dump(exclude_none=True))"
                )
        for field in _STR_FIELDS:
            if field in message and type(message[field]) is not str:
                raise InvalidInputTypeError(
                    f"message[{field!r}] must be a str, got {type(message[field]).__name__}"
                )
        payload = canonical_json(message, what="message", sort_keys=False)
        if orjson.loads(payload) != message:
            raise InvalidInputError(
                "message does not survive a JSON round trip unchanged "
                "(tuples or other non-JSON containers inside it?)"
            )
        seed_shaped = list(message) == ["role", "content"] and content is not None
        return self._finish(payload, role, content, seed_shaped=seed_shaped)

    def _check_role(self, role: object, what: str) -> str:
        if type(role) is not str:
            raise InvalidInputTypeError(f"{what} must be a str, got {type(role).__name__}")
        if role not in self._roles:
            raise InvalidInputError(
                f"role must be one of {sorted(self._roles)} (ChatMemoryConfig.roles), got {role!r}"
            )
        return role

    def _finish(self, message: bytes, role: str, content: object, *, seed_shaped: bool) -> bytes:
        # ``message`` is the compact JSON of the message; wrap it unless the seed form
        # already says whether it may start a history
        starts = _starts_history(role, content)
        if seed_shaped and starts is may_start(message):
            data = message
        else:
            data = (_TAG_START if starts else _TAG_CONTINUATION) + message + b"}"
        if self._max_bytes is not None and len(data) > self._max_bytes:
            raise ValueTooLargeError(
                f"message is {len(data)} bytes encoded, above max_message_bytes={self._max_bytes}"
            )
        return data

    @staticmethod
    def decode(data: bytes | str, conv_id: str, position: int) -> dict[str, Any]:
        """Return the message stored as ``data`` as a new dict, as it was given.

        Raises :class:`CorruptEntryError` naming the conversation and ``position``
        (0 = oldest) for anything that is not such a message. The role is not checked
        against this memory's roles: another process may allow more.
        """
        try:
            stored = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _corrupt(conv_id, position, f"not JSON ({exc})") from exc
        if type(stored) is not dict:
            raise _corrupt(conv_id, position, "not a JSON object")
        keys = stored.keys()
        if keys == {"role", "content"}:
            role, content = stored["role"], stored["content"]
            if type(role) is not str or type(content) not in _CONTENT_TYPES:
                raise _corrupt(
                    conv_id, position, "role is not a str or content not a str/list/dict"
                )
            return {"role": role, "content": content}
        if keys == {"may_start", "message"}:
            message = stored["message"]
            if (
                type(stored["may_start"]) is bool
                and type(message) is dict
                and type(message.get("role")) is str
            ):
                return message
        raise _corrupt(
            conv_id, position, "not a {'role', 'content'} or {'may_start', 'message'} object"
        )


def _starts_history(role: str, content: object) -> bool:
    if role in _RESULT_ROLES:
        return False
    # Anthropic returns tool results in a user message made of tool_result blocks
    return not (
        role == "user"
        and type(content) is list
        and content
        and all(type(part) is dict and part.get("type") == "tool_result" for part in content)
    )


def _corrupt(conv_id: str, position: int, reason: str) -> CorruptEntryError:
    return CorruptEntryError(
        f"conversation {conv_id!r}: stored message at position {position} (0 = oldest) "
        f"is not a chat message: {reason}"
    )
