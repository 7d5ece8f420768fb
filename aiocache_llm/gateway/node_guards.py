"""One circuit breaker per cluster node: a dead primary trips only the keys it serves.

The gateway guards each backend call with a :class:`BackendGuard`. With a single
guard per backend, one failing Redis Cluster primary would open the breaker for
every key, and every user would lose cache hits. :class:`NodeGuards` keeps one
guard per node instead, chosen per call by the node that serves the call's key
(:class:`~aiocache_llm.protocols.SupportsNodeRouting`); keys whose node is unknown
(a single server, an in-process cache, a cluster client that has no slot map yet)
share the global guard.

The fleet coalescer takes one guard at construction and calls it without a key;
:class:`RoutedGuard` is that guard: it dispatches each call to the guard of the
node serving the lease of the digest named by :func:`lease_route` in the caller's
context (tasks the coalescer starts inherit it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from aiocache_llm.core.guard import BackendGuard, BreakerState

__all__ = ["NodeGuards", "RoutedGuard", "lease_route", "worst_state"]

T = TypeVar("T")
F = TypeVar("F")

_LEASE_DIGEST: ContextVar[str | None] = ContextVar("aiocache_llm_lease_digest", default=None)

_SEVERITY = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def worst_state(guards: list[BackendGuard]) -> BreakerState:
    """The least healthy state among ``guards`` (OPEN > HALF_OPEN > CLOSED)."""
    return max((g.state for g in guards), key=_SEVERITY.__getitem__, default=BreakerState.CLOSED)


@contextmanager
def lease_route(digest: str) -> Iterator[None]:
    """Route the fleet calls made in this context (and tasks started in it) by ``digest``."""
    token = _LEASE_DIGEST.set(digest)
    try:
        yield
    finally:
        _LEASE_DIGEST.reset(token)


class NodeGuards:
    """The guards of one backend: one per node serving its keys, plus a global one.

    ``node_of(key)`` names the node serving ``key`` (None: unknown, the global guard
    answers); ``make(name)`` builds a guard. Guards are created on first use, one per
    node name, and kept (a cluster has a handful of primaries; after a failover the
    promoted replica gets its own). O(1) per lookup.
    """

    __slots__ = ("_guards", "_make", "_name", "_node_of", "fallback")

    def __init__(
        self,
        name: str,
        make: Callable[[str], BackendGuard],
        node_of: Callable[[str], str | None] | None,
    ) -> None:
        self._name = name
        self._make = make
        self._node_of = node_of
        self.fallback = make(name)
        """The guard of keys whose node is unknown."""
        self._guards: dict[str, BackendGuard] = {}

    def for_key(self, key: str) -> BackendGuard:
        """The guard of the node serving ``key`` now (the global guard when unknown)."""
        node = None if self._node_of is None else self._node_of(key)
        if node is None:
            return self.fallback
        guard = self._guards.get(node)
        if guard is None:
            guard = self._guards[node] = self._make(f"{self._name} on {node}")
        return guard

    def by_node(self) -> dict[str, BackendGuard]:
        """The per-node guards created so far, by node name (``host:port``)."""
        return dict(self._guards)

    def all(self) -> list[BackendGuard]:
        """Every guard: the global one first, then one per node seen."""
        return [self.fallback, *self._guards.values()]


class RoutedGuard(BackendGuard):
    """A :class:`BackendGuard` that hands each call to the guard of the current lease's node.

    The node is that of ``lease_key(digest)`` for the digest set by
    :func:`lease_route`; with none set, the global guard of ``guards`` answers. Its
    own counters stay at zero (the guards it routes to count); ``state`` is the
    worst of them.
    """

    def __init__(self, guards: NodeGuards, lease_key: Callable[[str], str]) -> None:
        super().__init__(guards.fallback.name)
        self._routes = guards
        self._lease_key = lease_key

    def current(self) -> BackendGuard:
        """The guard this context's calls go to."""
        digest = _LEASE_DIGEST.get()
        if digest is None:
            return self._routes.fallback
        return self._routes.for_key(self._lease_key(digest))

    @property
    def state(self) -> BreakerState:
        return worst_state(self._routes.all())

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        fallback: F,
        *,
        probe: Callable[[], Awaitable[object]] | None = None,
    ) -> T | F:
        return await self.current().call(fn, fallback, probe=probe)
