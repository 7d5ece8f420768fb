"""Drop-in use of the gateway from the SDKs applications already call (optional extras).

Each integration lives in its own module and imports its SDK only when that module is
imported; without the SDK, the import raises :class:`ImportError` naming the extra to
install:

- :mod:`aiocache_llm.integrations.openai` (``pip install 'aiocache_llm[openai]'``):
  ``OpenAIProvider(client)``, ``wrap_openai(client, **gateway_options)`` and
  ``OpenAIEmbedder(client, model=...)`` (an embed function for the semantic caches).
- :mod:`aiocache_llm.integrations.anthropic` (``[anthropic]``): ``AnthropicProvider(client)``
  and ``wrap_anthropic(client, **gateway_options)``.
- :mod:`aiocache_llm.integrations.litellm` (``[litellm]``): ``LiteLLMProvider(**defaults)``.
- :mod:`aiocache_llm.integrations.langchain` (``[langchain]``): ``LangChainCache``, a
  LangChain ``BaseCache`` over any exact cache.

Importing this package itself imports no SDK.
"""

__all__: list[str] = []
