"""What differs on a Redis Cluster: hash slots, scanning every primary, per-slot commands.

Every key that one script, ``MULTI`` or ``MGET`` touches together must hash to one
slot; the backends get that from hash tags (``{...}`` in a key: only what is between
the first ``{`` and the next ``}`` is hashed). The helpers here also work on a
single server (one "node", every key in one group), so callers keep one code path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

__all__ = [
    "SLOT_IN_MOTION_GET_DEADLINE_S",
    "execute_during_migration",
    "get_during_migration",
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


SLOT_IN_MOTION_GET_DEADLINE_S = 2.0
"""How long :func:`get_during_migration` keeps following redirections of one key."""


async def get_during_migration(
    cluster: RedisCluster, key: str, *, deadline_s: float = SLOT_IN_MOTION_GET_DEADLINE_S
) -> Any:
    """``GET key`` on a cluster, following ``ASK`` with ``ASKING`` on the same connection.

    For a key whose slot is being migrated. redis-py sends ``ASKING`` as a command of
    its own, on whichever pooled connection of the target is free, and the redirected
    command on the next one: when the target node has two free connections the command
    arrives without ``ASKING``, the importing target answers ``MOVED`` back to the
    source, the source ``ASK`` again, and after 16 hops ``ClusterError("TTL
    exhausted.")``. Here ``ASKING`` and ``GET`` are written together on one connection.
    ``MOVED`` is followed (the slot map is left to the client: the next command it
    routes there patches it); every fourth hop, and after ``TRYAGAIN``, it waits a
    little first (10 ms, doubling up to 100 ms). After ``deadline_s`` the
    last redirection error is raised (a ``BackendUnavailableError`` to callers). A read
    answers only what a node serving the key says: never a miss for a key it holds.
    """
    return await execute_during_migration(cluster, key, ("GET", key), deadline_s=deadline_s)


async def execute_during_migration(
    cluster: RedisCluster,
    key: str,
    command: tuple[Any, ...],
    *,
    deadline_s: float = SLOT_IN_MOTION_GET_DEADLINE_S,
) -> Any:
    """Run ``command`` (on ``key`` alone) as :func:`get_during_migration` runs ``GET``.

    Only for a command that is safe to send again after a redirection error (a node
    answering ``ASK``, ``MOVED`` or ``TRYAGAIN`` did not run it), e.g. ``SET``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    node: ClusterNode | None = cluster.get_node_from_key(key)
    asking = False
    hops = 0
    delay = 0.01
    while True:
        if node is None:  # redirected to a node the client does not know yet
            return await cluster.execute_command(*command)
        error: redis_errors.RedisError
        try:
            return await _run_on_node(node, command, asking=asking)
        except redis_errors.MovedError as exc:  # an AskError too: first
            error = exc
            host, port = cluster.nodes_manager.remap_host_port(exc.host or node.host, exc.port)
            node, asking = cluster.get_node(host=host, port=port), False
        except redis_errors.AskError as exc:
            error = exc
            host, port = cluster.nodes_manager.remap_host_port(exc.host or node.host, exc.port)
            node, asking = cluster.get_node(host=host, port=port), True
        except redis_errors.TryAgainError as exc:
            error = exc
        hops += 1
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise error
        if hops % 4 == 0 or isinstance(error, redis_errors.TryAgainError):
            # ASK then MOVED, and again: the slot map is changing under us
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)


async def _run_on_node(node: ClusterNode, command: tuple[Any, ...], *, asking: bool) -> Any:
    """``command`` on ``node`` alone, preceded by ``ASKING`` on the same connection."""
    connection = node.acquire_connection()
    clean = False  # whether no reply is left unread on the connection
    try:
        if asking:
            await connection.send_packed_command(connection.pack_commands([("ASKING",), command]))
            await connection.read_response()
        else:
            await connection.send_packed_command(connection.pack_command(*command))
        try:
            value = await connection.read_response()
        except redis_errors.ResponseError:
            clean = True
            raise
        clean = True
        return value
    finally:
        if not clean:
            await connection.disconnect()
        node.release(connection)
