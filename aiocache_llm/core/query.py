"""Queries and their keys.

A *query* is a chat-completion request: a mapping such as
``{"model": ..., "messages": [...], "temperature": ...}``, a pydantic model of one,
or a plain ``str`` meaning a single user message. Its key is
:func:`signature`: the SHA-256 hex digest of the canonical JSON (keys sorted at
every depth, no whitespace, UTF-8) of the *normalized* request.

Normalization (:func:`default_normalize`) drops the top-level fields listed in
:data:`IGNORED_FIELDS`, which never change the answer, and top-level ``None``
values (an absent parameter and ``None`` both mean "provider default"). A cache's
``normalize=`` hook replaces it; compose with ``default_normalize`` to extend it.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import hashlib
import math
import pathlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from pydantic import BaseModel

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError

__all__ = [
    "IGNORED_FIELDS",
    "NoSemanticTextError",
    "Normalizer",
    "Query",
    "QueryKeys",
    "canonical_json",
    "default_normalize",
    "signature",
    "typed_key",
]

Query = str | Mapping[str, Any] | BaseModel
"""What every cache, the gateway and :func:`signature` accept as a request."""

Normalizer = Callable[[dict[str, Any]], Mapping[str, Any]]
"""A hook ``request dict -> request mapping`` applied before hashing."""

IGNORED_FIELDS: frozenset[str] = frozenset(
    {
        "user",
        "stream",
        "stream_options",
        "store",
        "metadata",
        "request_id",
        "idempotency_key",
        "timeout",
        "extra_headers",
        "extra_query",
        "service_tier",
    }
)
"""Top-level request fields left out of the key by :func:`default_normalize`."""

_SORTED = orjson.OPT_SORT_KEYS
_MAX_JSON_DEPTH = 254  # orjson refuses deeper nesting of lists and dicts
_SCOPE_MARKER = "\x00semantic-text\x00"


class NoSemanticTextError(InvalidInputError):
    """The last user message of a query has no text to compare, only other parts.

    Raised by :meth:`QueryKeys.semantic_parts` for a well-formed request whose last
    user message holds only tool results, images, documents or other non-text parts
    (an Anthropic tool-use follow-up, say). Such a query is not bad input, it is just
    not a question for a semantic cache: the semantic caches catch this error and
    treat the query as absent from them (``get``/``lookup`` return ``None`` without
    counting a miss, ``put`` stores nothing, ``invalidate`` returns ``False``), so it
    never reaches a caller. A kind of :class:`InvalidInputError` for callers of
    ``semantic_parts`` that only know that one.
    """


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 if it ships one, else hashlib's (OpenSSL).

    Same digest. OpenSSL 3 sets up an algorithm context for every hash object; hot
    that is 0.6 us, but between two network round trips (caches cold) it measured
    7-10 us per key, while the built-in measured under 1 us: one key per cache read.
    """
    for module in ("_sha256", "_sha2"):  # CPython <= 3.11, 3.12+
        try:
            return __import__(module).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()


def default_normalize(request: dict[str, Any]) -> Mapping[str, Any]:
    """Drop :data:`IGNORED_FIELDS` and top-level ``None`` values; O(number of fields).

    Returns the same object when there is nothing to drop (the common case), so the
    key of a plain request costs no copy.
    """
    if IGNORED_FIELDS.isdisjoint(request) and None not in request.values():
        return request
    return {k: v for k, v in request.items() if k not in IGNORED_FIELDS and v is not None}


def as_request(query: object) -> dict[str, Any]:
    """Return the query as a request ``dict`` (the input object itself when it is a dict).

    Raises :class:`InvalidInputTypeError` for anything that is not a ``str``, mapping or
    pydantic model, and :class:`InvalidInputError` for an empty one.
    """
    kind = type(query)
    if kind is dict:
        request: dict[str, Any] = query  # type: ignore[assignment]
    elif kind is str:
        if not query:
            raise InvalidInputError("query must not be an empty string")
        return {"messages": [{"role": "user", "content": query}]}
    elif isinstance(query, BaseModel):
        try:
            request = query.model_dump(mode="json", exclude_none=True)
        except (ValueError, TypeError) as exc:  # unknown types, bytes, depth, cycles
            raise InvalidInputError(
                f"query {kind.__name__} cannot be serialized as JSON: {exc}"
            ) from exc
        # JSON mode writes NaN in untyped (Any, dict, list) fields as null, which
        # would make the key that of another query: look at the model itself
        _reject_non_finite(query, "query")
    elif isinstance(query, Mapping):
        request = dict(query)
    else:
        raise InvalidInputTypeError(
            f"query must be a str, a mapping or a pydantic model, got {kind.__name__}"
        )
    if not request:
        raise InvalidInputError("query must not be empty")
    return request


def canonical_json(obj: object, *, what: str = "query", sort_keys: bool = True) -> bytes:
    """Serialize ``obj`` as compact UTF-8 JSON, keys sorted at every depth by default.

    O(size of obj). Raises :class:`InvalidInputTypeError` for values JSON cannot
    represent (non-``str`` keys, arbitrary objects, integers beyond 64 bits) and
    :class:`InvalidInputError` for lone surrogates and for NaN or infinite floats,
    which JSON would otherwise turn into ``null`` and so into somebody else's key.
    """
    try:
        encoded = orjson.dumps(obj, option=_SORTED if sort_keys else None)
    except orjson.JSONEncodeError as exc:
        if "surrogates" in str(exc):
            raise InvalidInputError(f"{what} is not valid Unicode text: {exc}") from exc
        if "Recursion limit" in str(exc):
            raise InvalidInputError(
                f"{what} is nested too deeply for JSON (at most {_MAX_JSON_DEPTH} levels)"
            ) from exc
        raise InvalidInputTypeError(f"{what} is not JSON-serializable: {exc}") from exc
    # orjson writes NaN/inf as null: only when a null appears is the slow walk needed.
    if b"null" in encoded:
        _reject_non_finite(obj, what)
    return encoded


def _reject_non_finite(obj: object, path: str) -> None:
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise InvalidInputError(f"{path} contains a non-finite float ({obj})")
    elif isinstance(obj, BaseModel):
        for name, value in obj:  # declared fields and extras
            _reject_non_finite(value, f"{path}.{name}")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # orjson serializes dataclass instances field by field, NaN as null too
        for item in dataclasses.fields(obj):
            _reject_non_finite(getattr(obj, item.name), f"{path}.{item.name}")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _reject_non_finite(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _reject_non_finite(value, f"{path}[{index}]")


_TYPE_TAG = "\x00type"
_VALUE_TAG = "\x00value"
_ESCAPE = "\x00"


def typed_key(value: object, *, what: str = "argument") -> Any:
    """Return ``value`` as JSON data that keeps apart what JSON alone would confuse.

    JSON (and orjson, which writes dataclasses, enums, datetimes, UUIDs, tuples and
    subclasses of ``str``/``int``/``dict``/``list`` without their type) would give
    ``Celsius(100)`` and ``Fahrenheit(100)``, ``(1, 2)`` and ``[1, 2]``, a ``UUID``
    and its text the same key. Here plain ``str``, ``int``, ``float``, ``bool``,
    ``None``, ``list`` and ``dict`` (with ``str`` keys) stay as they are, so their
    keys do not change; every other value becomes ``{"\\x00type": "<module>.<qualname>",
    "\\x00value": <its content>}``: dataclasses and pydantic models (their fields,
    recursively), enums (the member's name), ``datetime``/``date``/``time`` (ISO
    text), ``timedelta``, ``UUID``, ``Decimal``, paths, ``bytes``, tuples (named
    ones too), sets (sorted by their items' keys) and subclasses of the plain types.
    Dict keys that start with ``\\x00`` get one more, so no dict reads as a tag.

    O(size of value). Raises :class:`InvalidInputTypeError` for anything else (and
    dicts with keys that are not exactly ``str``): no faithful key exists, the caller
    must supply one. Raises :class:`InvalidInputError` for NaN or infinite floats and
    for nesting deeper than JSON allows (cycles included). ``what`` names the value
    in messages.
    """
    return _typed(value, what, 0)


def _typed(value: object, what: str, depth: int) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise InvalidInputError(f"{what} contains a non-finite float ({value})")
        return value
    if depth >= _MAX_JSON_DEPTH:
        raise InvalidInputError(
            f"{what} is nested too deeply to key (at most {_MAX_JSON_DEPTH} levels; a cycle?)"
        )
    depth += 1
    if kind is list:
        return [_typed(item, what, depth) for item in value]  # type: ignore[attr-defined]
    if kind is dict:
        return _typed_dict(value, what, depth)  # type: ignore[arg-type]
    return {
        _TYPE_TAG: f"{kind.__module__}.{kind.__qualname__}",
        _VALUE_TAG: _typed_content(value, what, depth),
    }


def _typed_dict(mapping: Mapping[Any, Any], what: str, depth: int) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for key, item in mapping.items():
        if type(key) is not str:
            raise InvalidInputTypeError(
                f"{what} holds a dict key of type {type(key).__name__}, which is not "
                "JSON-serializable and has no faithful key (only str keys): pass key="
            )
        typed[_ESCAPE + key if key.startswith(_ESCAPE) else key] = _typed(item, what, depth)
    return typed


def _typed_content(value: Any, what: str, depth: int) -> Any:
    """The content of a value tagged with its type (the tag says how to read it)."""
    if isinstance(value, enum.Enum):  # before str/int: StrEnum, IntEnum
        return value.name
    if isinstance(value, BaseModel):
        return _typed_dict(dict(value), what, depth)  # declared fields and extras
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {item.name: getattr(value, item.name) for item in dataclasses.fields(value)}
        return _typed_dict(fields, what, depth)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return [value.days, value.seconds, value.microseconds]
    if isinstance(value, (uuid.UUID, decimal.Decimal, pathlib.PurePath)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (tuple, list)):
        return [_typed(item, what, depth) for item in value]
    if isinstance(value, Mapping):
        return _typed_dict(value, what, depth)
    if isinstance(value, (set, frozenset)):
        items = [_typed(item, what, depth) for item in value]
        return sorted(items, key=lambda item: canonical_json(item, what=what))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _typed(float(value), what, depth)
    raise InvalidInputTypeError(
        f"{what} holds a {type(value).__name__} value, which is not JSON-serializable "
        "and has no faithful key: pass key="
    )


def _hexdigest(data: bytes) -> str:
    digest: str = _sha256(data).hexdigest()
    return digest


class QueryKeys:
    """Turns queries into keys with one normalization hook; shared by every cache.

    Stateless apart from the hook, so one instance may serve any number of tasks.
    """

    __slots__ = ("_normalize",)

    def __init__(self, normalize: Normalizer | None = None) -> None:
        if normalize is not None and not callable(normalize):
            raise InvalidInputTypeError(
                f"normalize must be callable, got {type(normalize).__name__}"
            )
        self._normalize: Normalizer = normalize or default_normalize

    def request(self, query: object) -> Mapping[str, Any]:
        """Return the normalized request; raises like :func:`as_request`."""
        normalized = self._normalize(as_request(query))
        if not isinstance(normalized, Mapping):
            raise InvalidInputTypeError(
                f"normalize must return a mapping, got {type(normalized).__name__}"
            )
        return normalized

    def digest(self, query: object) -> str:
        """Return the SHA-256 hex digest of the canonical JSON of the normalized query."""
        if type(query) is dict and self._normalize is default_normalize and query:
            # the hot path of every cache hit, inlined: the same steps as below
            if not IGNORED_FIELDS.isdisjoint(query) or None in query.values():
                query = default_normalize(query)
            try:
                encoded = orjson.dumps(query, option=_SORTED)
            except orjson.JSONEncodeError:
                encoded = canonical_json(query)  # raises the library's error
            if b"null" in encoded:
                _reject_non_finite(query, "query")
            digest: str = _sha256(encoded).hexdigest()
            return digest
        return _hexdigest(canonical_json(self.request(query)))

    def semantic_parts(self, query: object) -> tuple[str, str, str]:
        """Split a query for the semantic cache into ``(scope, text, digest)``.

        ``text`` is the text of the last user message: its string content, or its
        text parts (OpenAI text parts, Anthropic text blocks) joined by newlines.
        ``scope`` is the digest of everything else (model, system prompt, Anthropic's
        top-level ``system``, earlier turns, parameters, and the non-text parts of the
        last message such as images or tool results), which a paraphrase must match
        exactly. Content made only of plain ``{"type": "text", "text": ...}`` parts
        has the scope of the same text as a string, so a string and a single text
        block are one question. ``digest`` is the exact key of the whole query
        (:func:`signature`), which this never changes.

        Raises :class:`NoSemanticTextError` when the last user message has parts but
        no text part (a query the semantic caches skip), :class:`InvalidInputError`
        when there is no user message or its text is blank, and what
        :meth:`request` raises for a bad query.
        """
        if type(query) is str and self._normalize is default_normalize and query.strip():
            # one user message and nothing else: the scope is the same for every text
            return _PLAIN_TEXT_SCOPE, query, self.digest(query)
        request = self.request(query)
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidInputError("a semantic query needs a non-empty 'messages' list")
        for index in range(len(messages) - 1, -1, -1):
            message = messages[index]
            if isinstance(message, Mapping) and message.get("role") == "user":
                break
        else:
            raise InvalidInputError("a semantic query needs at least one 'user' message")
        content = message.get("content")
        text = _message_text(content)
        if text is None:
            raise NoSemanticTextError(
                "the last user message has no text to compare, only non-text parts "
                "(tool results, images, ...): not a semantic query"
            )
        if not text.strip():
            raise InvalidInputError("the last user message of a semantic query has no text")
        scoped_messages = list(messages)
        scoped_messages[index] = {**message, "content": _scoped_content(content)}
        scope = _hexdigest(canonical_json({**request, "messages": scoped_messages}))
        return scope, text, _hexdigest(canonical_json(request))


def _is_text_part(part: object) -> bool:
    """An OpenAI text part or Anthropic text block (any part with a string ``text``)."""
    return isinstance(part, Mapping) and isinstance(part.get("text"), str)


def _is_plain_text_part(part: object) -> bool:
    """A text part with nothing else to it (no ``cache_control``, no citations...)."""
    return (
        isinstance(part, Mapping)
        and len(part) == 2
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    )


def _scoped_content(content: object) -> object:
    """The content with its text replaced by a marker; images, audio and files stay.

    Only the text is compared by similarity: two questions about different images
    must never share a scope. Content that is only plain text parts becomes the
    marker alone, as string content always did (so the scopes of string content,
    and the entries stored under them, stay as they were): a string and the same
    text in one text block are the same question.
    """
    if isinstance(content, list) and not all(_is_plain_text_part(part) for part in content):
        return [
            {**part, "text": _SCOPE_MARKER} if _is_text_part(part) else part for part in content
        ]
    return _SCOPE_MARKER


def _message_text(content: object) -> str | None:
    """The text of a message's content; ``None`` for parts without any text part."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if not content:
            raise InvalidInputError("the last user message of a semantic query has no content")
        parts = [part["text"] for part in content if _is_text_part(part)]
        return "\n".join(parts) if parts else None
    raise InvalidInputTypeError(
        f"message content must be a str or a list of parts, got {type(content).__name__}"
    )


_DEFAULT_KEYS = QueryKeys()
_PLAIN_TEXT_SCOPE = _hexdigest(
    canonical_json({"messages": [{"role": "user", "content": _SCOPE_MARKER}]})
)


def signature(query: Query, *, normalize: Normalizer | None = None) -> str:
    """Return the cache key digest of ``query``: SHA-256 hex of its canonical JSON.

    Dict key order never changes it; fields in :data:`IGNORED_FIELDS` are left out
    unless ``normalize`` says otherwise. Redis keys are ``{key_prefix}:{signature}``.
    """
    keys = _DEFAULT_KEYS if normalize is None else QueryKeys(normalize)
    return keys.digest(query)
