"""Redis AUTH (password, ACL user) and TLS (server-verified and mutual), end to end.

Each server is a private ``redis-server`` started here on its own loopback port. Every
case builds the whole stack from ``url=`` the way an application would: an
:class:`InferenceGateway` over a :class:`RedisExactCache` and a
:class:`RedisRateLimiter`, plus a :class:`RedisChatMemory`. A working setup must
resolve, cache, charge and remember; a wrong password, a CA that did not sign the
server, a missing client certificate or a key outside an ACL user's pattern must fail
with a :class:`BackendError` that says why, at once (never a hang), while the gateway
keeps answering from the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from aiocache_llm import (
    BackendError,
    BackendUnavailableError,
    InferenceGateway,
    RateLimitConfig,
    RedisChatMemory,
    RedisExactCache,
    RedisRateLimiter,
)
from tests.gateway.fakes import CountingProvider
from tests.security.tls_certs import Pki, make_pki
from tests.support.redis_server import RedisServer, free_port, running_redis

pytestmark = pytest.mark.timeout(60)

QUERY = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}
ANSWER = "answer:capital of France?"
PASSWORD = "s3cret pass/word"  # a space and a slash: must survive URL quoting
BUDGET = 10_000
# far below the 5 s socket timeout of url= clients: a refusal must not wait for it
PROMPT_FAILURE_SECONDS = 3.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve(extra_args: list[str], port: int | None = None) -> Iterator[RedisServer]:
    server = RedisServer(port=port, extra_args=extra_args).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    yield from _serve(["--requirepass", PASSWORD])


ACL_USER = ["--user", "alice", "on", ">alice-secret", "~tenant-a:*", "+@all"]


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    # the default user is off: only alice may connect. Fleet coalescing subscribes to
    # the channel {key_prefix}:lease-done, which this exact channel rule grants
    yield from _serve(["--user", "default", "off", *ACL_USER, "&tenant-a:exact:lease-done"])


def _tls_args(pki: Pki, port: int, *, mutual: bool) -> list[str]:
    return [
        "--port", "0",  # TLS only: no plain-text listener at all
        "--tls-port", str(port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca_cert),
        "--tls-auth-clients", "yes" if mutual else "no",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[RedisServer]:
    port = free_port()
    yield from _serve(_tls_args(pki, port, mutual=False), port)


@pytest.fixture(scope="module")
def mutual_tls_server(pki: Pki) -> Iterator[RedisServer]:
    port = free_port()
    # verbose: the server logs why it refused each TLS client (see server_refusals)
    log = ["--loglevel", "verbose", "--logfile", str(pki.ca_cert.parent / "mutual-tls.log")]
    yield from _serve([*_tls_args(pki, port, mutual=True), *log], port)


def server_refusals(pki: Pki) -> list[str]:
    """The mutual TLS server's log lines about client connections it refused."""
    text = (pki.ca_cert.parent / "mutual-tls.log").read_text(errors="replace")
    return [line for line in text.splitlines() if "Error accepting a client connection" in line]


def _tls_url(server: RedisServer, ca: Path, *, client: tuple[Path, Path] | None = None) -> str:
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca}"
    if client is not None:
        url += f"&ssl_certfile={client[0]}&ssl_keyfile={client[1]}"
    return url


async def assert_stack_works(url: str, prefix: str) -> None:
    """Gateway + exact cache + limiter + chat memory built from ``url`` all do their job."""
    provider = CountingProvider()
    cache = RedisExactCache(url=url, key_prefix=f"{prefix}:exact")
    limiter = RedisRateLimiter(
        url=url, key_prefix=f"{prefix}:limit", config=RateLimitConfig(BUDGET, 60)
    )
    # a generous backend timeout: this is about credentials, not speed under load
    gateway = InferenceGateway(provider, exact_cache=cache, rate_limiter=limiter, backend_timeout=5)
    async with cache, limiter, gateway:
        assert await gateway.resolve(QUERY, user_id="u1") == ANSWER
        charged = BUDGET - await limiter.get_remaining("u1")
        assert charged > 0, "the provider call was charged to the user's budget"
        assert await gateway.resolve(QUERY, user_id="u1") == ANSWER
        stats = gateway.stats()
        assert (provider.calls, stats.exact_hits, stats.backend_errors) == (1, 1, 0)
        assert BUDGET - await limiter.get_remaining("u1") == charged, "a hit costs nothing"
    # a new connection (another process, in effect) finds what was stored
    async with RedisExactCache(url=url, key_prefix=f"{prefix}:exact") as reader:
        assert await reader.get(QUERY) == ANSWER
        await reader.clear()
    async with RedisChatMemory(url=url, key_prefix=f"{prefix}:chat") as memory:
        await memory.append("conv", "user", "hello")
        await memory.append("conv", "assistant", "hi there")
        assert await memory.get_history("conv") == [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
        ]
        await memory.clear("conv")


async def assert_stack_refused(url: str, prefix: str, reason: str, *, unavailable: bool) -> None:
    """Every backend built from ``url`` fails at once with a BackendError naming ``reason``.

    ``unavailable`` says whether the failure is a :class:`BackendUnavailableError`
    (the server could not be talked to) or a plain :class:`BackendError` (it answered
    no: wrong credentials or permissions, which no retry will cure).
    """
    cache = RedisExactCache(url=url, key_prefix=f"{prefix}:exact")
    # "raise": this test wants to see the error; a gateway normally runs it fail-open
    limiter = RedisRateLimiter(
        url=url, key_prefix=f"{prefix}:limit", config=RateLimitConfig(BUDGET), failure_mode="raise"
    )
    memory = RedisChatMemory(url=url, key_prefix=f"{prefix}:chat")
    async with cache, limiter, memory:
        calls = [
            lambda: cache.get(QUERY),
            lambda: cache.put(QUERY, "value"),
            lambda: limiter.check_and_consume("u1", 1),
            lambda: memory.append("conv", "user", "lost?"),
            lambda: memory.get_history("conv"),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BackendError, match=reason) as caught:
                await call()
            assert time.monotonic() - started < PROMPT_FAILURE_SECONDS
            assert isinstance(caught.value, BackendUnavailableError) is unavailable
            assert caught.value.__cause__ is not None  # the driver's error, for the logs
        assert (await memory.stats()).appended == 0, "a refused append is not counted"

        provider = CountingProvider()
        gateway = InferenceGateway(provider, exact_cache=cache, rate_limiter=limiter)
        async with gateway:
            started = time.monotonic()
            answers = [await gateway.resolve(QUERY, user_id="u1") for _ in range(2)]
            assert time.monotonic() - started < 2 * PROMPT_FAILURE_SECONDS
        assert answers == [ANSWER, ANSWER], "a refusing backend never fails a resolve"
        assert provider.calls == 2, "nothing could be cached"
        assert gateway.stats().backend_errors >= 2


# -- password (requirepass) ----------------------------------------------------------


async def test_password_in_the_url_works_end_to_end(password_server: RedisServer) -> None:
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{password_server.port}/0"
    await assert_stack_works(url, "app")


@pytest.mark.parametrize(
    ("credentials", "reason"),
    [(":wrong@", "invalid username-password pair"), ("", "authenticated")],
    ids=["wrong-password", "no-password"],
)
async def test_a_wrong_or_missing_password_is_refused_clearly(
    password_server: RedisServer, credentials: str, reason: str
) -> None:
    url = f"redis://{credentials}127.0.0.1:{password_server.port}/0"
    await assert_stack_refused(url, "app", reason, unavailable=False)


# -- ACL user restricted to a key pattern ----------------------------------------------


async def test_an_acl_user_works_under_its_own_key_pattern(acl_server: RedisServer) -> None:
    await assert_stack_works(
        f"redis://alice:alice-secret@127.0.0.1:{acl_server.port}/0", "tenant-a"
    )


async def test_an_acl_user_is_refused_outside_its_key_pattern(acl_server: RedisServer) -> None:
    url = f"redis://alice:alice-secret@127.0.0.1:{acl_server.port}/0"
    await assert_stack_refused(url, "tenant-b", "no permissions", unavailable=False)


@pytest.mark.parametrize(
    "credentials", ["alice:wrong@", "", "bob:alice-secret@"], ids=["wrong", "default", "unknown"]
)
async def test_acl_credentials_that_do_not_match_are_refused(
    acl_server: RedisServer, credentials: str
) -> None:
    url = f"redis://{credentials}127.0.0.1:{acl_server.port}/0"
    await assert_stack_refused(url, "tenant-a", "AuthenticationError", unavailable=False)


async def test_fleet_coalescing_works_for_an_acl_user_granted_its_channel(
    acl_server: RedisServer,
) -> None:
    """Two gateways (processes, in effect) share one provider call through the lease."""
    url = f"redis://alice:alice-secret@127.0.0.1:{acl_server.port}/0"
    await _assert_one_fleet_call(url)


async def test_fleet_coalescing_works_with_a_prefix_wide_channel_rule() -> None:
    with running_redis(["--user", "default", "off", *ACL_USER, "&tenant-a:*"]) as server:
        await _assert_one_fleet_call(f"redis://alice:alice-secret@127.0.0.1:{server.port}/0")


async def _assert_one_fleet_call(url: str) -> None:
    provider = CountingProvider(latency=0.3)
    caches = [RedisExactCache(url=url, key_prefix="tenant-a:exact") for _ in range(2)]
    gateways = [InferenceGateway(provider, exact_cache=c, backend_timeout=5) for c in caches]
    try:
        answers = await asyncio.gather(*(g.resolve(QUERY) for g in gateways))
        assert answers == [ANSWER, ANSWER]
        assert provider.calls == 1
        assert sum(g.stats().backend_errors for g in gateways) == 0
    finally:
        for gateway in gateways:
            await gateway.aclose()
        await caches[0].clear()
        for cache in caches:
            await cache.aclose()


# -- TLS -------------------------------------------------------------------------------


async def test_tls_with_the_test_ca_works_end_to_end(tls_server: RedisServer, pki: Pki) -> None:
    await assert_stack_works(_tls_url(tls_server, pki.ca_cert), "app")


async def test_tls_verifies_the_server_against_the_given_ca(
    tls_server: RedisServer, pki: Pki
) -> None:
    url = _tls_url(tls_server, pki.foreign_ca_cert)
    await assert_stack_refused(url, "app", "certificate verify failed", unavailable=True)


async def test_tls_never_falls_back_to_the_system_trust_store_or_plain_text(
    tls_server: RedisServer,
) -> None:
    # no CA given: the system store does not know the test CA
    url = f"rediss://127.0.0.1:{tls_server.port}/0"
    await assert_stack_refused(url, "app", "certificate verify failed", unavailable=True)
    # plain text to the TLS port: refused by the server, not a hang
    plain = f"redis://127.0.0.1:{tls_server.port}/0"
    await assert_stack_refused(plain, "app", "ConnectionError", unavailable=True)


async def test_mutual_tls_with_a_client_certificate_works_end_to_end(
    mutual_tls_server: RedisServer, pki: Pki
) -> None:
    url = _tls_url(mutual_tls_server, pki.ca_cert, client=(pki.client_cert, pki.client_key))
    await assert_stack_works(url, "app")


async def test_mutual_tls_refuses_a_client_without_a_valid_certificate(
    mutual_tls_server: RedisServer, pki: Pki
) -> None:
    no_certificate = _tls_url(mutual_tls_server, pki.ca_cert)
    await assert_stack_refused(no_certificate, "app", "ConnectionError", unavailable=True)
    # a certificate signed by the CA but not for client authentication
    server_certificate = _tls_url(
        mutual_tls_server, pki.ca_cert, client=(pki.server_cert, pki.server_key)
    )
    refused_before = len(server_refusals(pki))
    # With TLS 1.3 the server checks the client's certificate after the client has
    # finished its handshake: the client then reads either the server's alert ("...
    # certificate ...") or, when the server's close wins the race, a reset connection.
    # Either way it is refused at once; the server's log says it was for the certificate.
    await assert_stack_refused(
        server_certificate, "app", "certificate|reset by peer|closed", unavailable=True
    )
    refusals = server_refusals(pki)[refused_before:]
    assert refusals, "the server logged no refused client"
    assert all("certificate" in line for line in refusals), refusals
