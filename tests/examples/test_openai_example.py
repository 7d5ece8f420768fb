"""``examples/openai_app.py`` runs against the local OpenAI-compatible server.

The example needs a server: this test starts ``FakeOpenAIServer`` and points the SDK's
environment (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) at it, so nothing reaches the
internet.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)

LINE = re.compile(r"^(?P<label>\S.*?)\s{2,}(?P<source>API call|cache)\s+'(?P<text>.*)'$")


async def test_openai_example_answers_repeats_from_the_cache() -> None:
    async with FakeOpenAIServer() as server:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "PYTHONPATH": path,
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_KEY": "sk-example-test",
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }
        for name in ("REDIS_URL", "OPENAI_MODEL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
            env.pop(name, None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "openai_app.py"),
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
    assert (server.requests, server.stream_requests) == (3, 1)
