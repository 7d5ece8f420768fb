"""``MemorySemanticCache``: paraphrase -> stored answer, a numpy index per scope, one process."""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, NamedTuple

from pydantic import BaseModel

from aiocache_llm.backends.ann import AnnSetting, resolve_ann
from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.backends.promotion import SemanticHit, promotion_ttl
from aiocache_llm.backends.vectors import EmbeddingAdapter, EmbedFn, UnitVector, VectorIndex
from aiocache_llm.backends.verification import (
    DEFAULT_MAX_VERIFY_CANDIDATES,
    SemanticProbe,
    Verifier,
    VerifyFn,
    judge,
)
from aiocache_llm.core.clock import Clock
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES, ValueCodec
from aiocache_llm.core.errors import ClosedResourceError
from aiocache_llm.core.lifecycle import AsyncResource
from aiocache_llm.core.query import Normalizer, NoSemanticTextError, Query, QueryKeys
from aiocache_llm.core.stats import CacheStats
from aiocache_llm.core.validation import (
    check_optional_positive_number,
    check_similarity,
    check_size_limit,
)

__all__ = ["MemorySemanticCache"]


class _Entry(NamedTuple):
    scope: str
    data: bytes
    expires_at: float  # on self._clock; inf = never
    text: str  # the text that was embedded, for the verifier


class MemorySemanticCache(AsyncResource):
    """Paraphrased request -> stored answer, by cosine similarity, in this process.

    A query is split into a *scope* (model, system prompt, earlier turns, parameters:
    everything but the last user message, which must match exactly) and the *text*
    of its last user message, which is embedded with ``embed_fn``. ``get`` answers
    with the entry of the same scope whose vector is most similar to the text's, if
    that cosine similarity is ``>= similarity_threshold`` (in [-1, 1]; overridable per
    call). Each scope has its own :class:`VectorIndex`, so entries of other scopes
    are never even compared. An entry is identified by its whole query: putting the
    same query again replaces its vector and value, and ``invalidate`` removes it.
    A query that was stored exactly is a hit (similarity 1) without calling
    ``embed_fn`` at all, and so is a miss in a scope that holds no entries (most
    scopes of a chat application, whose earlier turns differ). A query whose last
    user message has no text, only other parts (a tool result, an image), is not a
    question for this cache: ``get`` and ``lookup`` return ``None`` without counting
    a miss, ``put`` stores nothing, ``invalidate`` returns False.

    ``embed_fn`` is a sync or async callable ``str -> sequence of floats``. An async
    one is awaited; a sync one runs in a worker thread (overlapping calls in several
    threads at once) unless ``embed_in_thread=False``. Its vectors are validated
    (:class:`InvalidInputError` for NaN, infinity, all zeros, a dimension other than
    ``dimension=`` or than the first vector stored; :class:`InvalidInputTypeError`
    for non-numbers) before anything changes. Exceptions raised by ``embed_fn``
    itself propagate unchanged.

    Entries are kept in least-recently-used order across all scopes: a hit refreshes
    an entry, and a put beyond ``max_size`` (0 = unbounded) evicts the least recently
    used. ``ttl_seconds`` (None = never) is the default lifetime, overridden per put;
    an expired entry is never returned and never hides a live one. Values are held
    encoded (data only), so every hit returns a fresh copy of a mutable value.

    Promotions (:meth:`promote`, see :mod:`aiocache_llm.backends.promotion`) go into
    a :class:`MemoryExactCache` only, and are deleted whenever their entry is removed.

    Cost: a lookup is one embedding plus one float32 ``matrix @ q`` over the scope's
    rows (O(n*d), exact); from ``n*d >= 2**22`` floats on, that product runs in a
    worker thread and the row it picks is re-checked on the loop. A put is the
    embedding plus amortized O(d). Everything between awaits runs without yielding,
    so the cache is never seen half-updated; a call cancelled while embedding
    changes nothing.

    ``ann=`` (``None``, ``"auto"`` or an :class:`~aiocache_llm.backends.ann.AnnConfig`;
    needs the ``aiocache_llm[ann]`` extra, else :class:`ImportError`) searches scopes
    of at least ``AnnConfig.min_rows`` (20k by default) rows approximately: an HNSW
    graph proposes candidates whose exact cosine is then computed from the stored
    vectors, so thresholds, expiry and scopes hold exactly for whatever is returned,
    but the best entry may be missed (recall below 1). The graph follows writes in
    background catch-ups (a large scope's first graph takes seconds to build; see
    :meth:`build_index`); meanwhile lookups search exactly.

    ``verify=`` (a sync or async ``(query_text, candidate_text, similarity) -> bool``,
    see :mod:`aiocache_llm.backends.verification`) checks candidates before they are
    served: the live entries of the scope at or above the threshold are offered best
    first, at most ``max_verify_candidates`` (1..64, default 4), and the first one
    accepted is the hit; none accepted is a miss. Refusals (and verifiers that raise,
    which refuse) are counted in ``stats()``. An exact repeat of a stored query is
    served without asking: its text is the candidate's own.
    """

    def __init__(
        self,
        embed_fn: EmbedFn,
        similarity_threshold: float = 0.95,
        max_size: int = 512,
        ttl_seconds: float | None = None,
        *,
        normalize: Normalizer | None = None,
        value_types: Iterable[type[BaseModel]] = (),
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        clock: Clock | None = None,
        dimension: int | None = None,
        embed_in_thread: bool = True,
        ann: AnnSetting = None,
        verify: VerifyFn | None = None,
        max_verify_candidates: int = DEFAULT_MAX_VERIFY_CANDIDATES,
    ) -> None:
        self._verifier = None if verify is None else Verifier(verify, max_verify_candidates)
        self._embedding = EmbeddingAdapter(embed_fn, in_thread=embed_in_thread, dimension=dimension)
        self._ann = resolve_ann(ann)
        self._threshold = check_similarity("similarity_threshold", similarity_threshold)
        self._max_size = check_size_limit("max_size", max_size)
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        self._keys = QueryKeys(normalize)
        self._codec = ValueCodec(value_types, max_value_bytes=max_value_bytes)
        self._clock: Clock = clock or time.monotonic
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # digest -> entry, oldest use first
        self._scopes: dict[str, VectorIndex] = {}  # scope digest -> its vectors, never empty
        # (expiry, digest) of every entry written with a TTL; may hold stale pairs
        self._expiries: list[tuple[float, str]] = []
        # entry digest -> the exact-cache entries promoted from it
        self._promotions: dict[str, set[tuple[MemoryExactCache, str]]] = {}
        # promotions of entries removed since, deleted at the end of the public call
        self._dropped: list[tuple[MemoryExactCache, str]] = []
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def __repr__(self) -> str:
        bound = self._max_size or "unbounded"
        return (
            f"MemorySemanticCache(size={len(self._entries)}/{bound}, scopes={len(self._scopes)}, "
            f"similarity_threshold={self._threshold}, ttl_seconds={self._ttl}, "
            f"embed_fn={self._embedding!r}, ann={self._ann is not None}, "
            f"verify={self._verifier!r}, "
            f"hits={self._hits}, misses={self._misses})"
        )

    @property
    def codec(self) -> ValueCodec:
        """The codec this cache stores values with (it knows the declared ``value_types``)."""
        return self._codec

    async def get(self, query: Query, *, similarity_threshold: float | None = None) -> Any | None:
        """Return the value of the most similar live entry of the query's scope, or ``None``.

        ``similarity_threshold`` overrides the cache's threshold for this call. An
        exact repeat of a stored query, and any query of a scope with no entries, is
        answered without calling ``embed_fn``; a query whose last user message has
        no text is ``None`` at once, and not a miss. One embedding and one search of
        the scope otherwise. Raises
        :class:`InvalidInputError`/:class:`InvalidInputTypeError` for a bad query,
        threshold or embedding, before anything changes.
        """
        hit = await self.lookup(query, similarity_threshold=similarity_threshold)
        return None if hit is None else hit.value

    async def lookup(
        self, query: Query, *, similarity_threshold: float | None = None
    ) -> SemanticHit | None:
        """:meth:`get`, also telling which entry answered and its remaining lifetime.

        The lifetime is the entry's expiry less the clock's time at the hit. Same
        cost and errors as :meth:`get`.
        """
        self._check_open()
        threshold = self._threshold
        if similarity_threshold is not None:
            threshold = check_similarity("similarity_threshold", similarity_threshold)
        try:
            scope, text, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return None  # no text to compare: not a question for this cache, nor a miss
        exact = self._entries.get(digest)
        if exact is not None and exact.expires_at > self._clock():
            return self._hit(digest, exact)
        if scope in self._scopes:  # an empty scope is a miss without an embedding
            vector = await self._embedding.embed(text)
            self._embedding.check(vector)
            # looked up again: the scope may have been emptied or refilled meanwhile
            index = self._scopes.get(scope)
            if index is not None:
                hit = await self._search(index, vector, text, threshold)
                if hit is not None:
                    return hit
        self._misses += 1
        return None

    async def _search(
        self, index: VectorIndex, vector: UnitVector, text: str, threshold: float
    ) -> SemanticHit | None:
        """The hit among the index's candidates (the verifier's first accepted), or None."""
        now = self._clock()
        verifier = self._verifier
        # without a verifier every row of the index has its entry, so the best one will do
        k = 1 if verifier is None else verifier.max_candidates
        for candidate in await index.best_async(vector, k, now, threshold):
            entry = self._entries.get(candidate.entry_id)
            # the index may have been dropped by clear() while a thread searched it
            if entry is None or entry.expires_at <= now:
                continue
            if verifier is None:
                return self._hit(candidate.entry_id, entry)
            # an async verifier yields: serve the entry only if it is still the one judged
            if (
                await verifier.accepts(text, entry.text, candidate.similarity)
                and self._entries.get(candidate.entry_id) is entry
                and entry.expires_at > self._clock()
            ):
                return self._hit(candidate.entry_id, entry)
        return None

    async def probe(
        self, query: Query, *, similarity_threshold: float | None = None
    ) -> SemanticProbe | None:
        """What :meth:`lookup` would serve for ``query``, measured without serving it.

        For shadow mode (see :class:`~aiocache_llm.backends.verification.SemanticProbe`):
        nothing is counted, no entry is refreshed, and the verifier (if any) is asked
        about up to ``max_verify_candidates`` candidates whatever their similarity.
        ``None`` for a query whose last user message has no text. Same cost and
        errors as :meth:`lookup`.
        """
        self._check_open()
        threshold = self._threshold
        if similarity_threshold is not None:
            threshold = check_similarity("similarity_threshold", similarity_threshold)
        try:
            scope, text, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return None
        exact = self._entries.get(digest)
        if exact is not None and exact.expires_at > self._clock():
            return SemanticProbe(text, text, 1.0, threshold, None, True)
        found: list[tuple[str | None, float]] = []
        if scope in self._scopes:
            vector = await self._embedding.embed(text)
            self._embedding.check(vector)
            index = self._scopes.get(scope)
            if index is not None:
                now = self._clock()
                k = 1 if self._verifier is None else self._verifier.max_candidates
                for candidate in await index.best_async(vector, k, now, -1.0):
                    entry = self._entries.get(candidate.entry_id)
                    if entry is not None and entry.expires_at > now:
                        found.append((entry.text, candidate.similarity))
        return await judge(text, found, threshold, self._verifier)

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` under the query's scope and the embedding of its last user message.

        Replaces the entry of the same query; stores nothing for a query whose last
        user message has no text. ``ttl_seconds`` overrides the cache's default for
        this entry. The query, value and embedding are all validated before anything
        changes, so bad input raises and leaves the cache as it was.
        """
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds) or self._ttl
        try:
            scope, text, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return  # no text to compare: a later get could never find it
        data = self._codec.encode(value)
        vector = await self._embedding.embed(text)
        self._check_open()
        self._embedding.check(vector)
        self._embedding.adopt(vector)
        now = self._clock()
        expires_at = math.inf
        if ttl is not None:
            expires_at = now + ttl
            heapq.heappush(self._expiries, (expires_at, digest))
        index = self._scopes.get(scope)
        if index is None:
            index = self._scopes[scope] = VectorIndex(vector.shape[0], ann=self._ann)
        index.upsert(digest, vector, expires_at)
        # the promotions of the value being replaced copy that value: they go
        self._drop_promotions_of(digest)
        self._entries[digest] = _Entry(scope, data, expires_at, text)
        self._entries.move_to_end(digest)
        self._purge_expired(now)
        if self._max_size:
            while len(self._entries) > self._max_size:
                self._remove(next(iter(self._entries)))
                self._evictions += 1
        await self._delete_dropped()

    async def promote(
        self,
        hit: SemanticHit,
        exact_cache: object,
        digest: str,
        *,
        ttl_seconds: float | None = None,
    ) -> bool:
        """Store ``hit.value`` in ``exact_cache`` under ``digest``, tied to ``hit``'s entry.

        The promotion lives ``ttl_seconds`` (None: the exact cache's default), never
        longer than the entry has left, and is deleted whenever the entry is removed
        (invalidated, replaced, purged, evicted or cleared). ``exact_cache`` must be
        a :class:`MemoryExactCache`; for any other cache, or an entry that is gone,
        nothing is stored and False is returned. Never yields to the event loop, so
        the entry cannot go between the check and the put. Raises what the exact
        cache's put raises (:class:`ValueTooLargeError`, ...).
        """
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        entry = self._entries.get(hit.entry)
        now = self._clock()
        if not isinstance(exact_cache, MemoryExactCache) or entry is None:
            return False
        remaining = None if math.isinf(entry.expires_at) else entry.expires_at - now
        ttl = promotion_ttl(ttl, exact_cache.ttl_seconds, remaining)
        if ttl is not None and ttl <= 0:
            return False
        await exact_cache.put_by_signature(digest, hit.value, ttl_seconds=ttl)
        self._promotions.setdefault(hit.entry, set()).add((exact_cache, digest))
        return True

    async def invalidate(self, query: Query) -> bool:
        """Remove the entry stored for exactly this query; return whether a live one was there.

        O(d): the scope's last row fills the hole. The entry's promotions are deleted
        from their exact cache in the same step.
        """
        self._check_open()
        try:
            _, _, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return False  # never stored
        entry = self._remove(digest)
        await self._delete_dropped()
        return entry is not None and entry.expires_at > self._clock()

    async def clear(self) -> None:
        """Remove every entry of every scope (and their promotions); counters and the
        learned dimension are kept."""
        self._check_open()
        self._drop_all()
        await self._delete_dropped()

    async def stats(self) -> CacheStats:
        """Return hits, misses, evictions, verifier counts and the number of live entries."""
        self._check_open()
        self._purge_expired(self._clock())
        await self._delete_dropped()
        verifier = self._verifier
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            size=len(self._entries),
            evictions=self._evictions,
            verifier_refusals=0 if verifier is None else verifier.refusals,
            verifier_errors=0 if verifier is None else verifier.errors,
        )

    async def build_index(self) -> None:
        """Bring the ANN graph of every large scope up to date and wait for it.

        A no-op without ``ann=``. Lookups keep the graphs up to date by themselves,
        in the background, and search exactly until a scope's graph is ready; call
        this after loading many entries (a warm-up) so that the next lookups are
        fast at once. The work runs in worker threads (``AnnConfig.threads``), never
        on the event loop.
        """
        self._check_open()
        for index in list(self._scopes.values()):
            await index.catch_up()

    def _hit(self, digest: str, entry: _Entry) -> SemanticHit:
        self._entries.move_to_end(digest)
        self._hits += 1
        left = None if math.isinf(entry.expires_at) else entry.expires_at - self._clock()
        return SemanticHit(self._codec.decode(entry.data), left, digest)

    def _remove(self, digest: str) -> _Entry | None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            index = self._scopes[entry.scope]
            index.remove(digest)
            if not len(index):
                del self._scopes[entry.scope]
        self._drop_promotions_of(digest)
        return entry

    def _drop_promotions_of(self, digest: str) -> None:
        self._dropped.extend(self._promotions.pop(digest, ()))

    async def _delete_dropped(self) -> None:
        """Delete the promotions of the entries removed so far from their exact caches.

        Runs without yielding (a memory cache's invalidate never does), so the
        promotions go in the same step as their entries.
        """
        dropped, self._dropped = self._dropped, []
        for exact_cache, digest in dropped:
            with contextlib.suppress(ClosedResourceError):  # a closed cache serves nothing
                await exact_cache.invalidate_by_signature(digest)

    def _purge_expired(self, now: float) -> None:
        expiries = self._expiries
        entries = self._entries
        while expiries and expiries[0][0] <= now:
            expires_at, digest = heapq.heappop(expiries)
            entry = entries.get(digest)
            # the entry may have been rewritten since: only its current expiry counts
            if entry is not None and entry.expires_at == expires_at:
                self._remove(digest)
        # rewrites leave stale pairs behind; rebuild before they outnumber entries
        if len(expiries) > 2 * len(entries) + 64:
            self._expiries = [
                (e.expires_at, d) for d, e in entries.items() if math.isfinite(e.expires_at)
            ]
            heapq.heapify(self._expiries)

    def _drop_all(self) -> None:
        for index in self._scopes.values():
            index.clear()  # a lookup still searching it in a thread then finds nothing
        self._scopes.clear()
        self._entries.clear()
        self._expiries.clear()
        for promotions in self._promotions.values():
            self._dropped.extend(promotions)
        self._promotions.clear()

    async def _release(self) -> None:
        self._drop_all()
        await self._delete_dropped()
