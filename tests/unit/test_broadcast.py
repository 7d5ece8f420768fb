"""StreamBroadcast: one chunk log, many readers, a bounded size, abandonment."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from aiocache_llm import StreamInterruptedError
from aiocache_llm.coalescing.broadcast import StreamBroadcast
from aiocache_llm.core.codec import ValueCodec


def broadcast(max_bytes: int = 1 << 20, **kwargs: Any) -> StreamBroadcast:
    return StreamBroadcast(ValueCodec(), max_bytes=max_bytes, **kwargs)


async def drain(subscription: Any) -> list[Any]:
    return [chunk async for chunk in subscription]


async def test_every_reader_gets_every_chunk_in_order_whenever_it_joins() -> None:
    log = broadcast()
    early = log.subscribe()
    log.publish("a")
    log.publish("b")
    late = log.subscribe()
    reading = asyncio.ensure_future(drain(early))
    await asyncio.sleep(0)
    log.publish("c")
    log.finish()
    assert await reading == ["a", "b", "c"]
    assert await drain(late) == ["a", "b", "c"]
    assert await drain(log.subscribe()) == ["a", "b", "c"]
    assert log.recording == ["a", "b", "c"]


async def test_readers_of_mutable_chunks_get_copies_and_the_recording_stays_intact() -> None:
    log = broadcast()
    one, two = log.subscribe(), log.subscribe()
    chunk = {"n": [1]}
    log.publish(chunk)
    log.finish()
    first = await one.__anext__()
    first["n"].append(2)
    assert await two.__anext__() == {"n": [1]}
    assert log.recording == [{"n": [1]}]
    assert first is not chunk


async def test_an_error_comes_after_the_chunks_and_closes_to_joiners() -> None:
    log = broadcast()
    reader = log.subscribe()
    log.publish("a")
    log.fail(ValueError("nope"))
    assert await reader.__anext__() == "a"
    with pytest.raises(ValueError, match="nope"):
        await reader.__anext__()
    assert not log.joinable
    assert log.recording is None


async def test_cancelling_one_waiting_reader_leaves_the_others_waiting() -> None:
    log = broadcast()
    readers = [asyncio.ensure_future(drain(log.subscribe())) for _ in range(3)]
    await asyncio.sleep(0)
    readers[0].cancel()
    await asyncio.sleep(0)
    log.publish("x")
    log.finish()
    assert await asyncio.gather(*readers[1:]) == [["x"], ["x"]]
    assert readers[0].cancelled()


async def test_past_the_bound_it_stops_recording_trims_and_cuts_off_laggards() -> None:
    log = broadcast(max_bytes=100)
    slow, fast = log.subscribe(), log.subscribe()
    for index in range(10):
        log.publish(f"{index:020d}")  # 29 bytes encoded each
        assert await fast.__anext__() == f"{index:020d}"
    assert log.recording is None
    assert not log.joinable
    with pytest.raises(StreamInterruptedError):
        log.subscribe()
    with pytest.raises(StreamInterruptedError, match="fell more than 100 bytes behind"):
        await slow.__anext__()
    assert log._retained <= 100


async def test_the_last_reader_to_leave_abandons_it_once() -> None:
    calls: list[str] = []
    log = broadcast(on_abandoned=lambda: calls.append("gone"))
    one, two = log.subscribe(), log.subscribe()
    one.close()
    assert calls == []
    del two
    gc.collect()
    await asyncio.sleep(0)  # a dropped reader is noticed on the loop's next turn
    assert calls == ["gone"]
    log.subscribe().close()
    assert calls == ["gone"]


async def test_no_abandonment_once_the_outcome_is_known() -> None:
    calls: list[str] = []
    log = broadcast(on_abandoned=lambda: calls.append("gone"))
    reader = log.subscribe()
    log.finish()
    reader.close()
    assert calls == []


async def test_uncacheable_chunks_are_passed_on_and_stop_the_recording() -> None:
    log = broadcast()
    marker = object()
    reader = log.subscribe()
    log.publish("a")
    log.publish(marker)
    log.finish()
    assert await drain(reader) == ["a", marker]
    assert log.recording is None
