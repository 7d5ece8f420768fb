"""An OpenAI-compatible Chat Completions server on loopback, for tests that use the real SDK.

``FakeOpenAIServer`` runs uvicorn inside the test's own event loop, on ``127.0.0.1`` and a
port the kernel picks, and answers ``POST /v1/chat/completions`` with the JSON shapes of
the OpenAI API, so the real ``openai.AsyncOpenAI`` client talks to it over real HTTP and
no test reaches the internet::

    async with FakeOpenAIServer() as server:
        client = server.client()
        completion = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi there"}]
        )
        assert completion.choices[0].message.content == "Echo: hi there"

The answer is deterministic: ``"Echo: " + <text of the last user message>`` (override it
with the ``reply`` attribute), cut into pieces (one per word, each keeping its trailing
whitespace, or ``pieces`` pieces of about equal length) that are streamed one chunk each.
Usage is ``prompt_tokens = <characters of all message contents> // 4 + 1``,
``completion_tokens = <number of pieces>``, ``total_tokens = <their sum>``.

Test controls, plain attributes that a test may change between requests:

* ``chunk_delay``: seconds slept before each streamed chunk after the first (default 0).
* ``fail_after``: when not ``None``, a stream sends its role chunk and that many content
  chunks, then the server aborts the response (the chunked body is never terminated and
  the connection is closed). The SDK surfaces this while iterating as
  ``openai.APIConnectionError`` whose ``__cause__`` is ``httpx2.RemoteProtocolError``
  ("peer closed connection without sending complete message body"): this version of the
  ``openai`` package runs on ``httpx2`` and maps every transport error met inside a stream
  to ``APIConnectionError`` (see ``openai/_streaming.py``). Non-streaming requests ignore it.
* ``status_error``: when not ``None``, every request is answered with that HTTP status and
  an OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``; the SDK raises
  the matching ``openai.APIStatusError`` subclass (429 gives ``openai.RateLimitError``).

Counters: ``requests`` (every HTTP request, 404s and ``status_error`` answers included),
``stream_requests`` (chat requests with ``"stream": true``, also when answered with
``status_error``), ``bodies`` (the parsed JSON body of every chat request, in order),
``streams_completed`` (streams that sent ``data: [DONE]``), ``streams_aborted`` (streams cut
by ``fail_after``) and ``streams_closed_early`` (streams that ended before ``[DONE]`` for
any other reason: the client disconnected, or ``stop()`` cancelled them). The server sees a
disconnect a moment after the client closes, so poll with ``await server.wait_for(...)``.
``reset()`` zeroes the counters and clears ``chunk_delay``, ``fail_after`` and
``status_error``. Any other path or method is answered 404 with an OpenAI-shaped body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import openai

from tests.support.loopback_server import LoopbackServer, StreamAborted

__all__ = [
    "FakeOpenAIServer",
    "StreamAborted",
    "echo_reply",
    "message_text",
    "prompt_chars",
    "split_pieces",
]

JSON = dict[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"

# type and code of the error body the real API sends with each status.
_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (fake server)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (fake server)."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (fake server)."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def message_text(content: Any) -> str:
    """The text of a message ``content``: a string, or the ``text`` of its content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def echo_reply(body: JSON) -> str:
    """The default answer: ``"Echo: "`` followed by the text of the last user message."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return "Echo: " + message_text(message.get("content"))
    return "Echo: "


def split_pieces(text: str, pieces: int | None = None) -> list[str]:
    """Cut ``text`` into stream pieces whose concatenation is exactly ``text``.

    ``None``: one piece per word, each keeping the whitespace that follows it (leading
    whitespace is a piece of its own). An int: that many pieces of about equal length
    (fewer when ``text`` is shorter). An empty text gives no pieces.
    """
    if not text:
        return []
    if pieces is None:
        return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]
    count = max(1, min(pieces, len(text)))
    bounds = [len(text) * index // count for index in range(count + 1)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def prompt_chars(body: JSON) -> int:
    """Characters of all message contents in a request body."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        len(message_text(message.get("content")))
        for message in messages
        if isinstance(message, dict)
    )


class FakeOpenAIServer(LoopbackServer):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint on ``127.0.0.1``, in this loop.

    Use it as ``async with FakeOpenAIServer() as server:``; ``server.client()`` gives a real
    ``openai.AsyncOpenAI`` pointed at it. See the module docstring for the answers it gives,
    the test controls and the counters.
    """

    base_path = "/v1"

    def __init__(self, *, system_fingerprint: str = "fp_fakeopenai", **options: Any) -> None:
        """See :class:`LoopbackServer` for ``options``."""
        super().__init__(**options)
        self.system_fingerprint = system_fingerprint

    def client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """A real ``openai.AsyncOpenAI`` for this server, closed by ``stop()``.

        Defaults: ``api_key="test"``, ``max_retries=0``, ``timeout=10`` and an HTTP client
        that ignores proxy environment variables; ``kwargs`` override them.
        """
        options: dict[str, Any] = {"api_key": "test", "max_retries": 0, "timeout": 10.0}
        options.update(kwargs)
        if "http_client" not in options:
            options["http_client"] = openai.DefaultAsyncHttpxClient(trust_env=False)
        client: openai.AsyncOpenAI = self._keep(
            openai.AsyncOpenAI(base_url=self.base_url, **options)
        )
        return client

    # ------------------------------------------------------------------ answers

    def answer_for(self, body: JSON) -> str:
        """The assistant text for a request body."""
        return (self.reply or echo_reply)(body)

    def usage_for(self, body: JSON, pieces: list[str]) -> JSON:
        """The ``usage`` object for a request body and the pieces of its answer."""
        prompt_tokens = prompt_chars(body) // 4 + 1
        completion_tokens = len(pieces)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def completion_for(self, body: JSON) -> JSON:
        """The ``chat.completion`` object answering a non-streaming request."""
        text = self.answer_for(body)
        return {
            "id": _completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model") or "gpt-test"),
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage_for(body, split_pieces(text, self.pieces)),
            "service_tier": "default",
            "system_fingerprint": self.system_fingerprint,
        }

    def chunks_for(self, body: JSON) -> list[JSON]:
        """The ``chat.completion.chunk`` objects of a streamed answer, in order.

        Role chunk, one chunk per piece, the ``finish_reason: "stop"`` chunk and, when
        ``stream_options.include_usage`` is true, a last chunk with no choices and the usage
        (every other chunk then carries ``"usage": null``).
        """
        text = self.answer_for(body)
        pieces = split_pieces(text, self.pieces)
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        common: JSON = {
            "id": _completion_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": str(body.get("model") or "gpt-test"),
            "service_tier": "default",
            "system_fingerprint": self.system_fingerprint,
        }

        def chunk(delta: JSON, finish_reason: str | None = None) -> JSON:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            result: JSON = {**common, "choices": [choice]}
            if include_usage:
                result["usage"] = None
            return result

        chunks = [chunk({"role": "assistant", "content": ""})]
        chunks.extend(chunk({"content": piece}) for piece in pieces)
        chunks.append(chunk({}, "stop"))
        if include_usage:
            chunks.append({**common, "choices": [], "usage": self.usage_for(body, pieces)})
        return chunks

    # ------------------------------------------------------------------ ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        raw = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        if method != "POST" or path.rstrip("/") != CHAT_PATH:
            message = f"Invalid URL ({method} {path})"
            await _send_json(send, 404, _error_body(404, message, code=None))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            await _send_json(send, 400, _error_body(400, message))
            return
        self.bodies.append(body)
        streaming = body.get("stream") is True
        if streaming:
            self.stream_requests += 1
        if self.status_error is not None:
            status = self.status_error
            await _send_json(send, status, _error_body(status))
            return
        if streaming:
            await self._stream(body, receive, send)
        else:
            await _send_json(send, 200, self.completion_for(body))

    async def _stream(self, body: JSON, receive: Receive, send: Send) -> None:
        chunks = self.chunks_for(body)
        fail_after = self.fail_after
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        ended = False  # sent [DONE] or aborted on purpose
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-request-id", _request_id().encode()),
                    ],
                }
            )
            for index, chunk in enumerate(chunks):
                if index:
                    await _pause(disconnected, self.chunk_delay)
                if disconnected.is_set():
                    return
                if fail_after is not None and index == fail_after + 1:
                    ended = True
                    self.streams_aborted += 1
                    raise StreamAborted(f"stream cut after {fail_after} content chunks")
                await _send_event(send, json.dumps(chunk, separators=(",", ":")))
            await _pause(disconnected, self.chunk_delay)
            if disconnected.is_set():
                return
            await _send_event(send, "[DONE]", more_body=False)
            ended = True
            self.streams_completed += 1
        finally:
            watcher.cancel()
            await asyncio.wait({watcher})
            if not ended:
                self.streams_closed_early += 1


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:29]


def _request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _error_body(status: int, message: str | None = None, **overrides: Any) -> JSON:
    kind, code, default_message = _ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
    )
    error: JSON = {"message": message or default_message, "type": kind, "param": None, "code": code}
    error.update(overrides)
    return {"error": error}


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_json(send: Send, status: int, payload: JSON) -> None:
    data = json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"x-request-id", _request_id().encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_event(send: Send, data: str, *, more_body: bool = True) -> None:
    event = f"data: {data}\n\n".encode()
    await send({"type": "http.response.body", "body": event, "more_body": more_body})


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()


async def _pause(disconnected: asyncio.Event, delay: float) -> None:
    """Sleep ``delay`` seconds (at least one loop turn), waking early on disconnect."""
    if delay <= 0:
        await asyncio.sleep(0)
        return
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(disconnected.wait(), delay)
