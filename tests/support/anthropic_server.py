"""An Anthropic-compatible Messages API server on loopback, for tests that use the real SDK.

``FakeAnthropicServer`` runs uvicorn inside the test's own event loop, on ``127.0.0.1``
and a port the kernel picks, and answers ``POST /v1/messages`` with the JSON of the
Anthropic Messages API, so the real ``anthropic.AsyncAnthropic`` client talks to it over
real HTTP and no test reaches the internet::

    async with FakeAnthropicServer() as server:
        client = server.client()
        message = await client.messages.create(
            model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].text == "Echo: hi"

The answer is deterministic: ``"Echo: " + <text of the last user message>`` (override it
with the ``reply`` attribute), cut into pieces (one per word, each keeping its trailing
whitespace, or ``pieces`` pieces of about equal length), one ``text_delta`` each when
streamed. Usage is ``input_tokens = <characters of the system prompt and all message
texts> // 4 + 1`` and ``output_tokens = <number of pieces>``, with
``cache_creation_input_tokens`` and ``cache_read_input_tokens`` 0.

A non-streaming request gets a ``message`` object. A request with ``"stream": true``
gets the event sequence of the real API, each as ``event: <type>`` and
``data: <json>`` lines: ``message_start`` (the message with empty ``content``, null
``stop_reason`` and ``usage.output_tokens`` 1), ``content_block_start`` (an empty text
block), ``ping``, one ``content_block_delta`` (``text_delta``) per piece,
``content_block_stop``, ``message_delta`` (``stop_reason: "end_turn"`` and the final
``usage.output_tokens``) and ``message_stop``. The SDK skips ``ping``, so a client sees
every event but that one.

Test controls, plain attributes that a test may change between requests:

* ``chunk_delay``: seconds slept before each event after the first (default 0).
* ``fail_after``: when not ``None``, a stream sends ``message_start``,
  ``content_block_start``, ``ping`` and that many ``content_block_delta`` events, then
  the server aborts the response (the chunked body is never terminated and the
  connection is closed). The SDK raises ``anthropic.APIConnectionError`` from the
  iteration (it maps every transport error met while reading the body to it, see
  ``anthropic/_streaming.py``). Non-streaming requests ignore it.
* ``error_after``: when not ``None``, a stream sends ``message_start``,
  ``content_block_start``, ``ping`` and that many ``content_block_delta`` events, then
  an ``event: error`` with the API's body ``{"type": "error", "error": {"type":
  error_type, "message": ...}}`` (``error_type`` defaults to ``"overloaded_error"``)
  and ends the response cleanly, as the real API does when it fails mid-stream. The
  SDK raises ``anthropic.APIStatusError`` from the iteration (the plain class: the
  HTTP status was 200), with that body as ``.body``. Non-streaming requests ignore it.
* ``status_error``: when not ``None``, every request is answered with that HTTP status
  and Anthropic's error body ``{"type": "error", "error": {"type", "message"},
  "request_id"}``; the SDK raises the matching ``anthropic.APIStatusError`` subclass
  (429 gives ``anthropic.RateLimitError``).

Requests are validated as the API does: ``messages`` must be a non-empty list of
``user``/``assistant`` messages with non-empty content (the last one excepted, if it
is the assistant's), every ``tool_result`` block must answer a ``tool_use`` block of the
message right before it, and every ``tool_use`` block must be answered by a
``tool_result`` block in the message right after it. A request that breaks one of
these is answered 400 with the API's ``invalid_request_error`` body (the real API's
wording) and counted in ``rejected``. Set ``validate_messages = False`` to accept
anything.

Counters: ``requests`` (every HTTP request, 404s and ``status_error`` answers included),
``stream_requests`` (message requests with ``"stream": true``, also when answered with
``status_error``), ``bodies`` (the parsed JSON body of every message request, in order),
``headers`` (the request headers of every message request, lower-case names, in order),
``streams_completed`` (streams that sent ``message_stop``), ``streams_aborted``
(streams cut by ``fail_after``), ``streams_errored`` (streams ended by
``error_after``) and ``streams_closed_early`` (streams that ended before
``message_stop`` for any other reason: the client disconnected, or ``stop()``
cancelled them). The server sees a disconnect a moment after the client closes, so
poll with ``await server.wait_for(...)``. ``reset()`` zeroes the counters and clears
``chunk_delay``, ``fail_after``, ``error_after`` and ``status_error``. Any other path
or method is
answered 404 with an Anthropic error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anthropic

from tests.support.loopback_server import LoopbackServer, StreamAborted

__all__ = [
    "FakeAnthropicServer",
    "StreamAborted",
    "echo_reply",
    "message_errors",
    "message_text",
    "prompt_chars",
    "split_pieces",
]

JSON = dict[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MESSAGES_PATH = "/v1/messages"

# the error ``type`` and message the real API sends with each status
_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (fake server)."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    500: ("api_error", "Internal server error."),
    529: ("overloaded_error", "Overloaded"),
}


def message_text(content: Any) -> str:
    """The text of a ``content`` or ``system``: a string, or the ``text`` of its text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(block.get("text", ""))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _blocks(content: Any, kind: str, field: str) -> list[Any]:
    if not isinstance(content, list):
        return []
    return [b.get(field) for b in content if isinstance(b, dict) and b.get("type") == kind]


def message_errors(messages: Any) -> str | None:
    """Why the API would refuse ``messages`` (its own wording), or ``None`` if it would not."""
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    last = len(messages) - 1
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages.{index}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, (str, list)):
            return f"messages.{index}.content: Input should be a valid string or list"
        if not content and not (index == last and message["role"] == "assistant"):
            return (
                f"messages.{index}: all messages must have non-empty content except for "
                "the optional final assistant message"
            )
        previous = messages[index - 1] if index else None
        offered = (
            set(_blocks(previous.get("content"), "tool_use", "id"))
            if isinstance(previous, dict) and previous.get("role") == "assistant"
            else set()
        )
        unexpected = [i for i in _blocks(content, "tool_result", "tool_use_id") if i not in offered]
        if unexpected:
            return (
                f"messages.{index}.content: unexpected `tool_use_id` found in `tool_result` "
                f"blocks: {', '.join(map(str, unexpected))}. Each `tool_result` block must "
                "have a corresponding `tool_use` block in the previous message."
            )
        uses = _blocks(content, "tool_use", "id") if message["role"] == "assistant" else []
        following = messages[index + 1] if index < last else None
        answered = (
            set(_blocks(following.get("content"), "tool_result", "tool_use_id"))
            if isinstance(following, dict) and following.get("role") == "user"
            else set()
        )
        missing = [i for i in uses if i not in answered]
        if missing:
            return (
                f"messages.{index}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(map(str, missing))}. Each `tool_use` block "
                "must have a corresponding `tool_result` block in the next message."
            )
    return None


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
    """Characters of the system prompt and of every message's text in a request body."""
    total = len(message_text(body.get("system")))
    messages = body.get("messages")
    if isinstance(messages, list):
        total += sum(
            len(message_text(message.get("content")))
            for message in messages
            if isinstance(message, dict)
        )
    return total


class FakeAnthropicServer(LoopbackServer):
    """An Anthropic-compatible ``/v1/messages`` endpoint on ``127.0.0.1``, in this loop.

    Use it as ``async with FakeAnthropicServer() as server:``; ``server.client()`` gives a
    real ``anthropic.AsyncAnthropic`` pointed at it (its ``base_url`` has no ``/v1``: the
    SDK adds it to every path). See the module docstring for the answers it gives, the
    test controls and the counters (``headers`` too: the request headers, in order).
    """

    def __init__(self, **options: Any) -> None:
        """See :class:`LoopbackServer` for ``options``."""
        super().__init__(**options)
        self.error_after: int | None = None
        self.error_type = "overloaded_error"
        self.validate_messages = True

    def reset(self) -> None:
        super().reset()
        self.error_after = None

    def _reset_counters(self) -> None:
        super()._reset_counters()
        self.headers: list[dict[str, str]] = []
        self.streams_errored = 0
        self.rejected = 0

    def client(self, **kwargs: Any) -> anthropic.AsyncAnthropic:
        """A real ``anthropic.AsyncAnthropic`` for this server, closed by ``stop()``.

        Defaults: ``api_key="test"``, ``max_retries=0``, ``timeout=10`` and an HTTP client
        that ignores proxy environment variables; ``kwargs`` override them.
        """
        options: dict[str, Any] = {"api_key": "test", "max_retries": 0, "timeout": 10.0}
        options.update(kwargs)
        if "http_client" not in options:
            options["http_client"] = anthropic.DefaultAsyncHttpxClient(trust_env=False)
        client: anthropic.AsyncAnthropic = self._keep(
            anthropic.AsyncAnthropic(base_url=self.base_url, **options)
        )
        return client

    # ------------------------------------------------------------------ answers

    def answer_for(self, body: JSON) -> str:
        """The assistant text for a request body."""
        return (self.reply or echo_reply)(body)

    def usage_for(self, body: JSON, pieces: list[str]) -> JSON:
        """The ``usage`` object of a finished message for a request body and its pieces."""
        return {
            "input_tokens": prompt_chars(body) // 4 + 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": len(pieces),
            "service_tier": "standard",
        }

    def message_for(self, body: JSON) -> JSON:
        """The ``message`` object answering a non-streaming request."""
        text = self.answer_for(body)
        return {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "model": str(body.get("model") or "claude-test"),
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self.usage_for(body, split_pieces(text, self.pieces)),
        }

    def events_for(self, body: JSON) -> list[tuple[str, JSON]]:
        """The ``(event name, data)`` pairs of a streamed answer, in the order sent.

        As the real API: ``message_start`` carries the message with no content yet and
        the input usage (``output_tokens`` 1), ``message_delta`` the stop reason and
        the final (cumulative) ``output_tokens``.
        """
        text = self.answer_for(body)
        pieces = split_pieces(text, self.pieces)
        usage = self.usage_for(body, pieces)
        start = {
            **self.message_for(body),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        events: list[tuple[str, JSON]] = [
            ("message_start", {"type": "message_start", "message": start}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        events.extend(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in pieces
        )
        events.extend(
            [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": usage["output_tokens"]},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
        )
        return events

    # ------------------------------------------------------------------ ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        raw = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        if method != "POST" or path.rstrip("/") != MESSAGES_PATH:
            await _send_json(send, 404, _error_body(404, f"Not found: {method} {path}"))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            await _send_json(send, 400, _error_body(400, "The request body is not valid JSON."))
            return
        self.bodies.append(body)
        self.headers.append(
            {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in scope.get("headers", [])
            }
        )
        streaming = body.get("stream") is True
        if streaming:
            self.stream_requests += 1
        if self.status_error is not None:
            status = self.status_error
            await _send_json(send, status, _error_body(status))
            return
        problem = message_errors(body.get("messages")) if self.validate_messages else None
        if problem is not None:
            self.rejected += 1
            await _send_json(send, 400, _error_body(400, problem))
            return
        if streaming:
            await self._stream(body, receive, send)
        else:
            await _send_json(send, 200, self.message_for(body))

    async def _stream(self, body: JSON, receive: Receive, send: Send) -> None:
        events = self.events_for(body)
        fail_after = self.fail_after
        # message_start, content_block_start and ping come before the first delta
        cut_at = None if fail_after is None else 3 + fail_after
        error_at = None if self.error_after is None else 3 + self.error_after
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        ended = False  # sent message_stop or aborted on purpose
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"request-id", _request_id().encode()),
                    ],
                }
            )
            last = len(events) - 1
            for index, (name, data) in enumerate(events):
                if index:
                    await _pause(disconnected, self.chunk_delay)
                if disconnected.is_set():
                    return
                if index == cut_at:
                    ended = True
                    self.streams_aborted += 1
                    raise StreamAborted(f"stream cut after {fail_after} content_block_delta")
                if index == error_at:
                    error = {"type": self.error_type, "message": "Overloaded"}
                    await _send_event(
                        send, "error", {"type": "error", "error": error}, more_body=False
                    )
                    ended = True
                    self.streams_errored += 1
                    return
                await _send_event(send, name, data, more_body=index != last)
            ended = True
            self.streams_completed += 1
        finally:
            watcher.cancel()
            await asyncio.wait({watcher})
            if not ended:
                self.streams_closed_early += 1


def _message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def _request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _error_body(status: int, message: str | None = None) -> JSON:
    kind, default_message = _ERROR_KINDS.get(
        status, ("api_error" if status >= 500 else "invalid_request_error", "Error.")
    )
    return {
        "type": "error",
        "error": {"type": kind, "message": message or default_message},
        "request_id": _request_id(),
    }


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
        (b"request-id", _request_id().encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_event(send: Send, name: str, data: JSON, *, more_body: bool = True) -> None:
    event = f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
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
