"""One object per running event loop (the telemetry pipeline, command timers, lookups).

Services that own tasks and futures belong to one event loop; tests and the runner may run
several loops in one process, one after another. `PerLoop` makes the object on first use in a
loop and forgets it with the loop (weakly keyed), instead of a module global per service.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """The `factory()` object of the running loop, made on first use; `stale` ones are remade."""

    def __init__(self, factory: Callable[[], T], stale: Callable[[T], bool] | None = None) -> None:
        self._factory = factory
        self._stale = stale
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        """The running loop's object, created (or remade when stale) here."""
        loop = asyncio.get_running_loop()
        value = self._by_loop.get(loop)
        if value is None or (self._stale is not None and self._stale(value)):
            value = self._by_loop[loop] = self._factory()
        return value

    def current(self) -> T | None:
        """The running loop's object if one was made (never makes one; None outside a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self._by_loop.get(loop)

    def discard(self, loop: asyncio.AbstractEventLoop, value: T) -> None:
        """Forget `value` if it is still `loop`'s object (it closed)."""
        if self._by_loop.get(loop) is value:
            del self._by_loop[loop]
