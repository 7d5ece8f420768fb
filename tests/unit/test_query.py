"""Queries and their keys: signature, normalization and the semantic split."""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from aiocache_llm import IGNORED_FIELDS, default_normalize, signature
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.query import QueryKeys, canonical_json

QUERY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "temperature": 0.5,
    "max_tokens": 64,
}


def independent_signature(request: dict[str, Any]) -> str:
    """SHA-256 of canonical JSON computed with the standard library, not orjson."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with dict keys re-inserted in a random order at every depth."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


# floats are left out: orjson and the json module spell exponents differently
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(alphabet=st.characters(codec="utf-8"))
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
requests = st.fixed_dictionaries(
    {"model": st.text(min_size=1), "messages": st.lists(json_values, max_size=3)},
    optional={"params": st.dictionaries(st.text(min_size=1), json_values, max_size=4)},
)


@given(request=requests, seed=st.integers())
def test_signature_ignores_key_order_at_every_depth(request: dict[str, Any], seed: int) -> None:
    assert signature(shuffled(request, random.Random(seed))) == signature(request)


@given(request=requests)
def test_signature_is_sha256_of_canonical_json(request: dict[str, Any]) -> None:
    assert signature(request) == independent_signature(request)


def test_signature_of_a_request_with_floats_matches_the_independent_hash() -> None:
    assert signature(QUERY) == independent_signature(QUERY)


def test_nested_reordering_keeps_the_key() -> None:
    reordered = {
        "max_tokens": 64,
        "temperature": 0.5,
        "messages": [
            {"content": "Be brief.", "role": "system"},
            {"content": "Capital of France?", "role": "user"},
        ],
        "model": "gpt-4o-mini",
    }
    assert signature(reordered) == signature(QUERY)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"temperature": 0.7},
        {"max_tokens": 65},
        {"messages": [{"role": "user", "content": "Capital of France?"}]},
        {"messages": [{"role": "user", "content": "capital of France?"}]},
        {"seed": 1},
        {"temperature": 1},
    ],
    ids=["model", "temperature", "max_tokens", "no-system", "case", "extra-param", "int-vs-float"],
)
def test_anything_that_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    assert signature({**QUERY, **change}) != signature(QUERY)


def test_bool_and_int_get_different_keys() -> None:
    assert signature({**QUERY, "n": True}) != signature({**QUERY, "n": 1})


@pytest.mark.parametrize("field", sorted(IGNORED_FIELDS))
def test_each_ignored_field_is_left_out_of_the_key(field: str) -> None:
    assert signature({**QUERY, field: {"any": "value"}}) == signature(QUERY)


def test_top_level_none_is_dropped_but_nested_none_is_kept() -> None:
    assert signature({**QUERY, "tools": None, "seed": None}) == signature(QUERY)
    named = {**QUERY, "messages": [{"role": "user", "content": "hi", "name": None}]}
    unnamed = {**QUERY, "messages": [{"role": "user", "content": "hi"}]}
    assert signature(named) != signature(unnamed)


def test_default_normalize_does_not_copy_or_mutate() -> None:
    assert default_normalize(QUERY) is QUERY
    request = {**QUERY, "user": "alice", "seed": None}
    before = dict(request)
    assert default_normalize(request) == QUERY
    assert request == before


def test_str_query_is_one_user_message() -> None:
    as_dict = {"messages": [{"role": "user", "content": "hello ✓"}]}
    assert signature("hello ✓") == signature(as_dict) == independent_signature(as_dict)


class ChatRequest(BaseModel):
    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    user: str | None = None


def test_pydantic_query_has_the_key_of_its_dict() -> None:
    model = ChatRequest(model=QUERY["model"], messages=QUERY["messages"], user="alice")
    as_dict = {"model": QUERY["model"], "messages": QUERY["messages"]}
    assert signature(model) == signature(as_dict)
    assert signature(model.model_copy(update={"temperature": 0.5})) != signature(as_dict)


def test_any_mapping_is_a_query() -> None:
    assert signature(MappingProxyType(QUERY)) == signature(QUERY)
    assert signature(OrderedDict(reversed(list(QUERY.items())))) == signature(QUERY)


def test_normalize_hook_replaces_the_default() -> None:
    def lowercase(request: dict[str, Any]) -> dict[str, Any]:
        messages = [{**m, "content": m["content"].lower()} for m in request["messages"]]
        return {**request, "messages": messages}

    assert signature("Hello", normalize=lowercase) == signature("hello", normalize=lowercase)
    assert signature("Hello") != signature("hello")
    # the hook replaces default_normalize: ignored fields count again unless it drops them
    with_user = {**QUERY, "user": "alice"}
    assert signature(with_user, normalize=lowercase) != signature(QUERY, normalize=lowercase)


def test_normalize_hook_must_be_callable_and_return_a_mapping() -> None:
    with pytest.raises(InvalidInputTypeError, match="normalize must be callable"):
        QueryKeys("lower")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputTypeError, match="normalize must return a mapping"):
        signature(QUERY, normalize=lambda request: [request])  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({**QUERY, "temperature": float("nan")}, "temperature"),
        ({**QUERY, "temperature": float("inf")}, "temperature"),
        ({**QUERY, "logit_bias": {"50256": -float("inf")}}, "logit_bias"),
        ({**QUERY, "messages": [{"role": "user", "content": [{"w": [1.0, float("nan")]}]}]}, "w"),
        ({**QUERY, "stop": ("x", float("nan"))}, "stop"),
    ],
    ids=["nan", "inf", "nested-dict", "deep-list", "tuple"],
)
def test_non_finite_floats_are_refused_naming_where(bad: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidInputError, match=where):
        signature(bad)


def test_nan_in_a_pydantic_query_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="non-finite"):
        signature(ChatRequest(model="m", messages=[], temperature=float("nan")))


@dataclass
class SamplingParams:
    temperature: float


def test_nan_inside_a_dataclass_in_a_query_is_refused() -> None:
    with pytest.raises((InvalidInputError, InvalidInputTypeError)):
        signature({**QUERY, "sampling": SamplingParams(float("nan"))})


def test_the_text_null_and_real_nulls_are_fine_and_distinct() -> None:
    text_null = {"messages": [{"role": "user", "content": "null"}]}
    real_null = {"messages": [{"role": "user", "content": None}]}
    nested = {"messages": [{"role": "user", "content": "x"}], "stop": [None, "null", "NaN"]}
    keys = {signature(text_null), signature(real_null), signature(nested)}
    assert len(keys) == 3
    assert signature(text_null) == independent_signature(text_null)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("", InvalidInputError),
        ({}, InvalidInputError),
        (MappingProxyType({}), InvalidInputError),
        (42, InvalidInputTypeError),
        (None, InvalidInputTypeError),
        (b"bytes", InvalidInputTypeError),
        ([{"role": "user", "content": "hi"}], InvalidInputTypeError),
        ({**QUERY, "x": object()}, InvalidInputTypeError),
        ({**QUERY, "x": {1, 2}}, InvalidInputTypeError),
        ({**QUERY, "x": {1: "int key"}}, InvalidInputTypeError),
        ({**QUERY, "x": 2**64}, InvalidInputTypeError),
        ("lone \ud800", InvalidInputError),
        ({**QUERY, "x": {"k\udfff": 1}}, InvalidInputError),
    ],
    ids=[
        "empty-str",
        "empty-dict",
        "empty-mapping",
        "int",
        "none",
        "bytes",
        "list",
        "object",
        "set",
        "int-key",
        "int-beyond-64-bits",
        "surrogate",
        "surrogate-key",
    ],
)
def test_bad_queries_raise_the_library_errors(bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="query"):
        signature(bad)


def test_canonical_json_keeps_key_order_when_asked() -> None:
    value = {"b": 1, "a": [{"d": 2, "c": 3}]}
    assert canonical_json(value) == b'{"a":[{"c":3,"d":2}],"b":1}'
    assert canonical_json(value, sort_keys=False) == b'{"b":1,"a":[{"d":2,"c":3}]}'
    with pytest.raises(InvalidInputError, match="value"):
        canonical_json({"x": float("nan")}, what="value")


# semantic_parts: (scope, text, digest)

KEYS = QueryKeys()
SEMANTIC: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "temperature": 0.0,
}


def with_last_user(content: Any, query: dict[str, Any] = SEMANTIC) -> dict[str, Any]:
    messages = [*query["messages"][:-1], {"role": "user", "content": content}]
    return {**query, "messages": messages}


def test_semantic_text_is_the_last_user_message_and_scope_excludes_it() -> None:
    scope, text, digest = KEYS.semantic_parts(SEMANTIC)
    assert text == "What is the capital of France?"
    assert digest == signature(SEMANTIC)
    other_scope, other_text, other_digest = KEYS.semantic_parts(
        with_last_user("Which city is France's capital?")
    )
    assert other_scope == scope
    assert other_text != text
    assert other_digest != digest


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"temperature": 0.9},
        {"max_tokens": 10},
        {
            "messages": [
                {"role": "system", "content": "Answer in German."},
                *SEMANTIC["messages"][1:],
            ]
        },
        {"messages": [SEMANTIC["messages"][0], *SEMANTIC["messages"][3:]]},
        {
            "messages": [
                *SEMANTIC["messages"][:3],
                {"role": "user", "content": SEMANTIC["messages"][3]["content"], "name": "bob"},
            ]
        },
    ],
    ids=["model", "temperature", "max-tokens", "system-prompt", "earlier-turns", "user-name"],
)
def test_everything_but_the_last_user_text_is_scope(change: dict[str, Any]) -> None:
    scope, text, _ = KEYS.semantic_parts(SEMANTIC)
    changed_scope, changed_text, _ = KEYS.semantic_parts({**SEMANTIC, **change})
    assert changed_text == text
    assert changed_scope != scope


def test_ignored_fields_do_not_change_the_scope() -> None:
    scope = KEYS.semantic_parts(SEMANTIC)[0]
    assert KEYS.semantic_parts({**SEMANTIC, "user": "alice", "stream": True})[0] == scope


def test_list_of_parts_content_joins_its_text_parts() -> None:
    parts = [
        {"type": "text", "text": "What is in"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "this picture?"},
    ]
    scope, text, _ = KEYS.semantic_parts(with_last_user(parts))
    assert text == "What is in\nthis picture?"
    # the image is part of the scope: the text-only question is another scope
    assert scope != KEYS.semantic_parts(SEMANTIC)[0]


def test_non_text_parts_of_the_last_user_message_are_scope() -> None:
    def about(url: str) -> dict[str, Any]:
        return with_last_user(
            [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ]
        )

    assert KEYS.semantic_parts(about("a.png"))[0] != KEYS.semantic_parts(about("b.png"))[0]


def test_str_query_is_its_own_semantic_text() -> None:
    scope, text, digest = KEYS.semantic_parts("How tall is Everest?")
    assert text == "How tall is Everest?"
    assert scope == KEYS.semantic_parts("How high is Mount Everest?")[0]
    assert digest == signature("How tall is Everest?")


@pytest.mark.parametrize(
    ("query", "error", "match"),
    [
        ({"model": "m"}, InvalidInputError, "messages"),
        ({"model": "m", "messages": []}, InvalidInputError, "messages"),
        ({"model": "m", "messages": "hi"}, InvalidInputError, "messages"),
        (
            {"model": "m", "messages": [{"role": "system", "content": "x"}]},
            InvalidInputError,
            "user",
        ),
        (with_last_user("   "), InvalidInputError, "no text"),
        (
            with_last_user([{"type": "image_url", "image_url": {"url": "x"}}]),
            InvalidInputError,
            "no text",
        ),
        (with_last_user(42), InvalidInputTypeError, "content"),
    ],
    ids=["no-messages", "empty", "not-a-list", "no-user", "blank", "image-only", "int-content"],
)
def test_semantic_parts_refuses_queries_without_user_text(
    query: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        KEYS.semantic_parts(query)


@pytest.mark.parametrize("text", ["What is Redis?", "  padded  ", "ünïcode ✓", "a"])
def test_plain_text_queries_split_like_their_request_dict(text: str) -> None:
    fast = QueryKeys().semantic_parts(text)
    # a hook equal to the default forces the general path
    slow = QueryKeys(lambda request: default_normalize(request)).semantic_parts(text)
    assert fast == slow
    assert fast[1] == text


@pytest.mark.parametrize("text", ["", "   "])
def test_blank_plain_text_queries_are_refused(text: str) -> None:
    with pytest.raises(InvalidInputError):
        QueryKeys().semantic_parts(text)
