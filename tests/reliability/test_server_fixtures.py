"""The private redis-server processes of the fault and cluster tests die with the test run.

A test run that crashes never reaches fixture teardown; its servers must not stay behind
listening (they did, after a segfault, before ``die_with_parent``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.support.redis_server import redis_server_binary

CHILD = """
import os, signal, sys
from tests.support.redis_server import RedisServer
server = RedisServer().start()
print(server.port, server.process.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a crash: no teardown runs
"""


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_crashed_test_process_takes_its_servers_with_it() -> None:
    redis_server_binary()
    child = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == -9, child.stderr[-500:]
    port = int(child.stdout.split()[0])
    deadline = time.monotonic() + 5.0
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _listening(port), f"the server on port {port} outlived the process that started it"
