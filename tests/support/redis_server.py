"""Private ``redis-server`` processes for fault tests: start, SIGKILL, SIGSTOP, restart.

Each server listens on its own free loopback port, keeps nothing on disk and is
stopped by the pid this helper started; the shared server on 6379 is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import pytest

__all__ = ["RedisServer", "die_with_parent", "free_port", "redis_server_binary"]

_PR_SET_PDEATHSIG = 1


def redis_server_binary() -> str:
    """Path of ``redis-server``; skips the test (fails in CI) when it is missing."""
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("AIOCACHE_LLM_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server binary not found (AIOCACHE_LLM_REQUIRE_REDIS=1)")
        pytest.skip("redis-server binary not found")
    return path


def die_with_parent() -> None:
    """``preexec_fn`` for server processes: the kernel SIGKILLs them when the test run dies.

    A run that crashes (a segfault in an extension, SIGKILL, a CI timeout) never reaches
    fixture teardown; without this its servers would keep listening, orphaned, until
    someone hunts them down. Linux only; elsewhere a no-op.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` child process on ``127.0.0.1:port``."""

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="aiocache-llm-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.process.stderr!r}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis(extra_args: Sequence[str] = ()) -> Iterator[RedisServer]:
    server = RedisServer(extra_args=extra_args).start()
    try:
        yield server
    finally:
        server.stop()
