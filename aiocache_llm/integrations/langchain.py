"""LangChain's LLM cache over any :class:`AsyncExactCache` (the ``aiocache_llm[langchain]`` extra).

::

    from langchain_core.globals import set_llm_cache
    from aiocache_llm import RedisExactCache
    from aiocache_llm.integrations.langchain import LangChainCache

    set_llm_cache(LangChainCache(RedisExactCache(url="redis://localhost:6379/0",
                                                 key_prefix="myapp:langchain:v1")))

:class:`LangChainCache` is a ``langchain_core.caches.BaseCache``: LangChain's chat models
and LLMs call ``lookup``/``update`` from their sync paths (``invoke``) and
``alookup``/``aupdate`` from their async ones (``ainvoke``).

**Keys.** An entry is filed under the query ``{"langchain_cache": 1, "prompt": prompt,
"llm_string": llm_string}``: two separate JSON fields, so no pair of strings can be
confused with another pair, and no gateway request (which has no such fields) shares
its key.

**Values are data, never pickles.** A list of ``Generation``/``ChatGeneration`` (and
their ``*Chunk`` variants) is stored as LangChain's own serialized form
(``langchain_core.load.dumpd``: JSON) inside a JSON dict, and revived with
``langchain_core.load.load`` restricted to an explicit allowlist,
:data:`ALLOWED_OBJECTS`: the four generation classes, ``AIMessage`` and
``AIMessageChunk``. That is narrower than LangChain's ``allowed_objects="messages"``,
which its documentation calls safe for untrusted input; secrets are never read from the
environment and LangChain's default init validator stays on. So data under our keys,
whoever wrote it, can only ever build those six data classes: anything else is a miss.
(Registering the LangChain classes as pydantic models in the cache's codec was
considered and rejected: ``ChatGeneration.message`` is declared as ``BaseMessage``, so
an ``AIMessage`` would come back as a ``BaseMessage`` and the codec refuses it.)
A value that would not come back equal (a non-JSON object in ``generation_info``, a
non-AI message, a parsed pydantic object in ``additional_kwargs``) raises
:class:`InvalidInputError` on update, or, with ``skip_unstorable=True``, is not stored.

**What it needs of a cache** is a capability, not a class: any object with async
``get(query)``, ``put(query, value, *, ttl_seconds=None)`` and ``clear()``
(:class:`LangChainStore`; every :class:`AsyncExactCache` has them), and ``aclose()``
when it has one. A wrapper of your own around a cache works as the cache does.

**A failing cache never fails a LangChain call.** Reads and writes go through a
:class:`~aiocache_llm.core.guard.BackendGuard` (a circuit breaker; in private-loop mode
also a deadline, ``backend_timeout``): a lookup that fails (Redis down, a timeout, an
error of your cache) is a miss (``None``), an update that fails is skipped, and both
are counted (:meth:`LangChainCache.stats`) and logged once per ``LangChainCache`` (the
breaker logs its own opening and closing once each); after repeated failures the
backend is not even asked for a while. ``clear()`` and closing still raise.

**Threads and event loops.** Two ways to drive the exact cache, chosen once:

- *inline* (a cache whose methods complete without ever yielding to the event loop:
  ``MemoryExactCache``, or any cache whose ``completes_inline`` attribute is ``True``;
  ``inline=True`` declares the same of a cache of your own): every call,
  sync or async, runs the cache's coroutine to completion right there, under a lock
  (LangChain calls ``lookup`` from worker threads in ``batch``). It never blocks on I/O,
  so sync calls are safe even on an event loop's thread. A coroutine that yields
  anyway raises ``RuntimeError`` (it is closed first, so nothing is left running).
- *on a private loop* (any other cache, ``RedisExactCache`` included): the cache is
  driven only from one daemon thread with its own event loop, started on first use, so
  it lives on one loop whatever thread or loop calls LangChain. Async methods hand the
  call to it and await it without blocking their loop; cancelling them cancels it.
  Sync methods called from a thread with no running loop block that thread until the
  call is done. Sync methods called on the thread of a running event loop (sync
  ``invoke`` inside async code, a notebook) never block that loop for I/O: ``lookup``
  answers ``None`` (a miss, logged once per cache), ``update`` is handed to the
  private loop without waiting (failures are logged, without prompt text) and
  ``clear``/``close`` raise ``RuntimeError`` (use ``aclear``/``aclose``).

  Give a ``LangChainCache`` a cache object that nothing else uses (another
  ``RedisExactCache`` on the same prefix shares the same entries): its client's
  connections belong to the private loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

from aiocache_llm.backends.memory.exact_cache import MemoryExactCache
from aiocache_llm.core.errors import ClosedResourceError, InvalidInputError, InvalidInputTypeError
from aiocache_llm.core.guard import BackendGuard, BreakerState
from aiocache_llm.core.query import Query
from aiocache_llm.core.validation import check_bool, check_optional_positive_number
from aiocache_llm.protocols import SupportsInlineCompletion

try:
    from langchain_core._api import suppress_langchain_beta_warning
    from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
    from langchain_core.load import dumpd, load
    from langchain_core.load.serializable import Serializable
    from langchain_core.messages import AIMessage, AIMessageChunk
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        Generation,
        GenerationChunk,
    )
except ImportError as exc:
    raise ImportError(
        "aiocache_llm.integrations.langchain needs the langchain-core package: "
        "pip install 'aiocache_llm[langchain]'"
    ) from exc

__all__ = [
    "ALLOWED_OBJECTS",
    "FORMAT_VERSION",
    "LangChainCache",
    "LangChainCacheStats",
    "LangChainStore",
]

FORMAT_VERSION: Final = 1
"""Part of every key and value: a new storage format retires the old entries."""

ALLOWED_OBJECTS: Final[tuple[type[Serializable], ...]] = (
    Generation,
    GenerationChunk,
    ChatGeneration,
    ChatGenerationChunk,
    AIMessage,
    AIMessageChunk,
)
"""The only classes a stored entry may revive into (plain data, no side effects)."""

_KEY_FIELD = "langchain_cache"
_VALUE_FIELD = "langchain_generations"
_T = TypeVar("_T")
_log = logging.getLogger(__name__)
_FAILED: Final = object()  # a guarded call's fallback: the backend failed or was skipped


@runtime_checkable
class LangChainStore(Protocol):
    """What :class:`LangChainCache` needs of a cache (every :class:`AsyncExactCache` has it).

    ``aclose()`` is used when the object has one. An attribute ``completes_inline =
    True`` declares that every coroutine of the object completes without yielding to
    the event loop (see the module docstring).
    """

    async def get(self, query: Query) -> Any | None: ...

    async def put(self, query: Query, value: Any, *, ttl_seconds: float | None = None) -> None: ...

    async def clear(self) -> None: ...


class LangChainCacheStats(BaseModel):
    """A frozen snapshot of what failed under a :class:`LangChainCache` in this process."""

    model_config = ConfigDict(frozen=True)

    lookup_failures: int = 0
    """Lookups answered as misses because the cache failed, timed out or was skipped."""
    update_failures: int = 0
    """Updates not stored because the cache failed, timed out or was skipped."""
    breaker: BreakerState = BreakerState.CLOSED
    """The state of the circuit breaker in front of the cache."""


def _completes_inline(cache: object) -> bool:
    """Whether ``cache`` declares that its coroutines never suspend (a capability).

    ``MemoryExactCache`` carries ``completes_inline = True``; a wrapper that keeps the
    property says so with the same attribute.
    """
    return isinstance(cache, SupportsInlineCompletion) and cache.completes_inline is True


class LangChainCache(BaseCache):
    """A LangChain ``BaseCache`` (for ``set_llm_cache``) over any :class:`AsyncExactCache`.

    ``exact_cache`` defaults to a private :class:`MemoryExactCache` (1024 entries, LRU);
    any :class:`LangChainStore` (an object with async ``get``, ``put`` and ``clear``)
    will do. ``ttl_seconds`` is the lifetime of each entry this cache writes (``None``:
    the exact cache's own default). ``skip_unstorable=True`` makes ``update`` store
    nothing for a value that would not come back equal, instead of raising. ``inline``
    says whether the exact cache's coroutines complete without yielding (see the module
    docstring); ``None`` means: when it declares ``completes_inline = True`` (as
    ``MemoryExactCache`` does). ``backend_timeout`` (seconds, ``None`` for none) bounds each
    read and write of a cache driven on the private loop.

    The ``LangChainCache`` drives and owns the exact cache: :meth:`aclose`/:meth:`close`
    close it (and stop the private thread). A failing exact cache never fails a
    lookup or update (a miss, a skipped write; see :meth:`stats`); ``clear``,
    ``aclear`` and closing raise its errors. After closing, every method raises
    :class:`ClosedResourceError`.
    """

    def __init__(
        self,
        exact_cache: LangChainStore | None = None,
        *,
        ttl_seconds: float | None = None,
        skip_unstorable: bool = False,
        inline: bool | None = None,
        backend_timeout: float | None = 2.0,
    ) -> None:
        if exact_cache is None:
            exact_cache = MemoryExactCache()
        elif not isinstance(exact_cache, LangChainStore):
            raise InvalidInputTypeError(
                "exact_cache must have async get, put and clear methods (an AsyncExactCache), "
                f"got {type(exact_cache).__name__}"
            )
        self._cache = exact_cache
        self._ttl = check_optional_positive_number("ttl_seconds", ttl_seconds)
        self._skip_unstorable = check_bool("skip_unstorable", skip_unstorable)
        if inline is None:
            inline = _completes_inline(exact_cache)
        self._inline = check_bool("inline", inline)
        timeout = check_optional_positive_number("backend_timeout", backend_timeout)
        # an inline call may run with no event loop at all, where no deadline can be set;
        # it never waits for anything anyway
        self._guard = BackendGuard(
            f"LangChainCache({type(exact_cache).__name__})",
            timeout=None if self._inline else timeout,
        )
        self._inline_lock = threading.Lock()
        self._loop_thread: _LoopThread | None = None if self._inline else _LoopThread()
        self._closed = False
        self._warned_loop_thread = False
        self._warned_failure = False
        self._lookup_failures = 0
        self._update_failures = 0

    def __repr__(self) -> str:
        mode = "inline" if self._inline else "private loop"
        return f"LangChainCache({self._cache!r}, ttl_seconds={self._ttl}, {mode})"

    @property
    def exact_cache(self) -> LangChainStore:
        """The cache entries are stored in."""
        return self._cache

    def stats(self) -> LangChainCacheStats:
        """Return a frozen snapshot of the failure counters and the breaker's state."""
        return LangChainCacheStats(
            lookup_failures=self._lookup_failures,
            update_failures=self._update_failures,
            breaker=self._guard.state,
        )

    # -- the BaseCache API ------------------------------------------------------------

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """Return the generations stored for ``(prompt, llm_string)``, or ``None``.

        Blocks the calling thread for one cache read, except on the thread of a running
        event loop with a cache that is not inline: then it answers ``None`` at once.
        A failing cache is a miss. Raises :class:`InvalidInputTypeError` for non-``str``
        arguments.
        """
        query = _query(prompt, llm_string)
        if not self._inline and _on_loop_thread():
            self._warn_loop_thread()
            return None
        return _revive(self._call(lambda: self._get(query)))

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """:meth:`lookup`, without blocking the event loop."""
        query = _query(prompt, llm_string)
        return _revive(await self._acall(lambda: self._get(query)))

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Store ``return_val`` (a sequence of ``Generation``) for ``(prompt, llm_string)``.

        Blocks the calling thread for one cache write, except on the thread of a
        running event loop with a cache that is not inline: then the write is handed
        to the private loop and not waited for. A failing cache skips the write.
        Raises :class:`InvalidInputError` for a value that would not come back equal
        (unless ``skip_unstorable``), before anything is stored.
        """
        query = _query(prompt, llm_string)
        value = self._encode(return_val)
        if value is None:
            return
        if not self._inline and _on_loop_thread():
            self._submit_detached(self._put(query, value))
            return
        self._call(lambda: self._put(query, value))

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """:meth:`update`, without blocking the event loop (always waits for the write)."""
        query = _query(prompt, llm_string)
        value = self._encode(return_val)
        if value is not None:
            await self._acall(lambda: self._put(query, value))

    def clear(self, **kwargs: Any) -> None:
        """Remove every entry of the exact cache (not only LangChain's).

        Takes no options (raises :class:`InvalidInputTypeError` for any). Blocks the
        calling thread; raises ``RuntimeError`` on the thread of a running event loop
        with a cache that is not inline (use :meth:`aclear`).
        """
        _no_options(kwargs)
        if not self._inline and _on_loop_thread():
            raise RuntimeError(
                "LangChainCache.clear() would block this event loop for I/O: await aclear()"
            )
        self._call(self._cache.clear)

    async def aclear(self, **kwargs: Any) -> None:
        """:meth:`clear`, without blocking the event loop."""
        _no_options(kwargs)
        await self._acall(self._cache.clear)

    # -- lifecycle --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the exact cache and stop the private thread; calling it again does nothing.

        Background updates (see :meth:`update`) still running then are cancelled.
        """
        if self._closed:
            return
        try:
            await self._acall(self._close_cache)
        finally:
            self._closed = True
            if self._loop_thread is not None:
                await asyncio.to_thread(self._loop_thread.stop)

    def close(self) -> None:
        """:meth:`aclose` for sync code; raises ``RuntimeError`` where :meth:`clear` does."""
        if self._closed:
            return
        if not self._inline and _on_loop_thread():
            raise RuntimeError(
                "LangChainCache.close() would block this event loop for I/O: await aclose()"
            )
        try:
            self._call(self._close_cache)
        finally:
            self._closed = True
            if self._loop_thread is not None:
                self._loop_thread.stop()

    async def __aenter__(self) -> LangChainCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- driving the exact cache ------------------------------------------------------

    async def _get(self, query: dict[str, Any]) -> Any:
        cache = self._cache
        stored = await self._guard.call(lambda: cache.get(query), _FAILED)
        if stored is _FAILED:
            self._lookup_failures += 1
            self._warn_failure("a lookup", "a miss")
            return None
        return stored

    async def _put(self, query: dict[str, Any], value: dict[str, Any]) -> None:
        cache, ttl = self._cache, self._ttl
        done = await self._guard.call(lambda: cache.put(query, value, ttl_seconds=ttl), _FAILED)
        if done is _FAILED:
            self._update_failures += 1
            self._warn_failure("an update", "not stored")

    async def _close_cache(self) -> None:
        close = getattr(self._cache, "aclose", None)
        if callable(close):
            await close()

    def _warn_failure(self, operation: str, outcome: str) -> None:
        if not self._warned_failure:
            self._warned_failure = True
            _log.warning(
                "LangChainCache: %s of %s failed and was %s; the LangChain call goes on. "
                "Failures are counted in stats() and logged only once",
                operation,
                type(self._cache).__name__,
                outcome,
            )

    def _encode(self, return_val: RETURN_VAL_TYPE) -> dict[str, Any] | None:
        generations = _generations(return_val)
        try:
            data = dumpd(generations)
            equal = _revive_data(data) == generations
        except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
            equal, reason = False, f"{type(exc).__name__}: {exc}"
        else:
            reason = "it does not come back equal"
        if not equal:
            if self._skip_unstorable:
                _log.debug("LangChainCache: a value was not stored (%s)", reason)
                return None
            raise InvalidInputError(f"generations cannot be stored as LangChain data ({reason})")
        return {_KEY_FIELD: FORMAT_VERSION, _VALUE_FIELD: data}

    def _call(self, operation: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``operation()`` to completion from sync code, off any event loop."""
        self._check_open()
        if self._inline:
            return self._run_inline(operation())
        assert self._loop_thread is not None
        return self._loop_thread.submit(operation()).result()

    async def _acall(self, operation: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        self._check_open()
        if self._inline:
            return self._run_inline(operation())
        assert self._loop_thread is not None
        return await asyncio.wrap_future(self._loop_thread.submit(operation()))

    def _run_inline(self, coro: Coroutine[Any, Any, _T]) -> _T:
        # the lock orders calls from several threads; it is held only while the
        # coroutine runs, which never waits for anything
        with self._inline_lock:
            try:
                coro.send(None)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            coro.close()
        raise RuntimeError(
            f"{type(self._cache).__name__} yielded to the event loop: it is not an inline "
            "cache; build LangChainCache with inline=False"
        )

    def _submit_detached(self, coro: Coroutine[Any, Any, None]) -> None:
        self._check_open()
        assert self._loop_thread is not None
        self._loop_thread.submit(coro).add_done_callback(_log_failure)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("LangChainCache is closed")

    def _warn_loop_thread(self) -> None:
        if not self._warned_loop_thread:
            self._warned_loop_thread = True
            _log.warning(
                "LangChainCache.lookup() was called on the thread of a running event loop; "
                "a %s read would block it, so sync lookups there are misses: "
                "use ainvoke, or invoke from a worker thread",
                type(self._cache).__name__,
            )


class _LoopThread:
    """A daemon thread running its own event loop, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        with self._lock:
            if self._stopped:
                coro.close()
                raise ClosedResourceError("LangChainCache is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=_run_forever,
                    args=(self._loop,),
                    name="aiocache_llm-langchain",
                    daemon=True,
                )
                self._thread.start()
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self) -> None:
        """Stop the loop (tasks still running are cancelled) and wait for the thread."""
        with self._lock:
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def _on_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _query(prompt: object, llm_string: object) -> dict[str, Any]:
    if type(prompt) is not str or type(llm_string) is not str:
        raise InvalidInputTypeError(
            "prompt and llm_string must be str, got "
            f"{type(prompt).__name__} and {type(llm_string).__name__}"
        )
    return {_KEY_FIELD: FORMAT_VERSION, "prompt": prompt, "llm_string": llm_string}


def _generations(return_val: object) -> list[Generation]:
    if isinstance(return_val, (str, bytes)) or not isinstance(return_val, Sequence):
        raise InvalidInputTypeError(
            f"return_val must be a sequence of Generation, got {type(return_val).__name__}"
        )
    generations = list(return_val)
    for item in generations:
        if not isinstance(item, Generation):
            raise InvalidInputTypeError(
                f"return_val must hold Generation objects, got {type(item).__name__}"
            )
    return generations


def _revive_data(data: object) -> Any:
    # LangChain marks load() as beta and warns once per process; the warning says
    # nothing to our users, who never call it
    with suppress_langchain_beta_warning():
        return load(data, allowed_objects=ALLOWED_OBJECTS, secrets_from_env=False)


def _revive(stored: object) -> list[Generation] | None:
    """The generations of a stored entry; ``None`` for a miss or anything we did not write."""
    if stored is None:
        return None
    if (
        type(stored) is dict
        and stored.get(_KEY_FIELD) == FORMAT_VERSION
        and type(stored.get(_VALUE_FIELD)) is list
    ):
        try:
            generations = _revive_data(stored[_VALUE_FIELD])
        except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
            _log.warning("LangChainCache: an entry could not be revived (%s)", type(exc).__name__)
            return None
        if type(generations) is list and all(isinstance(g, Generation) for g in generations):
            return generations
    _log.warning("LangChainCache: an entry under our key is not ours; treated as a miss")
    return None


def _no_options(kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise InvalidInputTypeError(f"clear() takes no options, got {sorted(kwargs)}")


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        _log.warning("LangChainCache: a background update failed: %s", type(exc).__name__)
