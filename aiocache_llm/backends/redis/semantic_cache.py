"""``RedisSemanticCache``: paraphrase -> stored answer, shared by every process on one Redis 7.

Plain Redis (no modules) holds the entries; every process keeps a numpy mirror of
the vectors of the scopes it looks up and searches it locally. The data layout and
the scripts are in :mod:`semantic_scripts <aiocache_llm.backends.redis.semantic_scripts>`,
the mirrors in :mod:`semantic_mirror <aiocache_llm.backends.redis.semantic_mirror>`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from itertools import count
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aiocache_llm.backends.promotion import SemanticHit, promotion_ttl
from aiocache_llm.backends.redis.cluster import has_hash_tag, key_slot_of, scan_keys, slot_groups
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, RedisBackend, backend_error
from aiocache_llm.backends.redis.exact_cache import RedisExactCache
from aiocache_llm.backends.redis.semantic_mirror import ScopeMirrors
from aiocache_llm.backends.redis.semantic_scripts import (
    DROP_PROMOTIONS,
    FETCH,
    FETCH_TEXTS,
    INVALIDATE,
    LINK_PROMOTION,
    LOG_FLOOR,
    PUT,
    REAP_LIMIT,
    SYNC,
    SYNC_SLACK,
)
from aiocache_llm.backends.vectors import (
    CANDIDATES,
    Candidate,
    EmbeddingAdapter,
    EmbedFn,
    UnitVector,
)
from aiocache_llm.backends.verification import (
    DEFAULT_MAX_VERIFY_CANDIDATES,
    SemanticProbe,
    Verifier,
    VerifyFn,
    judge,
)
from aiocache_llm.core.codec import DEFAULT_MAX_VALUE_BYTES, UndeclaredTypes, ValueCodec
from aiocache_llm.core.errors import CorruptEntryError, InvalidInputError, UndeclaredTypeError
from aiocache_llm.core.query import Normalizer, NoSemanticTextError, Query, QueryKeys
from aiocache_llm.core.stats import CacheStats
from aiocache_llm.core.validation import (
    check_optional_positive_number,
    check_similarity,
    check_size_limit,
)

__all__ = ["RedisSemanticCache"]

_HEX64 = "[0-9a-f]" * 64
# the connection settings that say two clients talk to the same server and database
_SERVER_SETTINGS = ("host", "port", "db", "path", "server")


class RedisSemanticCache(RedisBackend):
    """Paraphrased request -> stored answer, by cosine similarity, shared through plain Redis 7.

    Answers every call like :class:`MemorySemanticCache` (drop-in): same scopes,
    similarity scale (cosine in [-1, 1], ``>= similarity_threshold`` is a hit,
    overridable per call), exact-repeat shortcut, TTLs and errors, and queries whose
    last user message has no text (a tool result, an image) are not questions for it
    either: ``get`` and ``lookup`` return ``None`` without counting a miss (and without
    a round trip), ``put`` stores nothing, ``invalidate`` returns False. Entries are
    shared by every process using the same ``key_prefix``; a process sees what another
    wrote, invalidated or cleared on its very next ``get``.

    ``embed_fn`` is called and its vectors validated as in
    :class:`MemorySemanticCache`; the dimension is also checked across processes
    through ``{key_prefix}:dim``.

    ``max_size=None`` (or 0) is unbounded; a positive ``max_size`` keeps a global
    LRU index (a sorted set) that costs one index write per hit and put, and an
    expiry index of the entries with a TTL: as in :class:`MemorySemanticCache`,
    expired entries of any scope give up their slots before a live entry is evicted.
    Expiry follows the server clock: values carry ``PX``, vectors their expiry
    (masked in mirrors), and each put removes up to 16 expired vectors of its scope;
    a scope's keys expire with its longest-lived entry.

    Round trips: a ``get`` is one script call that syncs this process's mirror of the
    query's scope (or answers an exact repeat without embedding); with no candidate
    at or above the threshold it is a miss after that one call. Otherwise a second
    call takes the best few candidates and returns the first whose value still
    exists, so a hit is two round trips. ``put`` and ``invalidate`` are one call
    each; every call is atomic on the server. The vector search is brute force in
    numpy on the mirror (no ANN index), in a worker thread when the scope is large.

    Costs: Redis holds each vector about 1.25 times (the hash, plus a log trimmed to
    a quarter of the scope's entries but at least 64 changes); each process holds
    float32 copies of the scopes it queried (at most 1024 scopes, least recently
    used dropped). A mirror's first sync is a snapshot of its scope (O(n*d) bytes):
    inside the sync reply up to 1 MiB of vectors, else by HSCAN in batches of 1000
    followed by a replay of the changes logged meanwhile, so that no single call
    holds Redis for long. Later syncs transfer only the changes. ``stats().size``
    counts live entries: O(log n) for a bounded cache, O(keys in the database) with
    SCAN for an unbounded one.

    Promotions (:meth:`promote`, see :mod:`aiocache_llm.backends.promotion`) go into
    a :class:`RedisExactCache` on the same server only, and are deleted by the same
    script that removes their entry.

    Data under our keys that this library did not write (vectors of the wrong length
    or NaN, garbage in the log, values it cannot decode, keys of another type) is
    skipped, counted in ``corrupt_entries`` and never crashes a lookup; nothing read
    from Redis is unpickled or evaluated. Driver errors become
    :class:`BackendUnavailableError`/:class:`BackendError`. Cancelling a call may
    leave its script executed or not, never half executed.

    ``verify=`` and ``max_verify_candidates=`` work as in :class:`MemorySemanticCache`.
    Each entry's text is stored beside its vector (``{key_prefix}:s:<scope>:txt``),
    and the second call of a lookup returns the texts of all the candidates with the
    value of the first, so a verified hit on the best candidate still takes two round
    trips; a hit on a later candidate takes one more (one, not one per candidate).
    The best existing candidate is marked used in a bounded cache's LRU order even
    when the verifier refuses it. Entries written by an earlier version have no text
    and are never served through a verifier (counted as refusals).

    On a Redis Cluster (``client=RedisCluster(...)`` or a cluster ``url=``) every
    call keeps its contract, and the whole cache lives in one hash slot: its
    ``key_prefix`` must hold a hash tag (``"{llm-semantic}"``; else
    :class:`InvalidInputError`), because the dimension key (read by every lookup,
    checked by every put) and a bounded cache's global LRU index are touched by the
    same scripts as the scopes' keys. Run several caches (several tags) to spread
    the load over primaries. ``clear()`` and ``size`` SCAN every primary. A
    promotion goes only into a :class:`RedisExactCache` on the same cluster whose
    entry lands in the same slot (a ``key_prefix`` with the same hash tag):
    :meth:`can_promote_into` tells, and :meth:`promote` returns False otherwise.
    """

    supports_cluster = True

    def __init__(
        self,
        embed_fn: EmbedFn,
        *,
        url: str | None = None,
        client: Redis | RedisCluster | None = None,
        similarity_threshold: float = 0.95,
        max_size: int | None = None,
        ttl_seconds: float | None = None,
        key_prefix: str = "aiocache_llm:semantic",
        normalize: Normalizer | None = None,
        value_types: Iterable[type[BaseModel]] = (),
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        dimension: int | None = None,
        embed_in_thread: bool = True,
        verify: VerifyFn | None = None,
        max_verify_candidates: int = DEFAULT_MAX_VERIFY_CANDIDATES,
    ) -> None:
        self._verifier = None if verify is None else Verifier(verify, max_verify_candidates)
        self._embedding = EmbeddingAdapter(embed_fn, in_thread=embed_in_thread, dimension=dimension)
        self._threshold = check_similarity("similarity_threshold", similarity_threshold)
        self._max_size = check_size_limit("max_size", max_size, allow_none=True) or 0
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        self._keys = QueryKeys(normalize)
        self._codec = ValueCodec(value_types, max_value_bytes=max_value_bytes)
        super().__init__(url=url, client=client, key_prefix=key_prefix)
        if self._cluster is not None and not has_hash_tag(self._prefix):
            raise InvalidInputError(
                "RedisSemanticCache on a Redis Cluster needs a key_prefix holding a hash "
                f"tag, e.g. '{{{self._prefix}}}': its scripts touch a scope's keys, the "
                "dimension key and the LRU index together, so they must share a hash slot"
            )
        self._dim_key = f"{self._prefix}:dim"
        self._lru_key = f"{self._prefix}:lru"
        self._lru_exp_key = f"{self._lru_key}:exp"
        # `?` would match colons too, and so other objects' keys: hex classes only
        self._scope_pattern = f"{self._prefix}:s:{_HEX64}:*"
        self._value_pattern = f"{self._prefix}:s:{_HEX64}:v:{_HEX64}"
        self._promotions_pattern = f"{self._prefix}:s:{_HEX64}:pr:{_HEX64}"
        # what the scope pattern matches that is ours: the suffixes the scripts write
        self._scope_keys = re.compile(
            re.escape(self._prefix).encode()
            + rb":s:[0-9a-f]{64}:(?:vec|txt|log|exp|(?:v|pr):[0-9a-f]{64})"
        )
        self._sync = self._redis.register_script(SYNC)
        self._fetch = self._redis.register_script(FETCH)
        self._fetch_texts = self._redis.register_script(FETCH_TEXTS)
        self._put = self._redis.register_script(PUT)
        self._invalidate = self._redis.register_script(INVALIDATE)
        self._link_promotion = self._redis.register_script(LINK_PROMOTION)
        self._drop_promotions = self._redis.register_script(DROP_PROMOTIONS)
        self._mirrors = ScopeMirrors(self._redis, self._prefix)
        self._token_prefix = os.urandom(6).hex()
        self._tokens = count()
        self._log_floor = LOG_FLOOR
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._corrupt = 0
        self._undeclared = UndeclaredTypes()

    def __repr__(self) -> str:
        bound = self._max_size or "unbounded"
        return (
            f"RedisSemanticCache(key_prefix={self._prefix!r}, max_size={bound}, "
            f"similarity_threshold={self._threshold}, ttl_seconds={self._ttl}, "
            f"embed_fn={self._embedding!r}, mirrored_scopes={len(self._mirrors)}, "
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
        no text is ``None`` at once, and not a miss. One round trip for an exact
        repeat or a miss, two for a semantic hit. Raises
        :class:`InvalidInputError`/:class:`InvalidInputTypeError` for a bad query,
        threshold or embedding, before anything stored changes;
        :class:`BackendError` when Redis fails.
        """
        hit = await self.lookup(query, similarity_threshold=similarity_threshold)
        return None if hit is None else hit.value

    async def lookup(
        self, query: Query, *, similarity_threshold: float | None = None
    ) -> SemanticHit | None:
        """:meth:`get`, also telling which entry answered and its remaining lifetime.

        The lifetime is the entry's value's ``PTTL`` read in the same script that
        read the value (server clock). Same round trips and errors as :meth:`get`.
        """
        self._check_open()
        threshold = self._threshold
        if similarity_threshold is not None:
            threshold = check_similarity("similarity_threshold", similarity_threshold)
        try:
            scope, text, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return None  # no text to compare: not a question for this cache, nor a miss
        point = self._mirrors.start(scope)
        reply = await self._sync_scope(scope, digest, point.cursor)
        mode = reply[2]
        if mode == b"e":
            return self._hit(reply[3], reply[4], scope, digest)
        if mode not in (b"d", b"s", b"S"):
            self._miss(corrupt=True)
            return None
        verifier = self._verifier
        k = CANDIDATES if verifier is None else max(CANDIDATES, verifier.max_candidates)
        candidates = await self._candidates(point, reply, text, k, threshold)
        if not candidates:
            self._miss()
            return None
        self._check_open()
        if verifier is None:
            return await self._fetch_first(scope, [c.entry_id for c in candidates])
        return await self._fetch_verified(scope, text, candidates[: verifier.max_candidates])

    async def probe(
        self, query: Query, *, similarity_threshold: float | None = None
    ) -> SemanticProbe | None:
        """What :meth:`lookup` would serve for ``query``, measured without serving it.

        As :meth:`MemorySemanticCache.probe`: nothing is counted, no entry is marked
        used, and the verifier (if any) is asked about up to ``max_verify_candidates``
        candidates whatever their similarity. Two round trips (one when the scope is
        empty or the query is an exact repeat); the same errors as :meth:`lookup`.
        """
        self._check_open()
        threshold = self._threshold
        if similarity_threshold is not None:
            threshold = check_similarity("similarity_threshold", similarity_threshold)
        try:
            scope, text, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return None
        point = self._mirrors.start(scope)
        reply = await self._sync_scope(scope, digest, point.cursor, touch=False)
        mode = reply[2]
        if mode == b"e":
            return SemanticProbe(text, text, 1.0, threshold, None, True)
        found: list[tuple[str | None, float]] = []
        if mode in (b"d", b"s", b"S"):
            k = 1 if self._verifier is None else self._verifier.max_candidates
            candidates = await self._candidates(point, reply, text, k, -1.0)
            if candidates:
                self._check_open()
                texts = await self._read_texts(scope, [c.entry_id for c in candidates], touch=False)
                found = [
                    (text_of(texts[3][i]), c.similarity)
                    for i, c in enumerate(candidates)
                    if texts[3][i] != 0  # gone since the mirror saw it
                ]
        return await judge(text, found, threshold, self._verifier)

    async def _candidates(
        self, point: Any, reply: Any, text: str, k: int, threshold: float
    ) -> list[Candidate]:
        """The best ``k`` candidates at or above ``threshold`` after a sync ``reply``."""
        now_ms, stored_dimension, mode = float(reply[0]), reply[1], reply[2]
        if mode == b"s" and not reply[5] and not reply[3]:
            # the scope holds nothing: no embedding, and no mirror kept
            self._mirrors.forget(point)
            return []
        vector = await self._embedding.embed(text)
        self._check_open()
        self._embedding.check(vector)
        self._check_stored_dimension(vector, stored_dimension)
        index = await self._mirrors.apply(point, reply, vector.shape[0])
        return [] if index is None else await index.best_async(vector, k, now_ms, threshold)

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None:
        """Store ``value`` under the query's scope and the embedding of its last user message.

        Replaces the entry of the same query; stores nothing for a query whose last
        user message has no text. ``ttl_seconds`` overrides the cache's default for
        this entry. The query, value and embedding are all validated before anything
        changes, so bad input raises and leaves Redis as it was, and so does an
        embedding whose dimension differs from the vectors already stored by any
        process. One round trip; :class:`BackendError` when Redis fails.
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
        ttl_ms = max(1, round(ttl * 1000)) if ttl is not None else 0
        base = f"{self._prefix}:s:{scope}"
        try:
            await self._ready()
            reply = await self._put(
                keys=[
                    f"{base}:vec",
                    f"{base}:log",
                    f"{base}:exp",
                    f"{base}:v:{digest}",
                    self._dim_key,
                    self._lru_key,
                    self._lru_exp_key,
                    f"{base}:pr:{digest}",
                    f"{base}:txt",
                ],
                args=[
                    digest,
                    vector.astype("<f4").tobytes(),
                    data,
                    ttl_ms,
                    vector.shape[0],
                    self._max_size,
                    scope,
                    self._prefix,
                    self._log_floor,
                    REAP_LIMIT,
                    self._token(),
                    text.encode("utf-8", "surrogatepass"),
                ],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "put") from exc
        if int(reply[0]) == 0:
            raise _dimension_error(vector, reply[1])
        self._embedding.adopt(vector)
        self._evictions += int(reply[1])

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
        (invalidated, replaced, reaped, evicted or cleared), by whichever process.
        ``exact_cache`` must be a :class:`RedisExactCache` on the same Redis server
        and database (on a cluster: in this cache's hash slot, see
        :meth:`can_promote_into`); for any other cache, or an entry that expired, nothing is
        stored and False is returned. Two round trips: the exact cache's put, then
        one script that ties the promotion to the entry and trims its lifetime to
        what the entry has left (or deletes it if the entry went meanwhile, then
        returns False). Raises what the exact cache's put raises
        (:class:`ValueTooLargeError`, :class:`BackendError`, ...).
        """
        self._check_open()
        ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        if not isinstance(exact_cache, RedisExactCache) or not self.can_promote_into(exact_cache):
            return False
        ttl = promotion_ttl(ttl, exact_cache.ttl_seconds, hit.ttl_seconds)
        scope, _, entry = hit.entry.partition(":")
        if (ttl is not None and ttl <= 0) or not (len(scope) == len(entry) == 64):
            return False
        base = f"{self._prefix}:s:{scope}"
        if self._cluster is not None and key_slot_of(f"{base}:v:{entry}") != key_slot_of(
            f"{exact_cache.key_prefix}:{digest}"
        ):
            return False  # an untagged exact cache: this entry's key lands in another slot
        await exact_cache.put_by_signature(digest, hit.value, ttl_seconds=ttl)
        try:
            await self._ready()
            linked = await self._link_promotion(
                keys=[
                    f"{base}:v:{entry}",
                    f"{base}:pr:{entry}",
                    f"{exact_cache.key_prefix}:{digest}",
                ]
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "promote") from exc
        return bool(linked)

    def can_promote_into(self, exact_cache: object) -> bool:
        """Whether :meth:`promote` may store into ``exact_cache``. O(1), no I/O.

        True for a :class:`RedisExactCache` on the same server and database (the same
        client, or the same connection settings); on a Redis Cluster, the same
        cluster (the same client or startup nodes) and a ``key_prefix`` whose hash tag
        puts its entries in this cache's slot (the promotion script touches both). An
        untagged exact cache on a cluster spreads its entries over every slot: False.
        """
        if not isinstance(exact_cache, RedisExactCache) or not _same_server(
            exact_cache.client, self._redis
        ):
            return False
        if self._cluster is None:
            return True
        return has_hash_tag(exact_cache.key_prefix) and key_slot_of(
            f"{exact_cache.key_prefix}:x"
        ) == key_slot_of(f"{self._prefix}:x")

    def promotion_conflict(self, exact_cache: object) -> str | None:
        """Why hits can never be promoted into ``exact_cache`` although it shares this
        cache's Redis Cluster (its entries land in another hash slot), else None. O(1).

        The gateway refuses such a pairing at construction rather than silently never
        promoting. An exact cache elsewhere (another server, in process) is no conflict:
        it is simply never promoted into.
        """
        if (
            self._cluster is None
            or not isinstance(exact_cache, RedisExactCache)
            or not _same_server(exact_cache.client, self._redis)
            or self.can_promote_into(exact_cache)
        ):
            return None
        return (
            f"semantic hits cannot be promoted into the exact cache {exact_cache.key_prefix!r} "
            f"on this Redis Cluster: its entries are not in the slot of the semantic cache "
            f"{self._prefix!r} (one script touches both); give both key prefixes the same "
            "hash tag (e.g. '{llm}:exact' and '{llm}:semantic')"
        )

    async def invalidate(self, query: Query) -> bool:
        """Remove the entry stored for exactly this query; return whether a live one was there.

        One round trip; other processes' mirrors drop it on their next ``get``. The
        entry's promotions in an exact cache are deleted in the same step.
        """
        self._check_open()
        try:
            scope, _, digest = self._keys.semantic_parts(query)
        except NoSemanticTextError:
            return False  # never stored
        base = f"{self._prefix}:s:{scope}"
        try:
            await self._ready()
            removed = await self._invalidate(
                keys=[
                    f"{base}:vec",
                    f"{base}:log",
                    f"{base}:exp",
                    f"{base}:v:{digest}",
                    self._lru_key,
                    self._lru_exp_key,
                    f"{base}:pr:{digest}",
                ],
                args=[digest, base, f"{scope}:{digest}", self._log_floor, self._token()],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "invalidate") from exc
        return bool(removed)

    async def clear(self) -> None:
        """Remove every entry of every scope; counters and the learned dimension are kept.

        Deletes this cache's keys (SCAN + UNLINK, never KEYS; O(N)) and this process's
        mirrors, and the entries' promotions in an exact cache. Only the keys the
        scripts write are deleted (``{key_prefix}:s:<scope>:`` + ``vec``, ``log``,
        ``exp``, ``v:<digest>``, ``pr:<digest>``; ``{key_prefix}:dim``,
        ``{key_prefix}:lru``, ``{key_prefix}:lru:exp``): other keys, nested prefixes
        such as ``{key_prefix}:v2`` included, stay. Not atomic: a put (or promotion)
        racing with ``clear`` may survive it.
        """
        self._check_open()
        self._mirrors.clear()
        client = self._cluster or self._redis
        try:
            await self._ready()
            # every primary of a cluster (the cache's keys all live on its tag's one)
            async for records in scan_keys(client, self._promotions_pattern, count=500):
                # one script call per hash slot: a script's keys share one
                for positions in slot_groups(records).values():
                    await self._drop_promotions(keys=[records[i] for i in positions])
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc
        await self._delete_matching(self._scope_pattern, keep=self._scope_keys)
        try:
            # these three share the prefix's hash tag on a cluster
            await self._redis.unlink(self._dim_key, self._lru_key, self._lru_exp_key)
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "clear") from exc

    async def stats(self) -> CacheStats:
        """Return this process's hits, misses, evictions and corrupt entries; the size in Redis.

        The size counts live entries only (see the class docstring for its cost).
        """
        self._check_open()
        index = self._lru_key if self._max_size else None
        size = await self._entry_count(index, self._value_pattern, expiries_key=self._lru_exp_key)
        verifier = self._verifier
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            size=size,
            evictions=self._evictions,
            corrupt_entries=self._corrupt + self._mirrors.corrupt,
            undeclared_entries=self._undeclared.count,
            verifier_refusals=0 if verifier is None else verifier.refusals,
            verifier_errors=0 if verifier is None else verifier.errors,
        )

    async def _sync_scope(
        self, scope: str, digest: str, cursor: tuple[bytes, bytes], *, touch: bool = True
    ) -> Any:
        base = f"{self._prefix}:s:{scope}"
        try:
            await self._ready()
            return await self._sync(
                keys=[
                    f"{base}:vec",
                    f"{base}:log",
                    f"{base}:exp",
                    self._dim_key,
                    f"{base}:v:{digest}",
                    self._lru_key,
                ],
                args=[
                    cursor[0],
                    cursor[1],
                    f"{scope}:{digest}" if self._max_size and touch else "",
                    SYNC_SLACK,
                    self._token(),
                    self._mirrors.inline_entries(self._embedding.dimension),
                ],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc

    async def _read_texts(self, scope: str, digests: list[str], *, touch: bool) -> Any:
        """The FETCH_TEXTS reply for candidates ``digests`` (best first)."""
        base = f"{self._prefix}:s:{scope}"
        try:
            return await self._fetch_texts(
                keys=[*(f"{base}:v:{digest}" for digest in digests), f"{base}:txt", self._lru_key],
                args=[
                    *digests,
                    *(f"{scope}:{digest}" for digest in digests),
                    "1" if self._max_size and touch else "0",
                ],
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc

    async def _fetch_verified(
        self, scope: str, text: str, candidates: list[Candidate]
    ) -> SemanticHit | None:
        """The first candidate the verifier accepts whose value still exists, or a miss.

        One call returns every candidate's text and the first existing one's value;
        only when the verifier accepts a later candidate is its value fetched (one
        more call, then the next accepted one if it vanished meanwhile).
        """
        verifier = self._verifier
        assert verifier is not None
        digests = [c.entry_id for c in candidates]
        reply = await self._read_texts(scope, digests, touch=True)
        first, texts = int(reply[0]), reply[3]
        if first < 0:
            self._miss(corrupt=True)
            return None
        for i, candidate in enumerate(candidates):
            stored = texts[i] if i < len(texts) else 0
            if stored == 0:
                continue  # its value is gone: not a candidate any more
            candidate_text = text_of(stored)
            if candidate_text is None:
                verifier.refuse_unknown()
                continue
            if not await verifier.accepts(text, candidate_text, candidate.similarity):
                continue
            self._check_open()
            if i + 1 == first:
                return self._hit(reply[1], reply[2], scope, digests[i])
            hit = await self._fetch_first(scope, [digests[i]], count_miss=False)
            if hit is not None:
                return hit
        self._miss()
        return None

    async def _fetch_first(
        self, scope: str, digests: list[str], *, count_miss: bool = True
    ) -> SemanticHit | None:
        base = f"{self._prefix}:s:{scope}"
        keys = [f"{base}:v:{digest}" for digest in digests]
        members = [f"{scope}:{digest}" for digest in digests]
        try:
            found = await self._fetch(
                keys=[*keys, self._lru_key], args=[*members, "1" if self._max_size else "0"]
            )
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc
        status = int(found[0])
        if status > 0:
            return self._hit(found[1], found[2], scope, digests[status - 1])
        if count_miss or status < 0:
            self._miss(corrupt=status < 0)
        return None

    def _hit(self, data: bytes, left_ms: int, scope: str, digest: str) -> SemanticHit | None:
        """The hit of entry ``digest`` read as ``data`` with ``left_ms`` to live (-1: none)."""
        try:
            value = self._codec.decode(data)
        except UndeclaredTypeError as exc:
            self._undeclared.note(exc)
            self._miss()
            return None
        except CorruptEntryError:
            self._miss(corrupt=True)
            return None
        self._hits += 1
        left = int(left_ms)
        return SemanticHit(value, None if left < 0 else left / 1000, f"{scope}:{digest}")

    def _miss(self, *, corrupt: bool = False) -> None:
        self._misses += 1
        self._corrupt += corrupt

    def _check_stored_dimension(self, vector: UnitVector, stored: bytes) -> None:
        try:
            dimension = int(stored)
        except ValueError:
            return  # absent (b"") or garbage, which the next put overwrites
        if dimension != vector.shape[0]:
            raise _dimension_error(vector, stored)

    def _token(self) -> str:
        return f"{self._token_prefix}{next(self._tokens):x}"

    async def _release(self) -> None:
        self._mirrors.clear()
        await super()._release()


def text_of(stored: object) -> str | None:
    """A candidate's text from a FETCH_TEXTS reply (``None``: none stored)."""
    if isinstance(stored, bytes):
        return stored.decode("utf-8", "replace")
    return None


def _same_server(first: Redis | RedisCluster, second: Redis | RedisCluster) -> bool:
    """Whether two clients talk to the same Redis server and database, or the same cluster.

    Two cluster clients are the same cluster when the nodes they know
    (``nodes_manager.startup_nodes`` and, once initialized, the nodes found) share
    one ``host:port``: a node belongs to one cluster. A cluster never matches a single
    server.
    """
    if first is second:
        return True
    if isinstance(first, RedisCluster) or isinstance(second, RedisCluster):
        if not (isinstance(first, RedisCluster) and isinstance(second, RedisCluster)):
            return False
        return not _known_nodes(first).isdisjoint(_known_nodes(second))
    mine = first.connection_pool.connection_kwargs
    theirs = second.connection_pool.connection_kwargs
    return all(mine.get(name) == theirs.get(name) for name in _SERVER_SETTINGS)


def _known_nodes(client: RedisCluster) -> set[str]:
    manager = client.nodes_manager
    return {*manager.startup_nodes, *manager.nodes_cache}


def _dimension_error(vector: UnitVector, stored: bytes) -> InvalidInputError:
    return InvalidInputError(
        f"embedding has dimension {vector.shape[0]}, but the entries of this cache in Redis "
        f"have dimension {stored.decode(errors='replace')}: another embedder uses the same "
        "key_prefix (clear() the cache to switch embedders, or use another key_prefix)"
    )
