"""Measuring and reporting: repeated, interleaved timings; tables with ratios; targets.

Every measurement is repeated ``repeats`` times and the implementations of a
scenario take turns (round-robin), so a slow moment of the machine hits them all
alike; each repetition starts after a full garbage collection (the collector stays
on while it runs). A result is the median over repeats with its min-max spread.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Measurement",
    "Section",
    "Target",
    "interleaved",
    "per_op_seconds",
    "throughput",
]

AsyncOp = Callable[[], Awaitable[object]]


@dataclass
class Measurement:
    """One implementation's repeated result, in ``unit`` (lower is better unless ``higher``)."""

    name: str
    samples: list[float]
    unit: str
    higher_is_better: bool = False
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        return f"{min(self.samples):.3g}-{max(self.samples):.3g}"


@dataclass
class Target:
    """A goal from the issue, checked against measured figures of the same run."""

    description: str
    measured: float
    bound: float
    at_most: bool = True
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.measured <= self.bound if self.at_most else self.measured >= self.bound

    def render(self) -> str:
        sign = "<=" if self.at_most else ">="
        mark = "met" if self.met else "NOT met"
        return (
            f"| {self.description} | {self.measured:.3g}{self.unit} | "
            f"{sign} {self.bound:g}{self.unit} | {mark} |"
        )


@dataclass
class Section:
    """One scenario's table, notes and targets."""

    title: str
    description: str
    tables: list[tuple[str, list[Measurement], str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_table(self, caption: str, rows: list[Measurement], baseline: str) -> None:
        """Add a table whose ratio column compares each row with the row named ``baseline``."""
        self.tables.append((caption, rows, baseline))

    def render(self) -> str:
        lines = [f"## {self.title}", "", self.description, ""]
        for caption, rows, baseline in self.tables:
            base = next((r for r in rows if r.name == baseline), rows[0])
            lines += [
                f"**{caption}**",
                "",
                f"| implementation | median | spread (min-max) | vs {base.name} |",
                "|---|---:|---:|---:|",
            ]
            for row in rows:
                ratio = row.median / base.median if base.median else float("nan")
                note = f" ({row.note})" if row.note else ""
                lines.append(
                    f"| {row.name}{note} | {row.median:.3g} {row.unit} | {row.spread} | "
                    f"{ratio:.2f}x |"
                )
            lines.append("")
        if self.targets:
            lines += ["| target | measured | goal | |", "|---|---:|---:|---|"]
            lines += [t.render() for t in self.targets]
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        if self.notes:
            lines.append("")
        return "\n".join(lines)


async def per_op_seconds(op: AsyncOp, ops: int) -> float:
    """Mean seconds per call of ``op`` over ``ops`` sequential calls."""
    started = time.perf_counter()
    for _ in range(ops):
        await op()
    return (time.perf_counter() - started) / ops


async def throughput(op: AsyncOp, ops: int, concurrency: int) -> float:
    """Calls per second of ``op`` run by ``concurrency`` coroutines, ``ops`` calls in all."""
    import asyncio

    each = max(1, ops // concurrency)

    async def worker() -> None:
        for _ in range(each):
            await op()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return each * concurrency / (time.perf_counter() - started)


async def interleaved(
    candidates: Sequence[tuple[str, Callable[[], Awaitable[float]]]],
    repeats: int,
    *,
    unit: str,
    scale: float = 1.0,
    higher_is_better: bool = False,
) -> list[Measurement]:
    """Run each candidate's measurement ``repeats`` times, taking turns; one warm-up each."""
    for _, measure in candidates:
        await measure()
    samples: dict[str, list[float]] = {name: [] for name, _ in candidates}
    for _ in range(repeats):
        for name, measure in candidates:
            # every repetition starts from a clean heap: a full collection of what
            # earlier ones left must not land inside somebody else's measurement
            gc.collect()
            samples[name].append(await measure() * scale)
    return [
        Measurement(name, samples[name], unit, higher_is_better=higher_is_better)
        for name, _ in candidates
    ]


def by_name(rows: Sequence[Measurement], name: str) -> Measurement:
    return next(r for r in rows if r.name == name)
