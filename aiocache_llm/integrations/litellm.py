"""LiteLLM through the gateway (the ``aiocache_llm[litellm]`` extra).

::

    from aiocache_llm import InferenceGateway, RedisExactCache
    from aiocache_llm.integrations.litellm import LiteLLMProvider

    provider = LiteLLMProvider(model="openai/gpt-4o-mini", api_key=...)
    gateway = InferenceGateway(
        provider,
        exact_cache=RedisExactCache(url=..., value_types=provider.value_types),
    )
    response = await gateway.resolve({"messages": [{"role": "user", "content": "hi"}]})
    response.choices[0].message.content  # a litellm ModelResponse, cached

Why answers need a type of their own: a ``ModelResponse`` fresh from LiteLLM never
equals its own JSON round trip, for two reasons. It carries per-call metadata that JSON
never holds but pydantic's ``==`` compares: the private ``_hidden_params`` (response
headers, timings, the call id, the API base) and ``_response_headers``. And LiteLLM's
response conversion leaves it in a shape its own constructor does not build (it keeps
``choices[i].logprobs = None`` where the constructor deletes the field, as it deletes
every optional field the OpenAI format leaves out), while validation from JSON goes
through that constructor. So ``model_validate_json(r.model_dump_json()) != r`` for every
answer, and the codec rightly refuses to store it.

:class:`LiteLLMResponse` (a ``ModelResponse``) and :class:`LiteLLMResponseChunk` (a
``ModelResponseStream``) are the answer's data rebuilt through LiteLLM's constructor,
without the metadata: a form that comes back from JSON exactly. :class:`LiteLLMProvider`
hands out its answers, and every chunk of its streams, already in that form, so the
first caller and every later cache hit get equal objects. The per-call metadata
(``_hidden_params``, ``_response_headers``, ``_response_ms``) belongs to one HTTP call,
not to the answer: it is not stored, and the provider's answers do not carry it (read
cost and headers through LiteLLM's callbacks, which see every real call).

LiteLLM downloads its model cost map when imported unless ``LITELLM_LOCAL_MODEL_COST_MAP``
is ``True`` in the environment: set it before importing this module to stay offline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from pydantic import BaseModel

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.query import Query, as_request

try:
    import litellm
    from litellm.types.utils import ModelResponse, ModelResponseStream
except ImportError as exc:
    raise ImportError(
        "aiocache_llm.integrations.litellm needs the litellm package: "
        "pip install 'aiocache_llm[litellm]'"
    ) from exc

__all__ = [
    "LiteLLMProvider",
    "LiteLLMResponse",
    "LiteLLMResponseChunk",
    "LiteLLMStream",
    "litellm_value_types",
]

# Constructor arguments that set per-call metadata or request flags, never answer data:
# stored data cannot set them (a foreign entry must not plant hidden params).
_NOT_DATA = frozenset(
    {"hidden_params", "_response_headers", "response_ms", "stream", "stream_options"}
)


def _data(payload: str | bytes | bytearray | Mapping[str, Any]) -> dict[str, Any]:
    """The answer data in ``payload`` (JSON text or a mapping), without metadata arguments.

    Raises :class:`ValueError`/:class:`TypeError` for anything but a JSON object, which
    the codec reports as a corrupt entry.
    """
    data = orjson.loads(payload) if isinstance(payload, (str, bytes, bytearray)) else payload
    if not isinstance(data, Mapping):
        raise TypeError(f"a LiteLLM answer is a JSON object, got {type(data).__name__}")
    return {str(name): value for name, value in data.items() if name not in _NOT_DATA}


def _construct(cls: type[Any], data: dict[str, Any]) -> Any:
    """``cls(**data)``; LiteLLM's constructors raise more than ``ValueError`` on bad data."""
    try:
        return cls(**data)
    except (KeyError, AttributeError, IndexError) as exc:
        raise ValueError(f"{cls.__name__} cannot be built from this data: {exc!r}") from exc


class LiteLLMResponse(ModelResponse):
    """A LiteLLM ``ModelResponse`` that survives a JSON round trip unchanged.

    It is a ``ModelResponse`` in every way a caller reads one (``id``, ``choices`` with
    their ``message``, ``usage`` as a ``Usage``, ``model``, ``created``,
    ``system_fingerprint``, extra fields such as ``service_tier``); only the per-call
    metadata is left out (see the module docstring). ``model_validate_json`` and
    ``model_validate`` build it through LiteLLM's constructor and never let data set
    that metadata, so that ``LiteLLMResponse.model_validate_json(r.model_dump_json()) == r``.
    """

    @classmethod
    def from_response(cls, response: ModelResponse) -> LiteLLMResponse:
        """The cacheable copy of ``response``: its data, rebuilt as LiteLLM builds answers."""
        return cls.model_validate_json(response.model_dump_json())

    @classmethod
    def model_validate_json(
        cls, json_data: str | bytes | bytearray, **options: Any
    ) -> LiteLLMResponse:
        """Build a response from its JSON through LiteLLM's constructor.

        ``options`` (pydantic's ``strict``, ``context``, ...) are accepted and ignored.
        Raises :class:`ValueError`/:class:`TypeError` for JSON that is not a response.
        """
        built: LiteLLMResponse = _construct(cls, _data(json_data))
        return built

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> LiteLLMResponse:
        """Build a response from a mapping (or a ``ModelResponse``'s data), as above."""
        if isinstance(obj, BaseModel):
            return cls.model_validate_json(obj.model_dump_json())
        built: LiteLLMResponse = _construct(cls, _data(obj))
        return built


class LiteLLMResponseChunk(ModelResponseStream):
    """A LiteLLM ``ModelResponseStream`` (a stream chunk) that survives a JSON round trip.

    The chunk of a :class:`LiteLLMProvider` stream: ``choices[i].delta`` (``content``,
    ``role``, ``tool_calls``, ...), ``finish_reason`` and, on the last chunk of a stream
    asked with ``stream_options={"include_usage": True}``, ``usage``, as LiteLLM gives
    them. Rebuilt through LiteLLM's constructor like :class:`LiteLLMResponse`.
    """

    @classmethod
    def from_chunk(cls, chunk: ModelResponseStream) -> LiteLLMResponseChunk:
        """The cacheable copy of ``chunk``, rebuilt as LiteLLM builds chunks."""
        return cls.model_validate_json(chunk.model_dump_json())

    @classmethod
    def model_validate_json(
        cls, json_data: str | bytes | bytearray, **options: Any
    ) -> LiteLLMResponseChunk:
        """Build a chunk from its JSON through LiteLLM's constructor (``options`` ignored)."""
        built: LiteLLMResponseChunk = _construct(cls, _data(json_data))
        return built

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> LiteLLMResponseChunk:
        """Build a chunk from a mapping (or a chunk's data), as above."""
        if isinstance(obj, BaseModel):
            return cls.model_validate_json(obj.model_dump_json())
        built: LiteLLMResponseChunk = _construct(cls, _data(obj))
        return built


def litellm_value_types() -> tuple[type[BaseModel], ...]:
    """The types a cache must know to store LiteLLM answers: pass them as ``value_types=``.

    :class:`LiteLLMResponse` and :class:`LiteLLMResponseChunk`. A cache in the process that
    stored an answer learns its type by storing it; a cache that reads what another
    process stored (a :class:`RedisExactCache` or :class:`RedisSemanticCache` on a shared
    prefix) needs them declared.
    """
    return (LiteLLMResponse, LiteLLMResponseChunk)


class LiteLLMStream:
    """The chunks of one LiteLLM stream, each as a :class:`LiteLLMResponseChunk`.

    An async iterator over LiteLLM's ``CustomStreamWrapper``; ``aclose()`` closes it
    (and with it the HTTP response), also when iteration never started.
    """

    __slots__ = ("_source",)

    def __init__(self, source: Any) -> None:
        self._source = source

    @property
    def source(self) -> Any:
        """LiteLLM's own stream object (a ``CustomStreamWrapper``)."""
        return self._source

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        chunk = await self._source.__anext__()
        if isinstance(chunk, ModelResponseStream):
            return LiteLLMResponseChunk.from_chunk(chunk)
        return chunk  # not a chunk LiteLLM documents: the codec decides whether it stores

    async def aclose(self) -> None:
        """Close LiteLLM's stream; idempotent."""
        closer = getattr(self._source, "aclose", None)
        if callable(closer):
            await closer()


def _request(defaults: Mapping[str, Any], query: Query) -> dict[str, Any]:
    """The keyword arguments of one ``litellm.acompletion`` call: defaults, then the query."""
    if isinstance(query, str):
        raise InvalidInputTypeError(
            "a LiteLLM query must be a mapping of litellm.acompletion arguments "
            "(messages, model, ...), not a str"
        )
    fields = dict(query) if isinstance(query, Mapping) else as_request(query)
    return {**defaults, **fields}


class LiteLLMProvider:
    """A gateway provider over ``litellm.acompletion``.

    ``LiteLLMProvider(**defaults)``: ``await provider.complete(query)`` is
    ``await litellm.acompletion(**{**defaults, **query})`` (the query wins over the
    defaults), answered as a :class:`LiteLLMResponse`; ``await provider.stream(query)``
    is the same call with ``stream=True``, a :class:`LiteLLMStream` of
    :class:`LiteLLMResponseChunk`, which :class:`InferenceGateway` uses for streamed
    requests. LiteLLM's errors propagate unchanged (never cached).

    The cache key is the query the gateway is given, without the defaults: put the
    secrets (``api_key``) in the defaults, and keep providers whose defaults change the
    answer (``model``, ``api_base``, ``temperature``) on caches of their own (another
    ``key_prefix``) or put those arguments in the queries. Declare :attr:`value_types`
    on caches that read what another process stored.

    Raises :class:`InvalidInputError` for a ``stream`` default (each method decides it).
    """

    __slots__ = ("_defaults",)

    def __init__(self, **defaults: Any) -> None:
        if "stream" in defaults:
            raise InvalidInputError(
                "stream is not a default: complete() never streams, stream() always does"
            )
        self._defaults = defaults

    def __repr__(self) -> str:
        # argument names only: values may be secrets (api_key)
        return f"LiteLLMProvider({', '.join(sorted(self._defaults))})"

    @property
    def defaults(self) -> dict[str, Any]:
        """A copy of the arguments every call starts from."""
        return dict(self._defaults)

    @property
    def value_types(self) -> tuple[type[BaseModel], ...]:
        """The types its answers are made of (see :func:`litellm_value_types`)."""
        return litellm_value_types()

    async def complete(self, query: Query) -> Any:
        """Return ``await litellm.acompletion(**{**defaults, **query})`` as a
        :class:`LiteLLMResponse` (any other answer type unchanged).

        Raises :class:`InvalidInputError` for a query asking for a stream (use
        :meth:`stream`), :class:`InvalidInputTypeError` for a ``str`` query, and
        whatever LiteLLM raises. Cancelling it cancels the call.
        """
        request = _request(self._defaults, query)
        if request.get("stream") is True:
            raise InvalidInputError("complete() cannot stream: use stream(query)")
        request.pop("stream", None)
        response = await litellm.acompletion(**request)
        if isinstance(response, ModelResponse):
            return LiteLLMResponse.from_response(response)
        return response

    async def stream(self, query: Query) -> LiteLLMStream:
        """Return LiteLLM's stream for ``query`` (``stream=True``) as a :class:`LiteLLMStream`.

        The HTTP response is open once this returns: iterate the stream to its end or
        ``aclose()`` it (the gateway does both). Raises like :meth:`complete`; errors met
        mid-stream come out of the iteration.
        """
        request = {**_request(self._defaults, query), "stream": True}
        source = await litellm.acompletion(**request)
        return LiteLLMStream(source)
