"""The gateway and fleet tests that take a ``target``, rerun on a Redis Cluster and on Sentinel.

The test functions are those of ``tests/gateway`` (imported, so collected here too);
only this module's ``target`` fixture differs. The semantic-cache test runs with a
hash-tagged prefix: a ``RedisSemanticCache`` lives in one slot on a cluster.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator

import pytest

from tests.conftest import CLUSTER_BACKENDS, RedisTarget, open_redis_target
from tests.gateway import test_fleet_outcomes, test_gateway_redis, test_streaming_fleet

_LEFT_OUT = {
    # rerun below with a hash-tagged prefix
    "test_a_redis_semantic_hit_replays_a_stream_in_another_process",
}

for _module in (test_gateway_redis, test_streaming_fleet, test_fleet_outcomes):
    for _name, _test in vars(_module).items():
        if (
            _name.startswith("test_")
            and _name not in _LEFT_OUT
            and inspect.iscoroutinefunction(_test)
            and "target" in inspect.signature(_test).parameters
        ):
            globals()[_name] = _test


@pytest.fixture(params=CLUSTER_BACKENDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[RedisTarget]:
    async with open_redis_target(request.param, request) as opened:
        yield opened


async def test_a_redis_semantic_hit_replays_a_stream_in_another_process(
    target: RedisTarget,
) -> None:
    # "{prefix}": the exact cache and the semantic cache ("{prefix}:sem") share a slot,
    # so semantic hits are promoted too (the fixture deletes "{prefix}*" afterwards)
    tagged = dataclasses.replace(target, prefix="{" + target.prefix + "}")
    await test_streaming_fleet.test_a_redis_semantic_hit_replays_a_stream_in_another_process(tagged)
