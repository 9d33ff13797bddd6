"""One alert evaluator per event loop, and the telemetry pipeline's hooks into it.

`start_evaluator()` makes the running loop's `Evaluator` (the MQTT bridge's alert publisher
calls it on connect); `observe_reading` / `observe_status` are registered with the pipeline
(alerts/apps.py) and hand each admitted message to the loop's evaluator, or return at once
where none runs (a web-only process).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from alerts.evaluator import Evaluator
from gateway.loops import PerLoop

logger = logging.getLogger("alerts.evaluator")

_evaluators: PerLoop[Evaluator] = PerLoop(Evaluator, stale=lambda e: e.closed)


def start_evaluator() -> Evaluator:
    """The running loop's evaluator, started here on first use."""
    return _evaluators.get()


def current_evaluator() -> Evaluator | None:
    """The running loop's evaluator if one was started and is not closed (None otherwise)."""
    evaluator = _evaluators.current()
    return evaluator if evaluator is not None and not evaluator.closed else None


_last: Evaluator | None = None  # the last one found: the hooks run once per message


def _running() -> Evaluator | None:
    global _last
    evaluator = _last
    if evaluator is not None and not evaluator.closed:
        if evaluator.loop is asyncio.get_running_loop():
            return evaluator  # no WeakKeyDictionary lookup per reading
    evaluator = _last = current_evaluator()
    return evaluator


def observe_reading(device: str, ts: float, metrics: Any) -> None:
    """Pipeline hook: a reading was admitted (no-op where no evaluator runs)."""
    evaluator = _running()
    if evaluator is not None:
        try:
            evaluator.reading(device, ts, metrics)
        except Exception:
            logger.exception("alert evaluation of a reading of %r failed", device)


def observe_status(device: str, online: bool, ts: float) -> None:
    """Pipeline hook: a status was admitted (no-op where no evaluator runs)."""
    evaluator = _running()
    if evaluator is not None:
        try:
            evaluator.status(device, online, ts)
        except Exception:
            logger.exception("alert evaluation of a status of %r failed", device)


async def close_evaluator(budget: float = 2.0) -> None:
    """Shutdown hook: store what the running loop's evaluator decided, stop its timers."""
    evaluator = current_evaluator()
    if evaluator is not None:
        await asyncio.wait_for(evaluator.close(), max(0.1, budget))
