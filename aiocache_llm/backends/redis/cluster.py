"""What differs on a Redis Cluster: hash slots, scanning every primary, per-slot commands.

Every key that one script, ``MULTI`` or ``MGET`` touches together must hash to one
slot; the backends get that from hash tags (``{...}`` in a key: only what is between
the first ``{`` and the next ``}`` is hashed). The helpers here also work on a
single server (one "node", every key in one group), so callers keep one code path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

__all__ = [
    "has_hash_tag",
    "is_slot_in_motion",
    "key_slot_of",
    "scan_keys",
    "slot_groups",
    "unlink_keys",
]


def is_slot_in_motion(exc: BaseException) -> bool:
    """Whether ``exc`` says a slot is being migrated (resharding), not that a node failed.

    While a slot moves, a command on several of its keys gets TRYAGAIN as long as
    they are split between the two nodes, and redis-py, after retrying a command
    through TRYAGAIN/ASK/MOVED 16 times (about 0.4 s), gives up with
    ``ClusterError("TTL exhausted.")``. The node answered: the command did not run.
    """
    if isinstance(exc, (redis_errors.TryAgainError, redis_errors.AskError)):
        return True  # MovedError is an AskError
    return isinstance(exc, redis_errors.ClusterError) and "TTL exhausted" in str(exc)


def has_hash_tag(key: str | bytes) -> bool:
    """Whether ``key`` holds a non-empty hash tag: ``{x}`` with x non-empty, first ``{`` wins."""
    text = key.encode() if isinstance(key, str) else key
    start = text.find(b"{")
    if start < 0:
        return False
    end = text.find(b"}", start + 1)
    return end > start + 1


def key_slot_of(key: str | bytes) -> int:
    """The cluster hash slot of ``key`` (0..16383), hash tags honoured; no I/O."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def slot_groups(keys: Iterable[str | bytes]) -> dict[int, list[int]]:
    """Positions of ``keys`` grouped by hash slot, each group in input order."""
    groups: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key_slot_of(key), []).append(position)
    return groups


async def scan_keys(
    client: Redis | RedisCluster, pattern: str, *, count: int = 500
) -> AsyncIterator[list[bytes]]:
    """Batches of the keys matching the glob ``pattern``: SCAN on every primary, never KEYS.

    On a cluster each primary is scanned to the end in turn (a replica holds the
    same keys as its primary); on a single server this is one plain SCAN. A key may
    be yielded twice (SCAN's own guarantee), never missed if it lived throughout.
    """
    if not isinstance(client, RedisCluster):
        cursor: Any = 0
        while True:
            cursor, keys = await client.scan(cursor=cursor, match=pattern, count=count)
            if keys:
                yield [key if isinstance(key, bytes) else key.encode() for key in keys]
            if int(cursor) == 0:
                return
    for node in client.get_primaries():
        cursor = 0
        while True:
            reply: Any = await client.scan(
                cursor=cursor, match=pattern, count=count, target_nodes=node
            )
            # the cluster client answers {node name: cursor} (one node targeted here)
            cursors, found = reply
            cursor = cursors.get(node.name, 0) if isinstance(cursors, dict) else cursors
            if found:
                yield [key if isinstance(key, bytes) else key.encode() for key in found]
            if int(cursor) == 0:
                break


async def unlink_keys(client: Redis | RedisCluster, keys: list[bytes]) -> int:
    """UNLINK ``keys`` (one command per hash slot on a cluster); returns how many went."""
    if not keys:
        return 0
    if not isinstance(client, RedisCluster):
        removed: int = await client.unlink(*keys)
        return removed
    groups = slot_groups(keys)
    async with client.pipeline(transaction=False) as pipe:
        for positions in groups.values():
            # execute_command, not pipe.unlink: the cluster pipeline's unlink is a
            # coroutine of its own and would never be queued
            pipe.execute_command("UNLINK", *(keys[i] for i in positions))
        replies: list[Any] = await pipe.execute()
    return sum(int(reply) for reply in replies)
