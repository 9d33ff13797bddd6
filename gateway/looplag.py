"""The event loop's lag, sampled: how late a short sleep wakes up, as a Prometheus histogram.

Anything that holds the loop (a long callback, a GC pause, a thread keeping the GIL) delays
every message, WebSocket frame and timer behind it; this makes such stalls visible on
``/metrics`` (``gateway_event_loop_lag_seconds``, docs/interface.md §5.5) in production, not
only in a bench. One wake-up per `INTERVAL` (0.1 s): ~0.15 % of a core on the 2-core test
machine.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.metrics import EVENT_LOOP_LAG

#: Seconds between two samples (a stall shorter than this may fall between them).
INTERVAL = 0.1


async def sample_loop_lag(interval: float = INTERVAL) -> None:
    """Forever: sleep `interval`, observe how much later than asked the loop woke us."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval
        await asyncio.sleep(interval)
        EVENT_LOOP_LAG.observe(max(0.0, loop.time() - asked))


def start_loop_lag_sampler(interval: float = INTERVAL) -> asyncio.Task[None]:
    """The sampler as a task of the running loop (cancel it to stop)."""
    return asyncio.create_task(sample_loop_lag(interval), name="gateway.looplag")


async def stop_loop_lag_sampler(task: asyncio.Task[None]) -> None:
    """Cancel the sampler and wait for it."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
