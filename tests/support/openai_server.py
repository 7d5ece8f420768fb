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

Requests are validated as the API does: ``messages`` must be a non-empty list of
messages with a known role; an assistant message needs ``content`` unless it has
``tool_calls``; every ``tool`` message must answer (by ``tool_call_id``) a tool call of
the assistant message right before it (other tool messages between them allowed), and
every tool call must be answered before the next non-tool message. A request that
breaks one of these is answered 400 with the API's ``invalid_request_error`` body
(the same messages as the real API) and counted in ``rejected``. Set
``validate_messages = False`` to accept anything.

Counters: ``requests`` (every HTTP request, 404s and ``status_error`` answers included),
``stream_requests`` (chat requests with ``"stream": true``, also when answered with
``status_error``), ``bodies`` (the parsed JSON body of every chat request, in order),
``streams_completed`` (streams that sent ``data: [DONE]``), ``streams_aborted`` (streams cut
by ``fail_after``) and ``streams_closed_early`` (streams that ended before ``[DONE]`` for
any other reason: the client disconnected, or ``stop()`` cancelled them). The server sees a
disconnect a moment after the client closes, so poll with ``await server.wait_for(...)``.
``reset()`` zeroes the counters and clears ``chunk_delay``, ``fail_after`` and
``status_error``. Any other path or method is answered 404 with an OpenAI-shaped body.

``POST /v1/embeddings`` answers with the API's ``list`` of ``embedding`` objects (in
input order, ``index`` set) and ``usage`` (``prompt_tokens = total_tokens =
<characters of the inputs> // 4 + 1``). The vectors are deterministic:
``HashingEmbedder(dimensions)`` of each input (unit length, ``embedding_dimension``
= 64 floats unless the request sets ``dimensions``; paraphrases land close, as with a
real model), as float lists or, with ``"encoding_format": "base64"`` (what the SDK
asks for by default), base64 of their little-endian float32 bytes. An input that is
not a non-empty string or a list of them gets a 400. ``status_error`` applies.
Counters: ``embedding_requests`` and ``embedding_inputs`` (the list of texts of each
request, in order); embedding requests are not in ``bodies``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import openai

from aiocache_llm.embedders.hashing import HashingEmbedder
from tests.support.loopback_server import LoopbackServer, StreamAborted

__all__ = [
    "FakeOpenAIServer",
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

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"

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


_OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def message_errors(messages: Any) -> str | None:
    """Why the API would refuse ``messages`` (its own wording), or ``None`` if it would not."""
    if not isinstance(messages, list) or not messages:
        return "Invalid 'messages': expected a non-empty array of messages."
    pending: list[str] = []  # tool calls of the last assistant message not answered yet
    answerable: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _OPENAI_ROLES:
            return f"Invalid value for 'messages[{index}].role'."
        role = message["role"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in answerable:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'."
                )
            if call_id in pending:
                pending.remove(call_id)
            continue
        if pending:
            return (
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(pending)}"
            )
        answerable = set()
        content = message.get("content")
        if role == "assistant":
            calls = message.get("tool_calls") or []
            if content is None and not calls and message.get("function_call") is None:
                return (
                    f"Invalid value for 'messages[{index}].content': expected a string, got null."
                )
            found = [call.get("id") for call in calls if isinstance(call, dict)]
            ids: list[str] = [i for i in found if isinstance(i, str)]
            if len(ids) != len(calls):
                return f"Invalid value for 'messages[{index}].tool_calls'."
            pending, answerable = list(ids), set(ids)
        elif not isinstance(content, (str, list)):
            return f"Invalid value for 'messages[{index}].content': expected a string or array."
    if pending:
        return (
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(pending)}"
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
        self.embedding_dimension = 64
        self.validate_messages = True

    def _reset_counters(self) -> None:
        super()._reset_counters()
        self.rejected = 0
        self.embedding_requests = 0
        self.embedding_inputs: list[list[str]] = []

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

    def embeddings_for(self, body: JSON) -> JSON | None:
        """The ``list`` object answering an embeddings request, or ``None`` for a bad input."""
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            return None
        if not all(isinstance(text, str) and text for text in texts):
            return None
        dimensions = body.get("dimensions")
        if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
            return None
        embedder = HashingEmbedder(dimensions or self.embedding_dimension)
        base64_format = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embedder(text)
            embedding: Any = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode()
                if base64_format
                else [float(x) for x in vector]
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(text) for text in texts) // 4 + 1
        return {
            "object": "list",
            "data": data,
            "model": str(body.get("model") or "text-embedding-test"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ------------------------------------------------------------------ ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        raw = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        if method == "POST" and path.rstrip("/") == EMBEDDINGS_PATH:
            await self._embeddings(raw, send)
            return
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
        problem = message_errors(body.get("messages")) if self.validate_messages else None
        if problem is not None:
            self.rejected += 1
            await _send_json(send, 400, _error_body(400, problem, param="messages"))
            return
        if streaming:
            await self._stream(body, receive, send)
        else:
            await _send_json(send, 200, self.completion_for(body))

    async def _embeddings(self, raw: bytes, send: Send) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.embedding_requests += 1
        if isinstance(body, dict):
            given = body.get("input")
            self.embedding_inputs.append([given] if isinstance(given, str) else list(given or []))
        if self.status_error is not None:
            await _send_json(send, self.status_error, _error_body(self.status_error))
            return
        answer = self.embeddings_for(body) if isinstance(body, dict) else None
        if answer is None:
            message = "'input' must be a non-empty string or a list of non-empty strings."
            await _send_json(send, 400, _error_body(400, message, param="input"))
            return
        await _send_json(send, 200, answer)

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
