"""Waiting, in an async test, for a blocking check against a child process to come true."""

from __future__ import annotations

import asyncio
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
