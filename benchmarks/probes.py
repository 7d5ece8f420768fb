"""Process resource probes for the soak run and the fault tests: RSS, fds, tasks, connections.

Read from ``/proc`` where it exists (Linux), with ``resource`` as the RSS fallback,
so nothing beyond the standard library is needed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

__all__ = ["Resources", "open_fds", "pool_connections", "rss_bytes", "server_clients", "snapshot"]


def rss_bytes() -> int:
    """This process's resident set size now (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def open_fds() -> int | None:
    """File descriptors this process holds open (sockets included); None if unknown."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def pool_connections(clients: Iterable[Redis]) -> int:
    """Connections with a live socket in the pools of ``clients`` (idle and in use)."""
    total = 0
    for client in clients:
        pool = client.connection_pool
        # redis-py keeps no public count: these two hold every connection it made
        held = [*pool._available_connections, *pool._in_use_connections]
        total += sum(1 for connection in held if connection.is_connected)
    return total


async def server_clients(observer: Redis) -> int | None:
    """Client connections the server holds, ``observer``'s own excluded; None if unreachable."""
    # the first try after a server restart fails on the observer's own stale connection
    for _ in range(2):
        try:
            clients = await observer.client_list()
        except Exception:
            continue
        return len(clients) - 1
    return None


@dataclass(frozen=True)
class Resources:
    """One snapshot of what a long-running process must not accumulate."""

    rss_mib: float
    objects: int
    """Objects the garbage collector tracks: Python-level growth, apart from the allocator's."""
    fds: int | None
    tasks: int
    pool_connections: int
    server_clients: int | None

    def row(self) -> str:
        fds = "-" if self.fds is None else str(self.fds)
        server = "-" if self.server_clients is None else str(self.server_clients)
        return (
            f"rss={self.rss_mib:.1f} MiB objects={self.objects} fds={fds} tasks={self.tasks} "
            f"pool_conns={self.pool_connections} server_clients={server}"
        )


async def snapshot(clients: Iterable[Redis], observer: Redis | None = None) -> Resources:
    """Measure now (after a full collection); ``observer`` (a client outside ``clients``)
    asks the server for its count."""
    gc.collect()
    return Resources(
        rss_mib=rss_bytes() / 2**20,
        objects=len(gc.get_objects()),
        fds=open_fds(),
        tasks=len(asyncio.all_tasks()),
        pool_connections=pool_connections(clients),
        server_clients=None if observer is None else await server_clients(observer),
    )
