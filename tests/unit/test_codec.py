"""The value codec: data-only encoding that never constructs what stored data names."""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, create_model, model_validator

from aiocache_llm import DEFAULT_MAX_VALUE_BYTES, LLMResponse, RecordedStream, Usage
from aiocache_llm.core.codec import ValueCodec
from aiocache_llm.core.errors import (
    CorruptEntryError,
    InvalidInputError,
    InvalidInputTypeError,
    UndeclaredTypeError,
    ValueTooLargeError,
)
from tests.properties.checks import assert_identical

CODEC = ValueCodec()

text = st.text(alphabet=st.characters(codec="utf-8"))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5),
    max_leaves=30,
)
# None is the one JSON value a cache cannot hold: get() answers None for a miss
storable_json = json_trees.filter(lambda value: value is not None)


@given(value=storable_json)
def test_any_json_value_but_null_round_trips_identically(value: Any) -> None:
    assert_identical(CODEC.decode(CODEC.encode(value)), value)


@given(value=text)
def test_any_str_round_trips_identically(value: str) -> None:
    assert_identical(CODEC.decode(CODEC.encode(value)), value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "null",
        '{"looks": "like json"}',
        "\x00\u2028\U0001f99c",
        "acl\x01j[]",
        [],
        {},
        True,
        0,
        1.0,
        -0.0,
        2**64 - 1,
        -(2**63),
        5e-324,
    ],
    ids=[
        "empty",
        "null-text",
        "json-text",
        "controls",
        "our-own-header",
        "empty-list",
        "empty-dict",
        "bool",
        "zero",
        "float-one",
        "negative-zero",
        "uint64-max",
        "int64-min",
        "subnormal",
    ],
)
def test_edge_values_round_trip_identically(value: Any) -> None:
    assert_identical(CODEC.decode(CODEC.encode(value)), value)


def test_decode_accepts_the_data_as_str_too() -> None:
    data = CODEC.encode({"a": ["é", 1]})
    assert CODEC.decode(data.decode("utf-8", "surrogateescape")) == {"a": ["é", 1]}


def test_every_decode_builds_new_containers() -> None:
    data = CODEC.encode({"answer": ["Paris"]})
    first = CODEC.decode(data)
    first["answer"].append("Lyon")
    assert CODEC.decode(data) == {"answer": ["Paris"]}


class _Dataclassish:
    pass


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ((1, 2), InvalidInputTypeError),
        ({"a": (1, 2)}, InvalidInputError),
        ({1, 2}, InvalidInputTypeError),
        ([{1, 2}], InvalidInputTypeError),
        ({"x": float("nan")}, InvalidInputError),
        ([float("-inf")], InvalidInputError),
        ({1: "int key"}, InvalidInputTypeError),
        ({("a",): "tuple key"}, InvalidInputTypeError),
        ("lone \ud800", InvalidInputError),
        ({"k\udfff": 1}, InvalidInputError),
        (["\udc80"], InvalidInputError),
        (b"bytes", InvalidInputTypeError),
        ([b"bytes"], InvalidInputTypeError),
        (bytearray(b"x"), InvalidInputTypeError),
        (None, InvalidInputTypeError),
        (float("nan"), InvalidInputError),
        (float("inf"), InvalidInputError),
        (2**64, InvalidInputTypeError),
        ([2**64], InvalidInputTypeError),
        ([-(2**63) - 1], InvalidInputTypeError),
        ([_Dataclassish()], InvalidInputTypeError),
    ],
    ids=[
        "tuple",
        "nested-tuple",
        "set",
        "nested-set",
        "nan",
        "inf",
        "int-key",
        "tuple-key",
        "surrogate",
        "surrogate-key",
        "nested-surrogate",
        "bytes",
        "nested-bytes",
        "bytearray",
        "none",
        "top-level-nan",
        "top-level-inf",
        "top-level-int-above-64-bits",
        "int-above-64-bits",
        "int-below-64-bits",
        "object",
    ],
)
def test_values_that_would_not_come_back_equal_are_refused(
    value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="value"):
        CODEC.encode(value)


# decoding foreign data


class _Explodes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (pytest.fail, ("stored data was unpickled",))


def _truncations(data: bytes) -> list[bytes]:
    return [data[:cut] for cut in range(len(data))]


def _length(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big")


def _framed(kind: bytes, payload: bytes) -> bytes:
    """An envelope whose frame is right, so only its kind or payload can refuse it."""
    return b"acl\x01" + kind + _length(payload) + payload


@pytest.mark.parametrize(
    "data",
    [
        b"",
        pickle.dumps(_Explodes()),
        pickle.dumps({"a": 1}),
        pickle.dumps("text", protocol=0),
        json.dumps({"a": 1}).encode(),
        b'"a json string"',
        b"acl\x01",
        b"acl\x02s" + _length(b""),
        b"ACL\x01s" + _length(b"hello") + b"hello",
        _framed(b"x", b"{}"),
        _framed(b"j", b""),
        _framed(b"j", b'"str"'),
        _framed(b"j", b"null"),
        _framed(b"j", b"{not json"),
        _framed(b"s", b"\xff\xfe"),
        _framed(b"m", b""),
        _framed(b"m", b"no newline"),
        _framed(b"m", b"\xff\n{}"),
        _framed(b"m", b"aiocache_llm.core.values.LLMResponse\n{not json"),
        _framed(b"m", b'aiocache_llm.core.values.LLMResponse\n{"usage": 5}'),
        _framed(b"s", b"hello")[:-1],
        _framed(b"s", b"hello") + b"!",
    ],
    ids=[
        "empty",
        "pickle-exploding",
        "pickle-dict",
        "pickle-protocol-0",
        "foreign-json",
        "foreign-json-str",
        "header-only",
        "other-version",
        "wrong-magic",
        "unknown-kind",
        "json-empty",
        "json-str",
        "json-null",
        "bad-json",
        "bad-utf8",
        "model-no-name",
        "model-no-newline",
        "model-bad-utf8-name",
        "model-bad-json",
        "model-invalid",
        "truncated",
        "overlong",
    ],
)
def test_foreign_data_is_a_corrupt_entry(data: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        CODEC.decode(data)


@pytest.mark.parametrize(
    "value",
    [
        {"answer": ["Paris", {"n": 1}]},
        [1, "two", None],
        LLMResponse(content="Paris", usage=Usage(total_tokens=3)),
        "é",
    ],
    ids=["dict", "list", "model", "multibyte-str"],
)
def test_truncated_data_is_a_corrupt_entry(value: Any) -> None:
    data = CODEC.encode(value)
    # a str cut between characters is still a str: only cuts inside the header or a
    # multibyte character are detectable, and every cut of those must be refused
    cuts = _truncations(data)
    if isinstance(value, str):
        cuts = [*cuts[:5], data[:-1]]
    for cut in cuts:
        with pytest.raises(CorruptEntryError):
            CODEC.decode(cut)


constructed: list[str] = []


class Tracked(BaseModel):
    """Records every construction, to prove decoding never built one."""

    name: str = "x"

    @model_validator(mode="after")
    def _record(self) -> Tracked:
        constructed.append(self.name)
        return self


def _model_data(type_name: str, payload: bytes = b"{}") -> bytes:
    body = type_name.encode() + b"\n" + payload
    # a well-formed envelope (the length matches), so only the type name can refuse it
    return b"acl\x01m" + len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    "type_name",
    [
        "os.system",
        "builtins.eval",
        "subprocess.Popen",
        "pydantic.main.BaseModel",
        f"{Tracked.__module__}.{Tracked.__qualname__}",
    ],
    ids=["os-system", "eval", "popen", "base-model", "real-but-unregistered"],
)
def test_an_unregistered_type_name_constructs_and_imports_nothing(
    type_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(f"decoding called a function named by stored data: {args}")

    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr("importlib.import_module", forbidden)
    constructed.clear()
    with pytest.raises(UndeclaredTypeError, match="not declared in this process") as caught:
        CODEC.decode(_model_data(type_name, b'{"name": "echo pwned"}'))
    assert isinstance(caught.value, CorruptEntryError)  # a miss for every cache, as before
    assert caught.value.type_name == type_name
    assert constructed == []


def test_a_type_another_codec_learned_is_unknown_here() -> None:
    writer = ValueCodec()
    data = writer.encode(Tracked(name="stored"))
    assert writer.decode(data) == Tracked(name="stored")
    constructed.clear()
    with pytest.raises(CorruptEntryError, match="value_types"):
        ValueCodec().decode(data)
    assert constructed == []


# models


class Completion(BaseModel):
    """A user-declared response type, as an SDK's completion object would be."""

    id: str
    choices: list[dict[str, Any]]
    created: int | None = None


def test_llm_response_round_trips_as_a_new_equal_object() -> None:
    value = LLMResponse(
        content="Paris",
        model="m",
        finish_reason="stop",
        tool_calls=[{"id": "t1", "function": {"name": "f", "arguments": "{}"}}],
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        metadata={"nested": [1, {"x": None}]},
    )
    data = CODEC.encode(value)
    got = CODEC.decode(data)
    assert type(got) is LLMResponse
    assert got == value
    assert got is not value
    got.tool_calls.append({"id": "t2"})
    assert CODEC.decode(data) == value


def test_declared_model_round_trips_through_another_codec_that_declares_it() -> None:
    value = Completion(id="c1", choices=[{"text": "Paris"}], created=1)
    data = ValueCodec().encode(value)
    got = ValueCodec([Completion]).decode(data)
    assert type(got) is Completion
    assert got == value


def test_a_model_that_would_not_come_back_equal_is_refused() -> None:
    loose = create_model("Loose", payload=(Any, ...))
    with pytest.raises(InvalidInputError, match="round trip"):
        CODEC.encode(loose(payload=(1, 2)))
    with pytest.raises(InvalidInputError):
        CODEC.encode(create_model("Scores", score=(float, ...))(score=float("nan")))


def test_registering_is_idempotent_and_conflicts_are_refused() -> None:
    codec = ValueCodec([Completion, Completion])
    codec.register(Completion)
    first = create_model("Twin", __module__="app.models", x=(int, 0))
    second = create_model("Twin", __module__="app.models", x=(int, 0))
    codec.register(first)
    with pytest.raises(InvalidInputTypeError, match=r"app\.models\.Twin"):
        codec.register(second)
    with pytest.raises(InvalidInputTypeError, match=r"app\.models\.Twin"):
        codec.encode(second())
    # the first registration still decodes as itself
    assert type(codec.decode(codec.encode(first(x=1)))) is first
    with pytest.raises(InvalidInputTypeError, match=r"app\.models\.Twin"):
        ValueCodec([first, second])


@pytest.mark.parametrize("not_a_model", [dict, "LLMResponse", LLMResponse(), int, object], ids=str)
def test_only_pydantic_model_classes_can_be_registered(not_a_model: Any) -> None:
    with pytest.raises(InvalidInputTypeError, match="value_types"):
        ValueCodec([not_a_model])


# max_value_bytes


def test_max_value_bytes_bounds_the_encoded_size_inclusively() -> None:
    value = {"text": "é" * 40}
    size = len(ValueCodec(max_value_bytes=None).encode(value))
    assert ValueCodec(max_value_bytes=size).encode(value)
    with pytest.raises(ValueTooLargeError, match=f"max_value_bytes={size - 1}"):
        ValueCodec(max_value_bytes=size - 1).encode(value)
    with pytest.raises(ValueTooLargeError):
        ValueCodec(max_value_bytes=10).encode(LLMResponse(content="x" * 20))


def test_max_value_bytes_defaults_and_unbounded_spellings() -> None:
    assert ValueCodec().max_value_bytes == DEFAULT_MAX_VALUE_BYTES
    assert ValueCodec(max_value_bytes=None).max_value_bytes is None
    assert ValueCodec(max_value_bytes=0).max_value_bytes is None
    big = "x" * (DEFAULT_MAX_VALUE_BYTES + 1)
    assert ValueCodec(max_value_bytes=0).decode(ValueCodec(max_value_bytes=0).encode(big)) == big
    with pytest.raises(ValueTooLargeError):
        ValueCodec().encode(big)


@pytest.mark.parametrize(
    ("limit", "error"),
    [(-1, InvalidInputError), (1.5, InvalidInputTypeError), (True, InvalidInputTypeError)],
    ids=["negative", "float", "bool"],
)
def test_bad_max_value_bytes_fails_at_construction(limit: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_value_bytes"):
        ValueCodec(max_value_bytes=limit)


def test_recorded_stream_round_trips_chunk_by_chunk() -> None:
    chunks = ["a", {"b": [1]}, LLMResponse(content="c"), 2.5, True]
    decoded = CODEC.decode(CODEC.encode(RecordedStream(chunks)))
    assert type(decoded) is RecordedStream
    assert decoded.chunks == chunks
    assert [type(c) for c in decoded.chunks] == [type(c) for c in chunks]
    assert CODEC.decode(CODEC.encode(RecordedStream([]))) == RecordedStream([])


def test_recorded_stream_refuses_bad_chunks_before_storing() -> None:
    with pytest.raises(InvalidInputTypeError):
        CODEC.encode(RecordedStream(["a", object()]))
    with pytest.raises(InvalidInputTypeError, match="recorded stream"):
        CODEC.encode(RecordedStream([RecordedStream(["nested"])]))
    with pytest.raises(ValueTooLargeError):
        ValueCodec(max_value_bytes=64).encode(RecordedStream(["x" * 30, "y" * 30]))


@pytest.mark.parametrize("cut", [1, 5, 9, 13])
def test_truncated_or_spliced_recordings_are_corrupt(cut: int) -> None:
    data = CODEC.encode(RecordedStream(["hello", "world"]))
    with pytest.raises(CorruptEntryError):
        CODEC.decode(data[:-cut])
    payload = data[9:]
    # a well-framed recording whose inner frames are cut: never a partial answer
    forged = data[:5] + len(payload[:-cut]).to_bytes(4, "big") + payload[:-cut]
    with pytest.raises(CorruptEntryError):
        CODEC.decode(forged)
    nested = data[:5] + len(data).to_bytes(4, "big") + data
    with pytest.raises(CorruptEntryError):
        CODEC.decode(nested)


@pytest.mark.parametrize(
    "value", [{"a": [1, {"b": 2.5}]}, [1, "two"], LLMResponse(content="x", metadata={"k": [1]})]
)
def test_copier_builds_equal_independent_copies_of_mutable_values(value: Any) -> None:
    make = CODEC.copier(value, CODEC.encode(value))
    first, second = make(), make()
    assert type(first) is type(value)
    assert first == value
    assert second == value
    assert first is not second
    assert first is not value


def test_a_recorded_text_chunk_that_is_not_utf8_is_corrupt() -> None:
    data = bytearray(CODEC.encode(RecordedStream(["ab", "cd"])))
    data[-1] = 0xFF  # inside the last chunk's text
    with pytest.raises(CorruptEntryError):
        CODEC.decode(bytes(data))
