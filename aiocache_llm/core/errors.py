"""The exception hierarchy: every error the library raises derives from :class:`AiocacheLLMError`.

Bad input is also a built-in ``ValueError``/``TypeError`` (multiple inheritance), so
callers that already catch those keep working; backend failures are never built-ins,
so ``except ValueError`` does not swallow a dead Redis.
"""

from __future__ import annotations

__all__ = [
    "AiocacheLLMError",
    "BackendError",
    "BackendUnavailableError",
    "ClosedResourceError",
    "CorruptEntryError",
    "InvalidInputError",
    "InvalidInputTypeError",
    "ProviderTimeoutError",
    "RateLimitExceeded",
    "RemoteProviderError",
    "StreamInterruptedError",
    "UndeclaredTypeError",
    "ValueTooLargeError",
]


class AiocacheLLMError(Exception):
    """Root of every exception raised by aiocache_llm."""


class InvalidInputError(AiocacheLLMError, ValueError):
    """An argument has the right type but an unacceptable value (empty id, NaN, negative tokens)."""


class InvalidInputTypeError(InvalidInputError, TypeError):
    """An argument (or a value to cache) has a type the library cannot accept.

    A kind of :class:`InvalidInputError` (one root for bad input: ``except
    InvalidInputError`` catches both) and a ``TypeError``.
    """


class ValueTooLargeError(InvalidInputError):
    """A value to store is larger than the backend's configured ``max_value_bytes``."""


class BackendError(AiocacheLLMError):
    """A storage backend failed. The original driver error is chained as ``__cause__``."""


class BackendUnavailableError(BackendError):
    """The backend could not be reached in time (connection refused, timeout, loading, failover)."""


class CorruptEntryError(BackendError):
    """Data found under one of the library's keys is not something the library wrote.

    Caches treat such an entry as a miss and count it; it is raised only where
    dropping data silently would be worse (chat history).
    """


class UndeclaredTypeError(CorruptEntryError):
    """A stored value is a model type this process has not declared (``value_types=``).

    The entry is sound; this reader cannot decode it, since a class named by stored
    data is never imported. Caches count it in ``CacheStats.undeclared_entries`` (a
    miss, not corruption). ``type_name`` is the stored type's qualified name.
    """

    def __init__(self, message: str, *, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class ClosedResourceError(AiocacheLLMError):
    """The cache, limiter or memory was used after ``aclose()``."""


class ProviderTimeoutError(AiocacheLLMError, TimeoutError):
    """The provider did not answer within the gateway's ``provider_timeout``."""


class RateLimitExceeded(AiocacheLLMError):
    """A rate limiter refused tokens.

    ``retry_after`` is the number of seconds after which the same request could be
    granted if nothing else consumes budget meanwhile (or, from the gateway's check
    that does not wait, an upper bound: one window), or ``None`` when it can never be
    granted (the request alone exceeds the budget) or nobody can tell. ``user_id``
    names whose budget refused, when known.
    """

    def __init__(
        self, message: str, *, retry_after: float | None, user_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.user_id = user_id


class StreamInterruptedError(AiocacheLLMError):
    """A shared stream cannot continue for this consumer after it already received chunks.

    Raised when the process producing a stream for the fleet died mid-stream, or when
    this consumer fell so far behind a stream that outgrew its size bound that the
    chunks it had not read were dropped. Never raised instead of chunks: what the
    consumer already received is all true, and nothing is duplicated or spliced. A
    consumer that had received nothing starts over (and may call the provider) instead.
    """


class RemoteProviderError(AiocacheLLMError):
    """The provider failed in the process that streamed this answer for the fleet.

    Another process's exception object cannot travel (it is never unpickled): this
    carries its type name (``error_type``) and message.
    """

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type
