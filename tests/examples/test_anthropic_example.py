"""``examples/anthropic_app.py`` runs against the local Anthropic Messages server.

The example needs a server: this test starts ``FakeAnthropicServer`` and points the
SDK's environment (``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY``) at it, so nothing
reaches the internet.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.anthropic_server import FakeAnthropicServer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)

LINE = re.compile(r"^(?P<label>\S.*?)\s{2,}(?P<source>API call|cache)\s+'(?P<text>.*)'$")


async def test_anthropic_example_answers_repeats_from_the_cache() -> None:
    async with FakeAnthropicServer() as server:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "PYTHONPATH": path,
            "ANTHROPIC_BASE_URL": server.base_url,
            "ANTHROPIC_API_KEY": "sk-ant-example-test",
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }
        for name in ("REDIS_URL", "ANTHROPIC_MODEL", "ANTHROPIC_AUTH_TOKEN"):
            env.pop(name, None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "anthropic_app.py"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=50)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    answer = "Echo: In one sentence: why cache LLM answers?"
    steps = {m["label"]: (m["source"], m["text"]) for m in map(LINE.match, lines) if m}
    assert steps == {
        "create": ("API call", answer),
        "create again": ("cache", answer),
        "stream": ("API call", answer),
        "stream again": ("cache", answer),
        "create, no_cache": ("API call", answer),
    }
    assert "requests=5 provider_calls=3" in lines
    assert "distinct message ids=5" in lines  # fresh_hit_ids: hits never repeat an id
    assert (server.requests, server.stream_requests) == (3, 1)
    assert all(body["model"] == "claude-haiku-4-5" for body in server.bodies)
    # the key went to the server as the SDK sends it, and nowhere into the output
    assert all(
        any("sk-ant-example-test" in value for value in headers.values())
        for headers in server.headers
    )
    assert b"sk-ant-example-test" not in stdout + stderr
