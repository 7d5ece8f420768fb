"""A private Redis Cluster for tests: 6 ``redis-server`` processes (3 primaries, 3 replicas).

Every node listens on its own free loopback port, keeps nothing on disk (its
``nodes-PORT.conf`` lives in a temporary directory removed on stop) and is stopped by
the pid this helper started; the shared server on 6379 is never touched. Startup
takes about 2-4 s: the nodes start, ``redis-cli --cluster create`` assigns the slots
and pairs each replica with a primary, and :meth:`RedisCluster.start` returns once
every node reports ``cluster_state:ok`` and knows every other node.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer, free_port, redis_server_binary

__all__ = ["LocalCluster", "cli", "redis_cli_binary", "running_cluster"]


def redis_cli_binary() -> str:
    """Path of ``redis-cli``; skips the test (fails in CI) when it is missing."""
    path = shutil.which("redis-cli")
    if path is None:
        if os.environ.get("AIOCACHE_LLM_REQUIRE_REDIS") == "1":
            pytest.fail("redis-cli binary not found (AIOCACHE_LLM_REQUIRE_REDIS=1)")
        pytest.skip("redis-cli binary not found")
    return path


def cli(*args: str, port: int, timeout: float = 5.0) -> str:
    """What ``redis-cli -p port args...`` prints (empty when the node does not answer)."""
    done = subprocess.run(
        [redis_cli_binary(), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout.decode(errors="replace")


class LocalCluster:
    """``primaries`` primaries with ``replicas`` replicas each, on free loopback ports."""

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self._dir = tempfile.mkdtemp(prefix="aiocache-llm-cluster-")
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.ports]

    @property
    def url(self) -> str:
        """The cluster URL form the library accepts: ``redis+cluster://h:p,h:p,.../0``."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports[:3])
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = 30.0) -> LocalCluster:
        redis_server_binary()
        cli = redis_cli_binary()
        count = self.primaries * (1 + self.replicas)
        try:
            for _ in range(count):
                self.nodes.append(self._start_node())
            create = subprocess.run(
                [
                    cli, "--cluster", "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-replicas", str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=timeout,
                check=False,
            )  # fmt: skip
            if create.returncode != 0:
                output = create.stdout[-800:] + create.stderr[-800:]
                raise RuntimeError(f"redis-cli --cluster create failed: {output!r}")
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _free_node_port(self) -> int:
        """A free port whose cluster bus port (port + 10000) is free too, and that is
        no other node's bus port: a node on another's bus port would fail to bind
        while its listening check, answered by that bus, passed."""
        taken = {port for node in self.nodes for port in (node.port, node.port + 10000)}
        while True:
            port = free_port()
            if port + 10000 > 65535 or port in taken or port + 10000 in taken:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port

    def _start_node(self, attempts: int = 3) -> RedisServer:
        """One cluster node on a free port (another port if one was taken meanwhile)."""
        for attempt in range(attempts):
            port = self._free_node_port()
            node = RedisServer(
                port,
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", os.path.join(self._dir, f"nodes-{port}.conf"),
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    # a primary keeps serving its slots while another one fails
                    "--cluster-require-full-coverage", "no",
                    # replicas sync at once (the default waits 5 s for more replicas)
                    "--repl-diskless-sync-delay", "0",
                ],
            )  # fmt: skip
            try:
                return node.start()
            except RuntimeError as exc:
                node.stop()
                error = exc
                stderr = node.process.stderr.read() if node.process and node.process.stderr else b""
                if attempt == attempts - 1:
                    raise RuntimeError(f"{error}: {stderr[-500:]!r}") from exc
        raise AssertionError("unreachable")

    def wait_ok(self, timeout: float = 30.0, *, ports: list[int] | None = None) -> None:
        """Wait until every node (of ``ports``) says ``cluster_state:ok``, knows all nodes
        and (when waiting for all of them) sees every replica paired, and every replica
        has synced with its primary."""
        deadline = time.monotonic() + timeout
        waiting = list(ports if ports is not None else self.ports)
        while waiting:
            port = waiting[0]
            info = cli("CLUSTER", "INFO", port=port)
            known = f"cluster_known_nodes:{len(self.nodes)}" in info
            # the replicas' roles reach every node's view a little after the slots do
            roles = [line.split()[2] for line in cli("CLUSTER", "NODES", port=port).splitlines()]
            paired = sum("slave" in role for role in roles) >= self.primaries * self.replicas
            if paired and ports is None and "role:slave" in cli("INFO", "replication", port=port):
                # a replica that never synced would refuse to be promoted (its data is too old)
                paired = "master_link_status:up" in cli("INFO", "replication", port=port)
            if "cluster_state:ok" in info and known and (ports is not None or paired):
                waiting.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node {port} not ok within {timeout}s: {info!r}")
            time.sleep(0.05)

    def primary_ports(self) -> list[int]:
        """The ports of the nodes serving slots now (as node 0 or the first live node sees it)."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            lines = cli("CLUSTER", "NODES", port=node.port).splitlines()
            return sorted(
                int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                for line in lines
                if "master" in line.split()[2] and "fail" not in line.split()[2]
            )
        return []

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def stop(self) -> None:
        """Stop every node this helper started (by pid) and remove the directory."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(primaries: int = 3, replicas: int = 1) -> Iterator[LocalCluster]:
    cluster = LocalCluster(primaries, replicas).start()
    try:
        yield cluster
    finally:
        cluster.stop()
