"""``async with`` / ``aclose()`` support shared by every backend."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

from aiocache_llm.core.errors import ClosedResourceError

__all__ = ["AsyncResource"]

_R = TypeVar("_R", bound="AsyncResource")


class AsyncResource:
    """Base of every backend: usable as ``async with``; ``aclose()`` is idempotent.

    After ``aclose()`` every operation raises :class:`ClosedResourceError`.
    Subclasses release their own resources in :meth:`_release`.
    """

    _closed: bool = False

    async def __aenter__(self: _R) -> _R:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the backend's resources; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        await self._release()

    async def _release(self) -> None:
        """Free what the backend holds (a connection pool it created, memory)."""

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{type(self).__name__} is closed")
