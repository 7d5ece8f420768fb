"""The README's integration examples run as written: the OpenAI embeddings example
against the local OpenAI-compatible server, the LangChain example offline."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.support.openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(90)


def section_code(title: str, contains: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks: list[str] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    [code] = [block for block in blocks if contains in block]
    return code


async def run(code: str, **env_vars: str) -> tuple[int, str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().endswith("_PROXY") and not name.startswith("OPENAI_")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(env_vars)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "ignore",
        "-c",
        code,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=80)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_openai_embeddings_example_runs_as_written() -> None:
    code = section_code("Integrations: OpenAI", "OpenAIEmbedder")
    async with FakeOpenAIServer() as server:
        status, out, err = await run(
            code, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-readme-test"
        )
    assert status == 0, err
    assert out.splitlines() == ["1 1 2 2"]
    assert len(server.bodies) == 1  # one chat request
    assert server.embedding_requests == 2


async def test_the_langchain_example_runs_as_written() -> None:
    status, out, err = await run(section_code("Integrations: LangChain", "LangChainCache"))
    assert status == 0, err
    assert out.splitlines() == ["Paris", "Paris", "Paris"]
