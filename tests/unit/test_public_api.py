"""The public surface: ``__all__`` carries every name the contract (DESIGN.md) makes public.

The contract's names and constructor signatures are written out here, so a rename or a
changed default fails this test rather than a user's code. When the contract file is
next to the checkout (``../shared/DESIGN.md``), its backticked names are checked too.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import aiocache_llm

CONTRACT_NAMES = {
    # values and keys
    "LLMResponse",
    "Usage",
    "CacheStats",
    "signature",
    # layer 1
    "AsyncExactCache",
    "AsyncSemanticCache",
    "AsyncRateLimiter",
    "AsyncChatMemory",
    "MemoryExactCache",
    "RedisExactCache",
    "MemorySemanticCache",
    "RedisSemanticCache",
    "MemoryRateLimiter",
    "RedisRateLimiter",
    "MemoryChatMemory",
    "RedisChatMemory",
    "RateLimitConfig",
    "ChatMemoryConfig",
    "RateLimitExceeded",
    # layers 2 and 3
    "SingleFlight",
    "InferenceGateway",
    "cached_completion",
    # semantic quality
    "SemanticGuard",
}

# (class, parameter, default) the contract writes down; inspect.Parameter.empty = required
CONTRACT_DEFAULTS: list[tuple[str, str, Any]] = [
    ("MemoryExactCache", "max_size", 1024),
    ("MemoryExactCache", "ttl_seconds", None),
    ("RedisExactCache", "max_size", None),
    ("RedisExactCache", "url", None),
    ("RedisExactCache", "client", None),
    ("RedisExactCache", "ttl_seconds", None),
    ("MemorySemanticCache", "embed_fn", inspect.Parameter.empty),
    ("MemorySemanticCache", "similarity_threshold", 0.95),
    ("MemorySemanticCache", "max_size", 512),
    ("MemorySemanticCache", "ttl_seconds", None),
    ("RedisSemanticCache", "embed_fn", inspect.Parameter.empty),
    ("RedisSemanticCache", "similarity_threshold", 0.95),
    ("RedisSemanticCache", "max_size", None),
    ("RedisSemanticCache", "ttl_seconds", None),
    ("MemorySemanticCache", "verify", None),
    ("RedisSemanticCache", "verify", None),
    ("MemoryRateLimiter", "config", inspect.Parameter.empty),
    ("RedisRateLimiter", "config", inspect.Parameter.empty),
    ("RedisChatMemory", "config", None),
    ("RateLimitConfig", "max_tokens_per_minute", inspect.Parameter.empty),
    ("RateLimitConfig", "window_seconds", 60),
    ("ChatMemoryConfig", "max_turns", 20),
    ("ChatMemoryConfig", "ttl_seconds", None),
    ("InferenceGateway", "provider", inspect.Parameter.empty),
    ("InferenceGateway", "exact_cache", None),
    ("InferenceGateway", "semantic_cache", None),
    ("InferenceGateway", "rate_limiter", None),
]

CONTRACT_METHODS = {
    "AsyncExactCache": ["get", "put", "invalidate", "clear", "stats"],
    "AsyncSemanticCache": ["get", "put", "invalidate", "clear", "stats"],
    "AsyncRateLimiter": ["check_and_consume", "get_remaining", "acquire", "reset"],
    "AsyncChatMemory": ["append", "get_history", "clear"],
}
IMPLEMENTATIONS = {
    "AsyncExactCache": ["MemoryExactCache", "RedisExactCache"],
    "AsyncSemanticCache": ["MemorySemanticCache", "RedisSemanticCache"],
    "AsyncRateLimiter": ["MemoryRateLimiter", "RedisRateLimiter"],
    "AsyncChatMemory": ["MemoryChatMemory", "RedisChatMemory"],
}

# capability protocols the gateway checks instead of classes: the built-ins that have
# each one (and none of the others of their kind)
CAPABILITIES = {
    "AsyncSignatureKeyedCache": ["MemoryExactCache", "RedisExactCache"],
    "SupportsInlineCompletion": ["MemoryExactCache"],
    "SupportsValueCodec": ["MemoryExactCache", "RedisExactCache"],
    "AsyncFleetExactCache": ["RedisExactCache"],
    "AsyncReservingRateLimiter": ["MemoryRateLimiter", "RedisRateLimiter"],
    "AsyncUsageRecordingRateLimiter": ["MemoryRateLimiter", "RedisRateLimiter"],
    "AsyncBudgetedRateLimiter": ["MemoryRateLimiter", "RedisRateLimiter"],
    "AsyncFailurePolicyRateLimiter": ["RedisRateLimiter"],
    "StreamingProvider": [],
}


def test_every_contract_name_is_exported() -> None:
    missing = CONTRACT_NAMES - set(aiocache_llm.__all__)
    assert not missing, f"contract names missing from __all__: {sorted(missing)}"


def test_all_is_unique_and_every_name_resolves() -> None:
    assert len(aiocache_llm.__all__) == len(set(aiocache_llm.__all__))
    for name in aiocache_llm.__all__:
        assert getattr(aiocache_llm, name, None) is not None, name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from aiocache_llm import *", namespace)
    exported = {name for name in namespace if not name.startswith("__")}
    assert exported == set(aiocache_llm.__all__)


@pytest.mark.parametrize(("cls", "parameter", "default"), CONTRACT_DEFAULTS)
def test_contract_parameters_keep_their_defaults(cls: str, parameter: str, default: Any) -> None:
    parameters = inspect.signature(getattr(aiocache_llm, cls)).parameters
    assert parameter in parameters, f"{cls} lost its {parameter!r} parameter"
    assert parameters[parameter].default == default


@pytest.mark.parametrize("protocol", sorted(CONTRACT_METHODS))
def test_twins_share_the_protocol_methods_in_one_order(protocol: str) -> None:
    methods = CONTRACT_METHODS[protocol]
    for name in IMPLEMENTATIONS[protocol]:
        cls = getattr(aiocache_llm, name)
        for method in methods:
            assert inspect.iscoroutinefunction(getattr(cls, method)), f"{name}.{method}"
        # the twins read alike: the contract methods appear in the same order in source
        source = inspect.getsource(cls)
        positions = [source.index(f"async def {method}(") for method in methods]
        assert positions == sorted(positions), f"{name} orders its methods differently"


async def test_capabilities_are_exported_and_the_built_ins_have_exactly_theirs() -> None:
    unexported = set(CAPABILITIES) - set(aiocache_llm.__all__)
    assert not unexported, f"capabilities missing from __all__: {sorted(unexported)}"
    config = aiocache_llm.RateLimitConfig(10)
    unreachable = "redis://127.0.0.1:1/0"  # built, never connected
    built = [
        aiocache_llm.MemoryExactCache(),
        aiocache_llm.RedisExactCache(url=unreachable),
        aiocache_llm.MemoryRateLimiter(config),
        aiocache_llm.RedisRateLimiter(url=unreachable, config=config),
    ]
    try:
        for capability, names in CAPABILITIES.items():
            protocol = getattr(aiocache_llm, capability)
            for instance in built:
                has = type(instance).__name__ in names
                assert isinstance(instance, protocol) is has, (capability, instance)
        assert built[0].completes_inline is True  # only True promises it
    finally:
        for instance in built:
            await instance.aclose()


def test_every_class_is_an_async_context_manager() -> None:
    for names in IMPLEMENTATIONS.values():
        for name in names:
            cls = getattr(aiocache_llm, name)
            assert hasattr(cls, "__aenter__")
            assert hasattr(cls, "__aexit__")
            assert inspect.iscoroutinefunction(cls.aclose)


def test_exceptions_share_one_root_and_never_shadow_builtins() -> None:
    import builtins

    errors = [
        getattr(aiocache_llm, name)
        for name in aiocache_llm.__all__
        if isinstance(getattr(aiocache_llm, name), type)
        and issubclass(getattr(aiocache_llm, name), BaseException)
    ]
    assert errors
    for error in errors:
        assert issubclass(error, aiocache_llm.AiocacheLLMError), error
        assert not hasattr(builtins, error.__name__), f"{error.__name__} shadows a built-in"


def test_package_ships_py_typed() -> None:
    assert (Path(aiocache_llm.__file__).parent / "py.typed").is_file()


# DESIGN.md sections whose names this checkout exports (or, for the layers, implements)
BUILT_SECTIONS = {
    "Three layers",
    "Values",
    "Keys",
    "Layer 1: protocols and backends",
    "Layer 2: single-flight",
    "Layer 3: gateway and decorator",
    "Streaming",
    "Semantic quality",
    "What a user expects beyond the names",
}
# names that live in submodules, checked by test_integration_modules_export_their_names;
# then sections of open issues, checked once they are built: Cluster/Sentinel and near
# cache (issues 12, 13)
PENDING_SECTIONS = {
    "Integrations (optional extras)",
    "Scale: Redis Cluster, Sentinel, near cache",
}

INTEGRATION_NAMES = {
    "openai": ["OpenAIProvider", "wrap_openai", "OpenAIEmbedder"],
    "anthropic": ["AnthropicProvider", "wrap_anthropic"],
    "litellm": ["LiteLLMProvider"],
    "langchain": ["LangChainCache"],
}


@pytest.mark.parametrize("module", sorted(INTEGRATION_NAMES))
def test_integration_modules_export_their_names(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # litellm fetches a price list from the internet on import unless told not to
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    integration = importlib.import_module(f"aiocache_llm.integrations.{module}")
    for name in INTEGRATION_NAMES[module]:
        assert name in integration.__all__, f"{module}.{name}"
        assert callable(getattr(integration, name))


def test_the_embeddings_cache_is_public_with_its_signature() -> None:
    for name in ("CachedEmbedder", "CachedEmbedderStats", "HashingEmbedder"):
        assert name in aiocache_llm.__all__
    parameters = inspect.signature(aiocache_llm.CachedEmbedder).parameters
    assert parameters["embed_fn"].default is inspect.Parameter.empty
    for name, default in (("max_size", 4096), ("url", None), ("client", None), ("model_id", None)):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default == default
    assert inspect.iscoroutinefunction(aiocache_llm.CachedEmbedder.__call__)
    assert inspect.iscoroutinefunction(aiocache_llm.CachedEmbedder.aclose)


def test_gateway_stream_keeps_its_contract_signature() -> None:
    parameters = inspect.signature(aiocache_llm.InferenceGateway.stream).parameters
    assert list(parameters)[:3] == ["self", "query", "user_id"]
    assert parameters["user_id"].default is None
    for name, default in (("no_cache", False), ("no_store", False), ("ttl_seconds", None)):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default == default


def test_design_document_names_are_exported_when_available() -> None:
    design = Path(__file__).resolve().parents[3] / "shared" / "DESIGN.md"
    if not design.is_file():
        pytest.skip("the contract document is not next to this checkout")
    sections = re.split(r"^## ", design.read_text(), flags=re.MULTILINE)
    titles = {section.partition("\n")[0] for section in sections[1:]}
    unknown = titles - BUILT_SECTIONS - PENDING_SECTIONS
    assert not unknown, f"classify the new DESIGN.md sections: {sorted(unknown)}"
    text = "\n".join(
        section for section in sections if section.partition("\n")[0] not in PENDING_SECTIONS
    )
    # CamelCase names and snake_case functions written as code in the contract
    candidates = set(re.findall(r"`([A-Z][A-Za-z]+)(?:\(|`)", text))
    candidates |= {"signature", "cached_completion"}
    public = set(aiocache_llm.__all__)
    missing = {name for name in candidates if name not in public and hasattr(aiocache_llm, name)}
    assert not missing
    undeclared = sorted(name for name in candidates if name not in public)
    assert undeclared == [], f"names in DESIGN.md not exported: {undeclared}"


def test_bad_input_has_one_root() -> None:
    error = aiocache_llm.InvalidInputTypeError("wrong type")
    assert isinstance(error, aiocache_llm.InvalidInputError)
    assert isinstance(error, TypeError)
    assert isinstance(error, ValueError)
    assert issubclass(aiocache_llm.ValueTooLargeError, aiocache_llm.InvalidInputError)
