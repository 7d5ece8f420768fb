"""Embedders: ``text -> vector`` callables for the semantic caches.

``HashingEmbedder`` needs only numpy and is meant for tests and demos. Real models
live in their own modules and import their optional packages (the ``embed`` extra)
only when built.
"""

from aiocache_llm.embedders.hashing import HashingEmbedder

__all__ = ["HashingEmbedder"]
