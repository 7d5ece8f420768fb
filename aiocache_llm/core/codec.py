"""The value codec: cached values <-> bytes, data only.

Every stored value is ``MAGIC + kind + length + payload``, the length being the
payload's size in 4 bytes (big-endian), so that a truncated entry is always detected:

======  ==========================================  ==========================
kind    value                                       payload
======  ==========================================  ==========================
``s``   ``str``                                     UTF-8 text
``j``   JSON ``dict``, ``list``, number or bool     JSON
``m``   pydantic model                              ``type name`` ``\\n`` JSON
``c``   ``RecordedStream`` (a streamed answer)      its chunks' frames, in order
======  ==========================================  ==========================

Decoding never imports or constructs a class named by stored data: the type name of
a model is looked up in this codec's registry, which holds only classes the
application handed over (``value_types=`` or a model it stored itself). Anything
else under our keys (a pickle, another library's entry, truncated bytes) is a
:class:`CorruptEntryError`, which caches turn into a counted miss.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from aiocache_llm.core.errors import (
    CorruptEntryError,
    InvalidInputError,
    InvalidInputTypeError,
    UndeclaredTypeError,
    ValueTooLargeError,
)
from aiocache_llm.core.query import canonical_json
from aiocache_llm.core.recorded import RecordedStream
from aiocache_llm.core.validation import check_size_limit
from aiocache_llm.core.values import LLMResponse

__all__ = ["DEFAULT_MAX_VALUE_BYTES", "IMMUTABLE_VALUE_TYPES", "UndeclaredTypes", "ValueCodec"]

logger = logging.getLogger("aiocache_llm.codec")

DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024
"""Largest encoded value a cache accepts unless told otherwise (16 MiB)."""

_MAGIC = b"acl\x01"
_STR = _MAGIC + b"s"
_JSON = _MAGIC + b"j"
_MODEL = _MAGIC + b"m"
_CHUNKS = _MAGIC + b"c"
_KIND_LEN = len(_STR)
_LENGTH = struct.Struct(">I")
_HEADER_LEN = _KIND_LEN + 4
_MAX_PAYLOAD = 2**32 - 1
# None is not among them: a cache answers None for a miss
_JSON_TYPES = frozenset({dict, list, int, float, bool})

IMMUTABLE_VALUE_TYPES = frozenset({str, int, float, bool})
"""Value types an in-process cache may hand out as-is: nobody can change them."""


def _type_name(cls: type[BaseModel]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ValueCodec:
    """Encodes values for storage and decodes them back to an equal value of the same type.

    ``encode`` validates completely before anything is stored, so a bad value raises
    and leaves the cache unchanged. ``decode`` of a ``dict``/``list``/model always
    builds a new object, so callers may mutate what they get.
    """

    __slots__ = ("_max_value_bytes", "_types")

    def __init__(
        self,
        value_types: Iterable[type[BaseModel]] = (),
        *,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        limit = check_size_limit("max_value_bytes", max_value_bytes, allow_none=True)
        self._max_value_bytes = limit or None
        self._types: dict[str, type[BaseModel]] = {}
        self.register(LLMResponse)
        for cls in value_types:
            self.register(cls)

    @property
    def max_value_bytes(self) -> int | None:
        """The size bound on encoded values in bytes, or ``None`` for no bound."""
        return self._max_value_bytes

    def register(self, cls: type[BaseModel]) -> None:
        """Allow ``cls`` to be decoded; idempotent.

        Raises :class:`InvalidInputTypeError` if ``cls`` is not a pydantic model class
        or another class is already registered under the same qualified name.
        """
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise InvalidInputTypeError(
                f"value_types must hold pydantic model classes, got {cls!r}"
            )
        name = _type_name(cls)
        known = self._types.setdefault(name, cls)
        if known is not cls:
            raise InvalidInputTypeError(f"two different model classes are named {name!r}")

    def encode(self, value: object) -> bytes:
        """Return the stored form of ``value``; O(size of value).

        Raises :class:`InvalidInputTypeError` for a type that cannot be cached (or
        non-``str`` keys inside it), :class:`InvalidInputError` for a value that would
        not come back equal (NaN, tuples, lone surrogates) and
        :class:`ValueTooLargeError` beyond ``max_value_bytes``.
        """
        kind = type(value)
        if kind is str:
            data = _frame(_STR, _utf8(value))  # type: ignore[arg-type]
        elif kind in _JSON_TYPES:
            payload = canonical_json(value, what="value", sort_keys=False)
            if orjson.loads(payload) != value:
                raise InvalidInputError(
                    "value does not survive a JSON round trip unchanged "
                    "(tuples, sets or other non-JSON containers inside it?)"
                )
            data = _frame(_JSON, payload)
        elif isinstance(value, BaseModel):
            data = self._encode_model(value)
        elif isinstance(value, RecordedStream):
            data = _frame(_CHUNKS, b"".join(self.encode_chunk(c) for c in value.chunks))
        else:
            raise InvalidInputTypeError(
                "a cached value must be a str, a JSON dict/list/number/bool or a pydantic "
                f"model, got {kind.__name__}"
            )
        self._check_size(data)
        return data

    def encode_chunk(self, chunk: object) -> bytes:
        """:meth:`encode` for one chunk of a stream (which cannot itself be a recording)."""
        if type(chunk) is RecordedStream:
            raise InvalidInputTypeError("a stream's chunk cannot itself be a recorded stream")
        return self.encode(chunk)

    def _check_size(self, data: bytes) -> None:
        if self._max_value_bytes is not None and len(data) > self._max_value_bytes:
            raise ValueTooLargeError(
                f"value is {len(data)} bytes encoded, above max_value_bytes={self._max_value_bytes}"
            )

    def _encode_model(self, value: BaseModel) -> bytes:
        cls = type(value)
        self.register(cls)
        try:
            payload = value.model_dump_json().encode()
            equal = cls.model_validate_json(payload) == value
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(
                f"{cls.__name__} value cannot be stored as JSON: {exc}"
            ) from exc
        if not equal:
            raise InvalidInputError(
                f"{cls.__name__} value does not survive a JSON round trip unchanged"
            )
        return _frame(_MODEL, _type_name(cls).encode() + b"\n" + payload)

    def decode(self, data: bytes | str) -> Any:
        """Return the value stored as ``data``; O(size of data).

        Raises :class:`CorruptEntryError` for anything this codec did not write or whose
        model type is not registered here.
        """
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        if (
            len(data) < _HEADER_LEN
            or _LENGTH.unpack_from(data, _KIND_LEN)[0] != len(data) - _HEADER_LEN
        ):
            raise CorruptEntryError("stored value was not written by aiocache_llm, or is truncated")
        try:
            # text first, compared in place: the common answer, decoded with one copy
            if data.startswith(_STR):
                return data[_HEADER_LEN:].decode("utf-8")
            header = data[:_KIND_LEN]
            if header == _JSON:
                value = orjson.loads(memoryview(data)[_HEADER_LEN:])
                if type(value) in _JSON_TYPES:
                    return value
            elif header == _MODEL:
                return self._decode_model(data)
            elif header == _CHUNKS:
                return RecordedStream(self._decode_chunks(data))
        except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeError, ValidationError
            raise CorruptEntryError(f"stored value cannot be decoded: {exc}") from exc
        raise CorruptEntryError("stored value was not written by aiocache_llm")

    def _decode_chunks(self, data: bytes) -> list[Any]:
        chunks = []
        view = memoryview(data)
        at, end = _HEADER_LEN, len(data)
        while at < end:
            if end - at < _HEADER_LEN:
                raise CorruptEntryError("a recorded stream's chunk frame is truncated")
            size = _LENGTH.unpack_from(data, at + _KIND_LEN)[0]
            stop = at + _HEADER_LEN + size
            kind = data[at : at + _KIND_LEN]
            if stop > end or kind == _CHUNKS:
                raise CorruptEntryError("a recorded stream holds a malformed chunk frame")
            if kind == _STR:  # text deltas, the usual chunk: no second frame check
                try:
                    chunks.append(str(view[at + _HEADER_LEN : stop], "utf-8"))
                except UnicodeDecodeError as exc:
                    raise CorruptEntryError(f"stored chunk cannot be decoded: {exc}") from exc
            else:
                chunks.append(self.decode(bytes(view[at:stop])))
            at = stop
        return chunks

    def copier(self, value: object, data: bytes) -> Callable[[], Any]:
        """Return a function that builds a fresh copy of ``value`` from ``data``, its
        :meth:`encode` output, skipping the checks a stored entry needs (this codec
        wrote ``data`` a moment ago): a JSON parse, or one model validation."""
        if isinstance(value, BaseModel):
            payload = data[data.index(b"\n", _HEADER_LEN) + 1 :]
            return functools.partial(type(value).model_validate_json, payload)
        if type(value) in _JSON_TYPES:
            return functools.partial(orjson.loads, data[_HEADER_LEN:])
        return functools.partial(self.decode, data)

    def _decode_model(self, data: bytes) -> BaseModel:
        end = data.find(b"\n", _HEADER_LEN)
        if end < 0:
            raise CorruptEntryError("stored model value has no type name")
        name = data[_HEADER_LEN:end].decode("utf-8")
        cls = self._types.get(name)
        if cls is None:
            raise UndeclaredTypeError(
                f"stored model type {name!r} is not declared in this process: pass it in "
                "value_types=",
                type_name=name,
            )
        try:
            return cls.model_validate_json(data[end + 1 :])
        except ValidationError as exc:
            raise CorruptEntryError(f"stored {name} value does not validate: {exc}") from exc


class UndeclaredTypes:
    """Counts the entries a cache could not read for want of a declared model type.

    The first entry of each type name is logged (WARNING, the type name only: a class
    name, never data), so that a missing ``value_types=`` is said once, not per read.
    """

    __slots__ = ("_seen", "count")

    def __init__(self) -> None:
        self.count = 0
        self._seen: set[str] = set()

    def note(self, error: UndeclaredTypeError) -> None:
        self.count += 1
        if error.type_name not in self._seen and len(self._seen) < 1024:
            self._seen.add(error.type_name)
            logger.warning(
                "cached values of type %r are stored but not declared here: pass it in "
                "value_types= to read them (counted in undeclared_entries)",
                error.type_name,
            )


def _frame(kind: bytes, payload: bytes) -> bytes:
    if len(payload) > _MAX_PAYLOAD:
        raise ValueTooLargeError(f"value is {len(payload)} bytes encoded, above 4 GiB")
    return kind + _LENGTH.pack(len(payload)) + payload


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"value is not valid Unicode text: {exc}") from exc
