"""RateLimitConfig and ChatMemoryConfig: validated, frozen, failing where they are written."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from aiocache_llm import DEFAULT_ROLES, ChatMemoryConfig, RateLimitConfig
from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError


def test_rate_limit_config_defaults_and_budget() -> None:
    config = RateLimitConfig(1000)
    assert (config.max_tokens_per_minute, config.budget) == (1000, 1000)
    assert config.window_seconds == 60.0
    assert type(RateLimitConfig(5, window_seconds=2).window_seconds) is float
    assert RateLimitConfig(5, window_seconds=0.001).window_seconds == 0.001


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_tokens_per_minute": 0}, InvalidInputError, "max_tokens_per_minute"),
        ({"max_tokens_per_minute": -5}, InvalidInputError, "max_tokens_per_minute"),
        ({"max_tokens_per_minute": 1.5}, InvalidInputTypeError, "max_tokens_per_minute"),
        ({"max_tokens_per_minute": True}, InvalidInputTypeError, "max_tokens_per_minute"),
        ({"max_tokens_per_minute": "10"}, InvalidInputTypeError, "max_tokens_per_minute"),
        ({"max_tokens_per_minute": None}, InvalidInputTypeError, "max_tokens_per_minute"),
        ({"window_seconds": 0}, InvalidInputError, "window_seconds"),
        ({"window_seconds": -1}, InvalidInputError, "window_seconds"),
        ({"window_seconds": 0.0005}, InvalidInputError, "window_seconds"),
        ({"window_seconds": math.nan}, InvalidInputError, "window_seconds"),
        ({"window_seconds": math.inf}, InvalidInputError, "window_seconds"),
        ({"window_seconds": True}, InvalidInputTypeError, "window_seconds"),
        ({"window_seconds": "60"}, InvalidInputTypeError, "window_seconds"),
        ({"window_seconds": None}, InvalidInputTypeError, "window_seconds"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_rate_limit_config_raises_at_construction(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    arguments = {"max_tokens_per_minute": 100, **kwargs}
    with pytest.raises(error, match=name):
        RateLimitConfig(**arguments)


def test_chat_memory_config_defaults() -> None:
    config = ChatMemoryConfig()
    assert (config.max_turns, config.ttl_seconds, config.roles) == (20, None, DEFAULT_ROLES)
    assert config.max_messages == 40
    assert {"system", "user", "assistant", "tool"} <= DEFAULT_ROLES


def test_chat_memory_config_normalizes_what_it_keeps() -> None:
    config = ChatMemoryConfig(max_turns=3, ttl_seconds=2, roles=["user", "bot", "user"])  # type: ignore[arg-type]
    assert config.max_messages == 6
    assert type(config.ttl_seconds) is float
    assert config.ttl_seconds == 2.0
    assert config.roles == frozenset({"user", "bot"})
    assert type(config.roles) is frozenset
    assert ChatMemoryConfig(ttl_seconds=0.001).ttl_seconds == 0.001


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_turns": 0}, InvalidInputError, "max_turns"),
        ({"max_turns": -1}, InvalidInputError, "max_turns"),
        ({"max_turns": 2.0}, InvalidInputTypeError, "max_turns"),
        ({"max_turns": True}, InvalidInputTypeError, "max_turns"),
        ({"max_turns": None}, InvalidInputTypeError, "max_turns"),
        ({"ttl_seconds": 0}, InvalidInputError, "ttl_seconds"),
        ({"ttl_seconds": -1}, InvalidInputError, "ttl_seconds"),
        ({"ttl_seconds": 0.0009}, InvalidInputError, "ttl_seconds"),
        ({"ttl_seconds": math.nan}, InvalidInputError, "ttl_seconds"),
        ({"ttl_seconds": math.inf}, InvalidInputError, "ttl_seconds"),
        ({"ttl_seconds": True}, InvalidInputTypeError, "ttl_seconds"),
        ({"ttl_seconds": "1"}, InvalidInputTypeError, "ttl_seconds"),
        ({"roles": "user"}, InvalidInputTypeError, "roles"),
        ({"roles": frozenset()}, InvalidInputError, "roles"),
        ({"roles": ["user", ""]}, InvalidInputTypeError, "roles"),
        ({"roles": ["user", 1]}, InvalidInputTypeError, "roles"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_chat_memory_config_raises_at_construction(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        ChatMemoryConfig(**kwargs)


@pytest.mark.parametrize("roles", [None, 5], ids=["none", "int"])
def test_non_collection_roles_raise_a_library_error_naming_roles(roles: Any) -> None:
    with pytest.raises(InvalidInputTypeError, match="roles"):
        ChatMemoryConfig(roles=roles)


def test_roles_given_as_a_generator_are_kept() -> None:
    config = ChatMemoryConfig(roles=(role for role in ["user", "assistant"]))  # type: ignore[arg-type]
    assert config.roles == frozenset({"user", "assistant"})


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [
        (RateLimitConfig(10), "max_tokens_per_minute", 0),
        (ChatMemoryConfig(), "max_turns", 0),
        (ChatMemoryConfig(), "roles", frozenset()),
    ],
    ids=["rate-limit", "chat-max-turns", "chat-roles"],
)
def test_configs_are_frozen(config: Any, field: str, value: Any) -> None:
    before = getattr(config, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, value)
    assert getattr(config, field) == before


def test_equal_configs_are_equal_and_hashable() -> None:
    assert ChatMemoryConfig(5, 1.0, frozenset({"user"})) == ChatMemoryConfig(5, 1, ["user"])  # type: ignore[arg-type]
    assert len({RateLimitConfig(10, 60), RateLimitConfig(10, 60.0)}) == 1
    assert ChatMemoryConfig(max_turns=5) != ChatMemoryConfig(max_turns=6)
