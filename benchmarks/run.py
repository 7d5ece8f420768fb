"""``python -m benchmarks [--quick]``: every scenario, peers in the same run, RESULTS.md + chart.

``python -m benchmarks semantic`` is a separate target: answer quality of the semantic
cache on labelled pairs, per embedder (``benchmarks/semantic/``, SEMANTIC_RESULTS.md).

Starts a private ``redis-server`` on a free loopback port (unless ``--redis-url`` is
given), runs the scenarios one after the other in this process (scenario 6 uses
child processes to measure memory from a clean heap, scenario 7 one to follow a
stream from another process), and writes the report and the headline chart.
``--quick`` runs fewer operations and repeats (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.harness import Section
from benchmarks.scenarios.common import Context

SCENARIOS = [
    "exact_memory",
    "exact_redis",
    "rate_limiter",
    "semantic",
    "stampede",
    "memory_rss",
    "streaming",
    "cluster",
]
HERE = Path(__file__).resolve().parent
PEERS = ["aiocache_llm", "aiocache", "cashews", "limits", "redis", "hiredis", "numpy", "orjson"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer operations and repeats")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--chart", type=Path, default=HERE / "headline.png")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server (no persistence) for the run; stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it or pass --redis-url")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="aiocache-llm-bench-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def machine() -> list[str]:
    versions = []
    for name in PEERS:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {server.split(' sha=')[0].strip()}",
        f"- Packages: {', '.join(versions)}",
    ]


def chart(sections: list[Section], path: Path) -> None:
    """Bar chart of the headline ratios: each target's measured value against its goal."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for s in sections for t in s.targets if t.unit == "x"]
    if not targets:
        return
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(targets) + 1.2))
    labels = [t.description for t in targets]
    values = [t.measured for t in targets]
    colors = ["#2a9d8f" if t.met else "#e76f51" for t in targets]
    ax.barh(labels, values, color=colors)
    for index, target in enumerate(targets):
        ax.plot([target.bound, target.bound], [index - 0.4, index + 0.4], color="black", lw=2)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ticks = [0.25, 0.5, 1, 1.5, 2, 3, 5, 10]
    low, high = ax.get_xlim()
    ax.set_xticks([t for t in ticks if low <= t <= high])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("measured ratio (black tick: the target; green met, red not met)")
    ax.set_title("aiocache_llm against the baseline of each target, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run_all(ctx: Context, names: list[str]) -> list[Section]:
    sections = []
    for name in names:
        module = importlib.import_module(f"benchmarks.scenarios.{name}")
        gc.collect()  # no scenario pays for collecting the garbage of the one before
        started = time.perf_counter()
        print(f"[{name}] running...", flush=True)
        section: Section = await module.run(ctx)
        print(f"[{name}] done in {time.perf_counter() - started:.1f} s", flush=True)
        for target in section.targets:
            print(
                f"    {'met    ' if target.met else 'NOT MET'} {target.description}: "
                f"{target.measured:.3g}{target.unit} (goal {target.bound:g})",
                flush=True,
            )
        sections.append(section)
    return sections


def report(sections: list[Section], quick: bool, seconds: float) -> str:
    met = sum(t.met for s in sections for t in s.targets)
    total = sum(len(s.targets) for s in sections)
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python -m benchmarks{' --quick' if quick else ''}` in {seconds:.0f} s; "
        f"every table was measured in this one run, peers in the same process. Figures are "
        f"medians over repeats (the spread column shows min-max). Targets met: {met}/{total}.",
        "",
        *machine(),
        "",
        "![headline ratios](headline.png)",
        "",
        "Semantic-cache answer quality (hit rate at <=1% and <=5% wrong answers, per "
        "embedder, plain cosine vs `SemanticGuard`) is measured by `python -m benchmarks "
        "semantic`: see [SEMANTIC_RESULTS.md](SEMANTIC_RESULTS.md).",
        "",
    ]
    lines += [section.render() for section in sections]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["semantic"]:
        # a target of its own, not part of the full run: it loads embedding models and
        # measures answer quality, not speed (``python -m benchmarks semantic --help``)
        from benchmarks.semantic.evaluate import main as semantic_main

        semantic_main(argv[1:])
        return
    args = parse_args(argv)
    names = args.only or SCENARIOS
    started = time.perf_counter()
    server = nullcontext(args.redis_url) if args.redis_url else private_redis()
    with server as url:
        parsed = urlparse(url)
        ctx = Context(args.quick, url, parsed.hostname or "127.0.0.1", parsed.port or 6379)
        sections = asyncio.run(run_all(ctx, names))
    args.output.write_text(report(sections, args.quick, time.perf_counter() - started))
    chart(sections, args.chart)
    print(f"wrote {args.output} and {args.chart}")
    if not all(t.met for s in sections for t in s.targets):
        print("some targets were not met: see the report")


if __name__ == "__main__":
    main()
