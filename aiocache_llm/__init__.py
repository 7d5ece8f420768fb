"""aiocache_llm: cache, coalesce, rate-limit and remember LLM calls from an asyncio app.

Layer 1 (storage protocols and their memory/Redis backends), layer 2 (single-flight
coalescing) and layer 3 (the gateway and the decorator) are re-exported here;
everything importable from ``aiocache_llm`` directly is public and listed in
``__all__``. Submodules are implementation detail.
"""

from aiocache_llm.backends.ann import AnnConfig
from aiocache_llm.backends.memory.chat_memory import MemoryChatMemory
from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.backends.memory.rate_limiter import MemoryRateLimiter
from aiocache_llm.backends.memory.semantic_cache import MemorySemanticCache
from aiocache_llm.backends.redis.chat_memory import RedisChatMemory
from aiocache_llm.backends.redis.exact_cache import RedisExactCache
from aiocache_llm.backends.redis.rate_limiter import RedisRateLimiter
from aiocache_llm.backends.redis.semantic_cache import RedisSemanticCache
from aiocache_llm.coalescing.single_flight import SingleFlight, SingleFlightStats
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES
from aiocache_llm.core.config import DEFAULT_ROLES, ChatMemoryConfig, RateLimitConfig
from aiocache_llm.core.errors import (
    AiocacheLLMError,
    BackendError,
    BackendUnavailableError,
    ClosedResourceError,
    CorruptEntryError,
    InvalidInputError,
    InvalidInputTypeError,
    ProviderTimeoutError,
    RateLimitExceeded,
    RemoteProviderError,
    StreamInterruptedError,
    UndeclaredTypeError,
    ValueTooLargeError,
)
from aiocache_llm.core.guard import BreakerState
from aiocache_llm.core.query import (
    IGNORED_FIELDS,
    Normalizer,
    Query,
    default_normalize,
    signature,
)
from aiocache_llm.core.recorded import RecordedStream
from aiocache_llm.core.stats import CacheStats, ChatMemoryStats, RateLimiterStats
from aiocache_llm.core.values import LLMResponse, Usage
from aiocache_llm.embedders import CachedEmbedder, CachedEmbedderStats, HashingEmbedder
from aiocache_llm.gateway.decorator import CachedFunction, CachedStreamFunction, cached_completion
from aiocache_llm.gateway.gateway import InferenceGateway
from aiocache_llm.gateway.stats import GatewayStats
from aiocache_llm.gateway.streaming import ChunkStream
from aiocache_llm.gateway.tokens import estimate_tokens
from aiocache_llm.gateway.warm import WarmFailure, WarmReport
from aiocache_llm.protocols import (
    AsyncBudgetedRateLimiter,
    AsyncChatMemory,
    AsyncExactCache,
    AsyncFailurePolicyRateLimiter,
    AsyncFleetExactCache,
    AsyncMessageChatMemory,
    AsyncRateLimiter,
    AsyncReservingRateLimiter,
    AsyncSemanticCache,
    AsyncSignatureKeyedCache,
    AsyncUsageRecordingRateLimiter,
    Reservation,
    StreamingProvider,
    SupportsInlineCompletion,
    SupportsValueCodec,
)
from aiocache_llm.semantic import (
    Calibration,
    CalibrationError,
    LabelledPair,
    SemanticGuard,
    ShadowRecord,
    calibrate_threshold,
)

__version__ = "0.1.0"

__all__ = [
    # values and keys
    "LLMResponse",
    "Usage",
    "RecordedStream",
    "CacheStats",
    "RateLimiterStats",
    "ChatMemoryStats",
    "Query",
    "Normalizer",
    "signature",
    "default_normalize",
    "IGNORED_FIELDS",
    "DEFAULT_MAX_VALUE_BYTES",
    # configuration
    "RateLimitConfig",
    "ChatMemoryConfig",
    "DEFAULT_ROLES",
    # layer 1: protocols and backends
    "AsyncExactCache",
    "AsyncSemanticCache",
    "AsyncRateLimiter",
    "AsyncChatMemory",
    "AsyncMessageChatMemory",
    "AsyncReservingRateLimiter",
    "AsyncUsageRecordingRateLimiter",
    "Reservation",
    # layer 1: capabilities the gateway checks (a wrapper that forwards them keeps them)
    "AsyncSignatureKeyedCache",
    "SupportsInlineCompletion",
    "SupportsValueCodec",
    "AsyncFleetExactCache",
    "AsyncBudgetedRateLimiter",
    "AsyncFailurePolicyRateLimiter",
    "StreamingProvider",
    "MemoryExactCache",
    "RedisExactCache",
    "MemorySemanticCache",
    "RedisSemanticCache",
    "MemoryRateLimiter",
    "RedisRateLimiter",
    "MemoryChatMemory",
    "RedisChatMemory",
    "HashingEmbedder",
    "CachedEmbedder",
    "CachedEmbedderStats",
    "AnnConfig",
    # semantic quality
    "SemanticGuard",
    "calibrate_threshold",
    "Calibration",
    "CalibrationError",
    "LabelledPair",
    "ShadowRecord",
    # layer 2: coalescing
    "SingleFlight",
    "SingleFlightStats",
    # layer 3: gateway and decorator
    "InferenceGateway",
    "GatewayStats",
    "ChunkStream",
    "WarmReport",
    "WarmFailure",
    "BreakerState",
    "estimate_tokens",
    "cached_completion",
    "CachedFunction",
    "CachedStreamFunction",
    # errors
    "AiocacheLLMError",
    "InvalidInputError",
    "InvalidInputTypeError",
    "ValueTooLargeError",
    "BackendError",
    "BackendUnavailableError",
    "CorruptEntryError",
    "UndeclaredTypeError",
    "ClosedResourceError",
    "ProviderTimeoutError",
    "RateLimitExceeded",
    "StreamInterruptedError",
    "RemoteProviderError",
]
