"""What the local SDK-compatible servers share: uvicorn in the test's own event loop on
``127.0.0.1`` and a free port, their clients' lifecycle, test controls and counters.

A subclass gives its ASGI app (``_asgi``), its ``client()`` and its URL path
(``base_path``); see ``openai_server.py`` and ``anthropic_server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import uvicorn

__all__ = ["LoopbackServer", "StreamAborted"]

JSON = dict[str, Any]
_Server = TypeVar("_Server", bound="LoopbackServer")


class StreamAborted(Exception):
    """Raised inside the ASGI app to cut a stream on purpose (``fail_after``).

    uvicorn answers it by closing the connection mid-body; its log record is filtered out.
    """


class _InProcessServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _DropDeliberateAborts(logging.Filter):
    """Keeps uvicorn from logging the tracebacks of ``StreamAborted``."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamAborted)


class LoopbackServer:
    """An SDK-compatible endpoint on ``127.0.0.1``, served in this event loop.

    Use it as ``async with Server() as server:``. Test controls (plain attributes a test
    may change between requests): ``pieces``, ``chunk_delay``, ``fail_after``,
    ``status_error``, ``reply``. Counters: ``requests``, ``stream_requests``, ``bodies``,
    ``streams_completed``, ``streams_aborted``, ``streams_closed_early``.
    """

    base_path = ""
    """What follows ``http://host:port`` in ``base_url`` (the SDK adds the rest)."""

    def __init__(
        self,
        *,
        pieces: int | None = None,
        chunk_delay: float = 0.0,
        fail_after: int | None = None,
        status_error: int | None = None,
        reply: Callable[[JSON], str] | None = None,
        shutdown_timeout: int = 2,
    ) -> None:
        """Configure the server; nothing listens until ``start()`` or ``async with``.

        ``pieces``: how the answer is cut for streaming (see ``split_pieces``).
        ``reply``: computes the answer text from the request body (default ``echo_reply``).
        ``shutdown_timeout``: seconds ``stop()`` lets requests still running finish.
        """
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.pieces = pieces
        self.chunk_delay = chunk_delay
        self.fail_after = fail_after
        self.status_error = status_error
        self.reply = reply
        self.shutdown_timeout = shutdown_timeout
        self._server: _InProcessServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._clients: list[Any] = []
        self._log_filter = _DropDeliberateAborts()
        self._reset_counters()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` plus ``base_path``, the ``base_url`` for the SDK."""
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return f"http://{self.host}:{self.port}{self.base_path}"

    async def start(self, timeout: float = 5.0) -> None:
        """Start listening on a free loopback port; returns once uvicorn has started."""
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        config = uvicorn.Config(
            self._asgi,
            host=self.host,
            port=0,
            interface="asgi3",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=self.shutdown_timeout,
        )
        logging.getLogger("uvicorn.error").addFilter(self._log_filter)
        server = _InProcessServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(), name=type(self).__name__)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("uvicorn stopped before it started")
            if loop.time() > deadline:
                await self.stop()
                raise TimeoutError(f"uvicorn did not start within {timeout} s")
            await asyncio.sleep(0.005)
        self.port = int(server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the clients made by ``client()``, then stop uvicorn and wait for it."""
        clients, self._clients = self._clients, []
        for client in clients:
            await client.close()
        try:
            if self._server is not None:
                self._server.should_exit = True
            if self._task is not None:
                await self._task
        finally:
            self._server = None
            self._task = None
            self.port = None
            logging.getLogger("uvicorn.error").removeFilter(self._log_filter)

    async def __aenter__(self: _Server) -> _Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _keep(self, client: Any) -> Any:
        """Remember a client of this server, to close it in ``stop()``."""
        self._clients.append(client)
        return client

    def reset(self) -> None:
        """Zero the counters and set the test controls back to their defaults."""
        self.chunk_delay = 0.0
        self.fail_after = None
        self.status_error = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.requests = 0
        self.stream_requests = 0
        self.bodies: list[JSON] = []
        self.streams_completed = 0
        self.streams_aborted = 0
        self.streams_closed_early = 0

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 2.0) -> None:
        """Poll ``condition`` until it holds; ``TimeoutError`` after ``timeout`` seconds.

        For server-side effects that trail the client, such as ``streams_closed_early``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.01)

    async def _asgi(self, scope: Any, receive: Any, send: Any) -> None:
        raise NotImplementedError
