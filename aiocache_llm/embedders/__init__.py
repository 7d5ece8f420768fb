"""Embedders: ``text -> vector`` callables for the semantic caches.

``HashingEmbedder`` needs only numpy and is meant for tests and demos. Real models
live in their own modules and import their optional packages (the ``embed`` extra)
only when built.
"""

# the model-backed embedders (E5, MiniLM, WordLlama) import their packages (the
# ``embed`` extra) only when built, so importing them here costs nothing
from aiocache_llm.embedders._support import EmbedderUnavailableError
from aiocache_llm.embedders.cached import CachedEmbedder, CachedEmbedderStats
from aiocache_llm.embedders.e5 import E5Embedder
from aiocache_llm.embedders.hashing import HashingEmbedder
from aiocache_llm.embedders.minilm import MiniLMEmbedder
from aiocache_llm.embedders.wordllama import WordLlamaEmbedder

__all__ = [
    "CachedEmbedder",
    "CachedEmbedderStats",
    "E5Embedder",
    "EmbedderUnavailableError",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "WordLlamaEmbedder",
]
