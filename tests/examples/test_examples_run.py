"""The examples run as written and print what they claim."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(60)


def example_env(**extra: str) -> dict[str, str]:
    # run against this checkout, whatever version of the package is installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **extra}
    for name in ("REDIS_URL", "KEY_PREFIX", "RATE_LIMIT_TOKENS_PER_MINUTE"):
        if name not in extra:
            env.pop(name, None)
    return env


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=ROOT,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


STEP = re.compile(
    r"^(?P<label>\S.*?)\s{2,}(?P<outcome>ran \d+x|cached)\s+\w+ runs so far: (?P<runs>\d+)$"
)


def test_decorator_example() -> None:
    result = run_example("decorator.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    steps = {
        match["label"]: (match["outcome"], int(match["runs"]))
        for match in map(STEP.match, lines)
        if match
    }
    assert steps == {
        "summarize(text)": ("ran 1x", 1),
        "summarize(text) again": ("cached", 1),
        "summarize(text=text, max_words=5)": ("cached", 1),
        "10 x summarize(other), concurrently": ("ran 1x", 2),
        "summarize(text) after invalidate": ("ran 1x", 3),
        "Translator('fr').translate('hello')": ("ran 1x", 1),
        "another Translator('fr') instance": ("cached", 1),
        "Translator('de').translate('hello')": ("ran 1x", 2),
    }
    assert "summarize.invalidate(text) -> True" in lines
    assert "german answer: {'language': 'de', 'text': '<de> hello'}" in lines
    # 14 calls: 2 answered by the cache, 9 joined a call in flight, 3 computed
    assert "summarize gateway: requests=14 exact_hits=2 coalesced=9 provider_calls=3" in lines


def test_quickstart_example() -> None:
    if not (EXAMPLES / "quickstart.py").exists():
        pytest.skip("examples/quickstart.py is not written yet")
    result = run_example("quickstart.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "quickstart printed nothing"
    assert "Traceback" not in result.stderr


LISTENING = re.compile(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([str(EXAMPLES / "fastapi_app.py")], id="python-script"),
        pytest.param(
            ["-m", "uvicorn", "examples.fastapi_app:app", "--port", "0"], id="uvicorn-cli"
        ),
    ],
)
async def test_fastapi_example_starts_and_answers(command: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        cwd=ROOT,
        env=example_env(PORT="0", FAKE_LLM_LATENCY="0.01"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        port = await asyncio.wait_for(listening_port(process.stderr), timeout=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answer = await client.post(
                "/v1/chat", json={"model": "m", "messages": [{"role": "user", "content": "ping"}]}
            )
            stats = await client.get("/stats")
        assert answer.status_code == 200
        assert answer.json()["content"] == "You asked: ping"
        assert stats.json()["provider_calls"] == 1
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def listening_port(stderr: asyncio.StreamReader) -> int:
    seen = []
    while line := await stderr.readline():
        seen.append(line)
        match = LISTENING.search(line)
        if match:
            return int(match[1])
    raise AssertionError(b"".join(seen).decode(errors="replace"))
