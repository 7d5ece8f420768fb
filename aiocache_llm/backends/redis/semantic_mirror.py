"""``ScopeMirrors``: this process's numpy copies of the Redis scopes it looks up.

``RedisSemanticCache`` searches vectors locally: each scope it queried is mirrored
as a :class:`VectorIndex`, tagged with the id and token of the last log entry it
reflects (its *cursor*). Every ``get`` sends that cursor with the ``SYNC`` script
(see :mod:`semantic_scripts <aiocache_llm.backends.redis.semantic_scripts>`) and
hands the reply here, which brings the mirror up to date in one of three ways:

* ``d``: replay the log entries after the cursor (the common case, O(changes * d));
* ``s``: replace the mirror with a snapshot of the scope sent in the reply;
* ``S``: the scope is too large for one reply: HSCAN it in batches, then replay
  the changes logged since the scan began.

Everything read from Redis is parsed as data (digests, float32 bytes, numbers);
what does not parse is skipped and counted in :attr:`ScopeMirrors.corrupt`.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from aiocache_llm.backends import vectors
from aiocache_llm.backends.redis.connection import DRIVER_ERRORS, backend_error
from aiocache_llm.backends.redis.semantic_scripts import CHANGES, SYNC_SLACK
from aiocache_llm.backends.vectors import UnitVector, VectorIndex, as_unit_vector, unit_rows
from aiocache_llm.core.errors import InvalidInputError

__all__ = [
    "INLINE_SNAPSHOT_BYTES",
    "MAX_MIRRORS",
    "SCAN_BATCH",
    "ScopeMirrors",
    "SyncPoint",
]

INLINE_SNAPSHOT_BYTES = 1 << 20
"""Largest scope (in vector bytes) sent whole in the sync reply; larger ones are scanned.

A script holds Redis for its whole run: 1 MiB keeps that to about a millisecond.
"""

SCAN_BATCH = 1000
"""Entries per HSCAN step when mirroring a large scope."""

MAX_MIRRORS = 1024
"""Scopes whose mirrors a process keeps; the least recently used beyond are dropped."""

_DIGEST = re.compile(rb"[0-9a-f]{64}")
_Cursor = tuple[bytes, bytes]  # (stream id, token) of a log entry
_NO_CURSOR: _Cursor = (b"", b"")


class _Mirror:
    """This process's copy of one scope's vectors, as of log entry ``cursor``."""

    __slots__ = ("cursor", "index")

    def __init__(self, index: VectorIndex, cursor: _Cursor) -> None:
        self.index = index
        self.cursor = cursor  # (stream id, token) of the last log entry applied


class SyncPoint(NamedTuple):
    """The mirror state a ``SYNC`` call was sent from: its reply applies to that state only."""

    scope: str
    mirror: _Mirror | None
    cursor: _Cursor


class ScopeMirrors:
    """The mirrors of one ``RedisSemanticCache``, least recently synced first.

    At most :data:`MAX_MIRRORS` scopes are kept (the least recently used beyond are
    dropped). A ``SYNC`` reply is applied only to the mirror state it was requested
    from (:class:`SyncPoint`): when a concurrent ``get`` moved the mirror meanwhile,
    the current mirror is searched as it is (it is at most as old as that other
    reply). Only the event loop mutates mirrors; large snapshots are parsed in a
    worker thread into a fresh index that is swapped in afterwards.

    ``snapshots`` counts the full copies taken; ``corrupt`` counts the pieces of data
    under our keys that could not be parsed (part of the cache's ``corrupt_entries``).
    """

    __slots__ = (
        "_changes",
        "_mirrors",
        "_prefix",
        "_redis",
        "_scanning",
        "corrupt",
        "inline_snapshot_bytes",
        "snapshots",
    )

    def __init__(self, client: Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix
        self._changes = client.register_script(CHANGES)
        self._mirrors: OrderedDict[str, _Mirror] = OrderedDict()
        self._scanning: set[str] = set()  # scopes whose mirror a scan is building
        self.inline_snapshot_bytes = INLINE_SNAPSHOT_BYTES
        self.snapshots = 0
        self.corrupt = 0

    def __len__(self) -> int:
        return len(self._mirrors)

    def start(self, scope: str) -> SyncPoint:
        """The state of the mirror of ``scope`` that a ``SYNC`` call is about to be sent from."""
        mirror = self._mirrors.get(scope)
        return SyncPoint(scope, mirror, _NO_CURSOR if mirror is None else mirror.cursor)

    def inline_entries(self, dimension: int | None) -> int:
        """Most entries a ``SYNC`` reply may carry as a snapshot (``ARGV[6]``)."""
        return self.inline_snapshot_bytes // (4 * (dimension or 1024))

    def forget(self, point: SyncPoint) -> None:
        """Drop the mirror of a scope found empty, unless it moved since ``point``."""
        if self._unchanged(point):
            self._mirrors.pop(point.scope, None)

    def indexes(self) -> list[VectorIndex]:
        """The mirrored indexes, least recently synced first."""
        return [mirror.index for mirror in self._mirrors.values()]

    def clear(self) -> None:
        """Drop every mirror; the next ``get`` of each scope takes a snapshot."""
        self._mirrors.clear()

    async def apply(self, point: SyncPoint, reply: list[Any], dimension: int) -> VectorIndex | None:
        """Bring the mirror of ``point.scope`` up to date with a SYNC reply; return what to search.

        ``None`` when there is nothing to search (no mirror, or one of another dimension).
        Raises :class:`BackendError` when a scan of a large scope fails.
        """
        if not self._unchanged(point):
            return self._current(point.scope, dimension)
        scope, sent_from = point.scope, point.mirror
        mode, last = reply[2], (reply[3], reply[4])
        if mode == b"d":
            if sent_from is None:  # a delta always answers a mirror's cursor
                return None
            if sent_from.index.dimension != dimension:
                del self._mirrors[scope]  # vectors of another embedder: the next get resyncs
                return None
            self._apply_changes(sent_from.index, reply[5], dimension)
            sent_from.cursor = last
            self._mirrors.move_to_end(scope)
            return sent_from.index
        if mode == b"S":
            return await self._scan(point, last, dimension)
        return await self._install(point, reply[5], reply[6], last, dimension)

    async def _scan(self, point: SyncPoint, start: _Cursor, dimension: int) -> VectorIndex | None:
        """Mirror a scope too large for one reply: HSCAN it, then replay the log.

        Each HSCAN step holds Redis for one batch only. Writes made while scanning
        may or may not show in what the scan returns, but each is logged after the
        log entry ``start`` (read before the scan began); replaying those entries
        in order over the scanned state gives exactly the state at the last one.
        Only one scan per scope runs at a time; meanwhile other lookups of the
        scope search what mirror there is (a miss when there is none).
        """
        scope = point.scope
        if not start[0] or scope in self._scanning:
            return self._current(scope, dimension)
        base = f"{self._prefix}:s:{scope}"
        stored: dict[bytes, bytes] = {}  # HSCAN may return a field twice
        expiries: list[Any] = []
        self._scanning.add(scope)
        try:
            async for field, blob in self._redis.hscan_iter(f"{base}:vec", count=SCAN_BATCH):
                stored[field] = blob
            async for member, score in self._redis.zscan_iter(f"{base}:exp", count=SCAN_BATCH):
                expiries += (member, score)
            caught_up = await self._changes(
                keys=[f"{base}:log"], args=[start[0], start[1], len(stored) + SYNC_SLACK]
            )
        except redis_errors.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise backend_error(exc, "get") from exc
            self.corrupt += 1
            return None
        except DRIVER_ERRORS as exc:
            raise backend_error(exc, "get") from exc
        finally:
            self._scanning.discard(scope)
        if not caught_up:  # the log moved on too far while scanning; the next get retries
            return self._current(scope, dimension)
        flat = [item for pair in stored.items() for item in pair]
        last = (caught_up[0], caught_up[1])
        return await self._install(point, flat, expiries, last, dimension, changes=caught_up[2])

    async def _install(
        self,
        point: SyncPoint,
        stored: list[Any],
        expiries: list[Any],
        last: _Cursor,
        dimension: int,
        *,
        changes: Sequence[Any] = (),
    ) -> VectorIndex | None:
        """Replace the mirror of ``point.scope`` with a parsed snapshot (plus later ``changes``)."""
        self.snapshots += 1
        # parsing costs a few microseconds per entry: beyond what fits in one sync
        # reply, it would hold the loop for milliseconds
        if (len(stored) // 2) * 4 * dimension > self.inline_snapshot_bytes:
            snapshot = await vectors.run_in_thread(_Snapshot, stored, expiries, dimension)
        else:
            snapshot = _Snapshot(stored, expiries, dimension)
        self.corrupt += snapshot.corrupt
        self._apply_changes(snapshot.index, changes, dimension)
        if not self._unchanged(point):
            return self._current(point.scope, dimension)
        self._mirrors[point.scope] = _Mirror(snapshot.index, last)
        self._mirrors.move_to_end(point.scope)
        while len(self._mirrors) > MAX_MIRRORS:
            self._mirrors.popitem(last=False)
        return snapshot.index

    def _unchanged(self, point: SyncPoint) -> bool:
        current = self._mirrors.get(point.scope)
        return current is point.mirror and (current is None or current.cursor == point.cursor)

    def _current(self, scope: str, dimension: int) -> VectorIndex | None:
        current = self._mirrors.get(scope)
        if current is None or current.index.dimension != dimension:
            return None
        return current.index

    def _apply_changes(self, index: VectorIndex, changes: Sequence[Any], dimension: int) -> None:
        for change in changes:
            fields = _fields(change[1]) if isinstance(change, list) and len(change) == 2 else None
            op = None if fields is None else fields.get(b"o")
            if fields is None or op not in (b"a", b"r", b"n"):
                self.corrupt += 1
                continue
            if op == b"n":
                continue
            digest = _digest(fields.get(b"d"))
            if digest is None:
                self.corrupt += 1
                continue
            if op == b"r":
                index.remove(digest)
                continue
            vector = _vector(fields.get(b"v"), dimension)
            expiry = _expiry(fields.get(b"x"))
            if vector is None or expiry is None:
                self.corrupt += 1
                index.remove(digest)  # whatever the entry held before is superseded
                continue
            index.upsert(digest, vector, expiry)


class _Snapshot:
    """A scope's vectors parsed from ``HGETALL`` + ``ZRANGE``; built off the loop if large."""

    __slots__ = ("corrupt", "index")

    def __init__(self, vectors: Sequence[bytes], expiries: Sequence[Any], dimension: int) -> None:
        width = 4 * dimension
        fields = list(vectors[0::2])
        blobs = list(vectors[1::2])
        corrupt = 0
        # one C-level pass each in the common case where everything is well formed
        if not (all(map(_DIGEST.fullmatch, fields)) and all(len(blob) == width for blob in blobs)):
            good = [
                i
                for i, (field, blob) in enumerate(zip(fields, blobs, strict=True))
                if _DIGEST.fullmatch(field) and len(blob) == width
            ]
            corrupt += len(fields) - len(good)
            fields = [fields[i] for i in good]
            blobs = [blobs[i] for i in good]
        raw = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(fields), dimension)
        matrix: npt.NDArray[np.float32] = raw.astype(np.float32, copy=True)
        usable = unit_rows(matrix)
        if not usable.all():
            corrupt += int((~usable).sum())
            matrix = matrix[usable]
            fields = [fields[row] for row in np.flatnonzero(usable).tolist()]
        expiry_ms: dict[bytes, float] = {}
        for member, score in zip(expiries[0::2], expiries[1::2], strict=False):
            try:
                expiry_ms[member] = float(score)
            except (TypeError, ValueError):
                corrupt += 1
        expiry = np.fromiter(
            map(expiry_ms.get, fields, repeat(math.inf)), dtype=np.float64, count=len(fields)
        )
        ids = list(map(bytes.decode, fields))
        self.index = VectorIndex.from_rows(ids, matrix, expiry)
        self.corrupt = corrupt


def _fields(raw: object) -> dict[bytes, bytes] | None:
    if not isinstance(raw, list) or len(raw) % 2:
        return None
    return dict(zip(raw[::2], raw[1::2], strict=True))


def _digest(raw: bytes | None) -> str | None:
    if raw is None or not _DIGEST.fullmatch(raw):
        return None
    return raw.decode("ascii")


def _expiry(raw: bytes | None) -> float | None:
    try:
        milliseconds = int(float(raw))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return math.inf if milliseconds == 0 else float(milliseconds)


def _vector(raw: bytes | None, dimension: int) -> UnitVector | None:
    if raw is None or len(raw) != 4 * dimension:
        return None
    try:
        return as_unit_vector(np.frombuffer(raw, dtype="<f4"), dimension)
    except InvalidInputError:
        return None
