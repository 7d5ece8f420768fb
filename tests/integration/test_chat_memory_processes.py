"""No lost chat messages: concurrent processes, a crashed server, a frozen server.

* Several OS processes (``chat_memory_worker.py``) append to one conversation at
  once. The history keeps exactly the newest ``2 * max_turns`` messages: none
  duplicated, each writer's messages in its own order, and for every writer a
  contiguous run ending with its last message (anything it appended after a kept
  message is newer, so kept too). With room for everything, everything is there.
* A private ``redis-server`` with ``appendfsync always`` (it replies only once a
  write is on disk) is killed with SIGKILL while appends are in flight, then
  restarted on the same files. Every append that returned is in the history after
  the restart, exactly once and in order; every append made while the server was
  down raised; an append that raised (its outcome unknown) is there at most once.
* The server is frozen with SIGSTOP for longer than the client's socket timeout:
  appends raise instead of hanging; after it resumes, every acknowledged append is
  there exactly once, and none that raised is there twice (the library never
  retries a non-idempotent append).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocache_llm import (
    BackendError,
    BackendUnavailableError,
    ChatMemoryConfig,
    RedisChatMemory,
)
from tests.conftest import RedisTarget
from tests.support.redis_server import RedisServer
from tests.support.workers import run_together, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

WORKER = Path(__file__).with_name("chat_memory_worker.py")
CONV = "shared conversation ✓"

PROCESSES = 4
STREAMS = 2  # sequential writers (coroutines) per process
APPENDS = 50  # per stream


# -- several processes, one conversation -----------------------------------------------


async def run_workers(target: RedisTarget, max_turns: int) -> list[dict[str, Any]]:
    workers = [
        await start_worker(
            WORKER, target.url, target.prefix, CONV, f"p{writer}", max_turns, STREAMS, APPENDS
        )
        for writer in range(PROCESSES)
    ]
    return await run_together(workers, ready_timeout=20, run_timeout=60)


def parse(history: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Map each stream to the message numbers it has in the history, in history order."""
    streams: dict[str, list[int]] = {}
    for message in history:
        name, number = message["content"].rsplit(":", 1)
        streams.setdefault(name, []).append(int(number))
        assert message["role"] == ("user" if int(number) % 2 == 0 else "assistant")
    return streams


async def history_of(target: RedisTarget, max_turns: int) -> list[dict[str, Any]]:
    config = ChatMemoryConfig(max_turns=max_turns)
    async with RedisChatMemory(
        client=target.client, key_prefix=target.prefix, config=config
    ) as memory:
        return await memory.get_history(CONV)


@pytest.mark.redis
async def test_concurrent_processes_keep_exactly_the_newest_messages(
    real_redis: RedisTarget,
) -> None:
    max_turns = 10
    reports = await run_workers(real_redis, max_turns)
    written = sum(r["acknowledged"] for r in reports)
    assert [r["errors"] for r in reports] == [[]] * PROCESSES
    assert written == PROCESSES * STREAMS * APPENDS
    assert all(r["stats_appended"] == r["acknowledged"] for r in reports)

    history = await history_of(real_redis, max_turns)
    contents = [m["content"] for m in history]
    print(f"\n{PROCESSES} processes x {STREAMS} streams: {written} appended, {len(history)} kept")
    assert len(history) == 2 * max_turns
    assert len(set(contents)) == len(contents), "a message is duplicated"
    for name, numbers in parse(history).items():
        # the newest of this stream: a contiguous run that ends with its last message
        assert numbers == list(range(numbers[0], APPENDS)), name


@pytest.mark.redis
async def test_concurrent_processes_lose_and_duplicate_nothing(real_redis: RedisTarget) -> None:
    max_turns = PROCESSES * STREAMS * APPENDS  # room for everything
    reports = await run_workers(real_redis, max_turns)
    assert [r["errors"] for r in reports] == [[]] * PROCESSES

    history = await history_of(real_redis, max_turns)
    assert len(history) == PROCESSES * STREAMS * APPENDS
    streams = parse(history)
    expected = {f"p{p}.{s}" for p in range(PROCESSES) for s in range(STREAMS)}
    assert set(streams) == expected
    for name, numbers in streams.items():
        assert numbers == list(range(APPENDS)), f"{name}: lost, duplicated or reordered"
    # the writers really interleaved: this is not a sequence of solo runs
    owners = [m["content"].split(".", 1)[0] for m in history]
    switches = sum(a != b for a, b in itertools.pairwise(owners))
    assert switches > PROCESSES


# -- a server that crashes or freezes mid-stream ---------------------------------------


@dataclass
class Outcome:
    """What one append call did, as seen by its caller."""

    content: str
    started: float
    ok: bool
    error: BaseException | None = None


@dataclass
class Writers:
    """Coroutines appending numbered messages until told to stop; every outcome kept."""

    memory: RedisChatMemory
    count: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _write(self, writer: int) -> None:
        number = 0
        while not self.stop.is_set():
            content = f"w{writer}:{number}"
            number += 1
            started = time.monotonic()
            try:
                await self.memory.append(CONV, "user", content)
            except BackendError as exc:
                self.outcomes.append(Outcome(content, started, False, exc))
                await asyncio.sleep(0.005)  # a dead server refuses at once: do not spin
            else:
                self.outcomes.append(Outcome(content, started, True))

    async def run_until_stopped(self) -> None:
        await asyncio.gather(*(self._write(w) for w in range(self.count)))

    def acknowledged(self) -> list[str]:
        return [o.content for o in self.outcomes if o.ok]

    def raised(self) -> list[str]:
        return [o.content for o in self.outcomes if not o.ok]


async def wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def check_history(history: list[dict[str, Any]], writers: Writers) -> Counter[str]:
    """Acknowledged appends: all there, once, in order. Raised ones: at most once."""
    present = Counter(m["content"] for m in history)
    assert max(present.values(), default=1) == 1, "a message is stored twice"
    acknowledged = writers.acknowledged()
    missing = [c for c in acknowledged if c not in present]
    assert missing == [], f"acknowledged appends lost: {missing[:5]}"
    unknown = set(writers.raised())
    assert set(present) <= set(acknowledged) | unknown, "a message nobody appended"
    positions = {m["content"]: i for i, m in enumerate(history)}
    for writer in range(writers.count):
        mine = [c for c in acknowledged if c.startswith(f"w{writer}:")]
        assert [positions[c] for c in mine] == sorted(positions[c] for c in mine)
    return present


async def test_every_acknowledged_append_survives_a_server_crash() -> None:
    # appendfsync always: a write is replied to only once it is on disk, so an
    # acknowledged append must survive SIGKILL and come back with the files
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    memory = RedisChatMemory(url=server.url, config=ChatMemoryConfig(max_turns=100_000))
    writers = Writers(memory)
    try:
        running = asyncio.ensure_future(writers.run_until_stopped())
        await wait_for(lambda: len(writers.acknowledged()) >= 200, 30)
        server.kill()  # mid-stream: appends are in flight
        killed_at = time.monotonic()
        before_kill = len(writers.acknowledged())
        await asyncio.sleep(0.3)
        down_until = time.monotonic()
        server.start()
        restarted_at = time.monotonic()
        await wait_for(lambda: any(o.ok and o.started > restarted_at for o in writers.outcomes), 30)
        await asyncio.sleep(0.2)
        writers.stop.set()
        await asyncio.wait_for(running, 30)

        history = await memory.get_history(CONV)
    finally:
        await memory.aclose()
        server.stop()

    during = [o for o in writers.outcomes if killed_at < o.started < down_until]
    assert during, "appends were attempted while the server was down"
    assert all(not o.ok for o in during), "an append to a dead server claimed success"
    assert all(isinstance(o.error, BackendUnavailableError) for o in during)
    present = check_history(history, writers)
    unknown_but_stored = [c for c in writers.raised() if c in present]
    print(
        f"\ncrash: {before_kill} acknowledged before SIGKILL, {len(writers.raised())} raised, "
        f"{len(writers.acknowledged())} acknowledged in all, {len(history)} in the history "
        f"after restart ({len(unknown_but_stored)} of them raised: outcome unknown)"
    )
    assert len(unknown_but_stored) <= writers.count  # only the appends in flight at the kill


async def test_appends_to_a_frozen_server_raise_and_are_never_doubled() -> None:
    server = RedisServer().start()
    timeout = 0.25
    client = Redis.from_url(
        server.url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    memory = RedisChatMemory(client=client, config=ChatMemoryConfig(max_turns=100_000))
    writers = Writers(memory)
    try:
        running = asyncio.ensure_future(writers.run_until_stopped())
        await wait_for(lambda: len(writers.acknowledged()) >= 100, 30)
        server.freeze()
        frozen_at = time.monotonic()
        await asyncio.sleep(1.5)  # six socket timeouts
        server.thaw()
        thawed_at = time.monotonic()
        await wait_for(lambda: any(o.ok and o.started > thawed_at for o in writers.outcomes), 30)
        await asyncio.sleep(0.2)
        writers.stop.set()
        await asyncio.wait_for(running, 30)
        history = await memory.get_history(CONV)
    finally:
        await memory.aclose()
        await client.aclose()
        server.stop()

    frozen = [o for o in writers.outcomes if frozen_at + 0.05 < o.started < thawed_at - 0.5]
    assert frozen, "appends were attempted while the server was frozen"
    assert all(not o.ok for o in frozen), "an append to a frozen server claimed success"
    assert all(isinstance(o.error, BackendUnavailableError) for o in frozen)
    raised = writers.raised()
    present = check_history(history, writers)
    print(
        f"\nfreeze: {len(writers.acknowledged())} acknowledged, {len(raised)} raised "
        f"(of which {sum(c in present for c in raised)} were applied once the server "
        f"resumed, none twice), {len(history)} in the history"
    )


async def test_clients_built_from_a_url_never_resend_an_append() -> None:
    """A resent append whose first reply was lost would be stored twice."""
    server = RedisServer().start()
    try:
        async with RedisChatMemory(url=server.url) as memory:
            await memory.append(CONV, "user", "connect")
            connection = await memory.client.connection_pool.get_connection()
            try:
                assert connection.retry.get_retries() == 0
            finally:
                await memory.client.connection_pool.release(connection)
    finally:
        server.stop()


@pytest.mark.xfail(
    strict=True,
    reason="a client= built as redis.asyncio.Redis(host=..., socket_timeout=...) retries "
    "TimeoutError by default: an append whose reply is late is sent again and stored "
    "twice, although the call returned normally. RedisChatMemory cannot see or veto "
    "the retry policy of a client it is given",
)
async def test_a_late_reply_never_doubles_an_append_with_a_retrying_client() -> None:
    server = RedisServer().start()
    client = Redis(host="127.0.0.1", port=server.port, socket_timeout=0.25)
    memory = RedisChatMemory(client=client)
    try:
        await memory.append(CONV, "user", "connect")
        server.freeze()
        pending = asyncio.ensure_future(memory.append(CONV, "user", "once"))
        await asyncio.sleep(1.0)  # the first send times out; redis-py sends it again
        server.thaw()
        await asyncio.wait_for(pending, 10)  # returns normally
        contents = [m["content"] for m in await memory.get_history(CONV)]
        assert contents.count("once") == 1
    finally:
        server.thaw()
        await memory.aclose()
        await client.aclose()
        server.stop()
