"""Optional monitoring integrations.

``aiocache_llm.metrics.prometheus`` exports the gateway's counters to Prometheus; it
needs the ``aiocache_llm[prometheus]`` extra. Nothing here is imported by
``import aiocache_llm``, so the extra stays optional.
"""
