"""A private Sentinel setup for tests: a primary, one replica and one sentinel.

Each process listens on its own free loopback port, keeps nothing on disk but the
sentinel's own config file (in a temporary directory removed on stop) and is stopped
by the pid this helper started. :meth:`LocalSentinel.start` returns once the replica
has synced and the sentinel names the primary and knows the replica (about 1-2 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

from tests.support.redis_cluster import cli
from tests.support.redis_server import (
    RedisServer,
    die_with_parent,
    free_port,
    redis_server_binary,
)

__all__ = ["SERVICE", "LocalSentinel", "running_sentinel"]

SERVICE = "aiocache-llm-primary"
"""The service name the sentinel monitors the primary under."""


class LocalSentinel:
    """A primary, a replica of it and a sentinel watching them (quorum 1)."""

    def __init__(self, down_after_ms: int = 5000) -> None:
        self.down_after_ms = down_after_ms
        self._dir = tempfile.mkdtemp(prefix="aiocache-llm-sentinel-")
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinel: RedisServer | None = None

    @property
    def sentinel_port(self) -> int:
        assert self.sentinel is not None
        return self.sentinel.port

    @property
    def url(self) -> str:
        """The Sentinel URL form the library accepts: ``redis+sentinel://h:p/service/db``."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def start(self, timeout: float = 20.0) -> LocalSentinel:
        try:
            # the replica syncs at once (the default waits 5 s for more replicas)
            self.primary = RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]).start()
            self.replica = RedisServer(
                extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)]
            ).start()
            port = free_port()
            config = os.path.join(self._dir, f"sentinel-{port}.conf")
            with open(config, "w", encoding="utf-8") as file:
                file.write(
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 1\n"
                    f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {SERVICE} 5000\n"
                )
            # a RedisServer only for its stop(); started here because the sentinel
            # reads (and rewrites) its own config file, given before the options
            self.sentinel = RedisServer(port)
            self._start_sentinel(config, port)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self, config: str, port: int) -> None:
        assert self.sentinel is not None
        args = [
            redis_server_binary(), config, "--sentinel",
            "--port", str(port), "--bind", "127.0.0.1", "--dir", self._dir,
        ]  # fmt: skip
        self.sentinel.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )

    def _wait_ready(self, timeout: float) -> None:
        assert self.primary is not None
        assert self.replica is not None
        deadline = time.monotonic() + timeout
        while True:
            synced = "master_link_status:up" in cli("INFO", "replication", port=self.replica.port)
            sentinel = cli("SENTINEL", "replicas", SERVICE, port=self.sentinel_port)
            named = cli("SENTINEL", "get-master-addr-by-name", SERVICE, port=self.sentinel_port)
            if synced and str(self.replica.port) in sentinel and str(self.primary.port) in named:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel setup not ready within {timeout}s")
            time.sleep(0.05)

    def current_primary(self) -> RedisServer:
        """The server the sentinel names as primary now (after a failover: the old replica)."""
        reply = cli("SENTINEL", "get-master-addr-by-name", SERVICE, port=self.sentinel_port)
        port = int(reply.split()[1])
        return next(s for s in (self.primary, self.replica) if s is not None and s.port == port)

    def current_replica(self) -> RedisServer:
        """The server that is not :meth:`current_primary`."""
        primary = self.current_primary()
        return next(s for s in (self.primary, self.replica) if s is not None and s is not primary)

    def stop(self) -> None:
        """Stop every process this helper started (by pid) and remove the directory."""
        for server in (self.sentinel, self.primary, self.replica):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def running_sentinel() -> Iterator[LocalSentinel]:
    setup = LocalSentinel().start()
    try:
        yield setup
    finally:
        setup.stop()
