"""Waiting, in an async test, for a blocking check against a child process to come true."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def until(check: Callable[[], Any], wait: float = 10.0, what: str = "condition") -> Any:
    """Poll a blocking check in a thread until it returns something truthy; that is returned."""
    deadline = time.monotonic() + wait
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {wait} s"
        await asyncio.sleep(0.05)


async def eventually(
    predicate: Callable[[], Any], within: float = 10.0, what: str = "condition"
) -> Any:
    """Check `predicate()` (a value, or an awaitable of one) in this loop until it is truthy.

    For in-process state (a server's counters, the test database through the ORM); a check
    that blocks belongs in `until`. Returns the truthy result; fails after `within` s.
    """
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.02)
