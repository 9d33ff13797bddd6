"""`UnitSession`: one online period of one Modbus unit — its application instance and inbox.

Started by the bus (gateway/modbus/server.py) at the unit's first answer with `modbus.connect`;
ended with `modbus.disconnect`. The application's `modbus.write` goes back to the bus's queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from gateway.metrics import CONSUMER_ERRORS, MESSAGES_REJECTED, MODBUS_READS_DROPPED
from gateway.modbus.events import ASGI, validate_app_event

logger = logging.getLogger("gateway.modbus")

#: Events waiting for one unit's instance; past it the oldest `modbus.read` is dropped.
INBOX_LIMIT = 64


class UnitSession:
    """One online period of a unit: the application instance and its inbox."""

    def __init__(self, runner: Any, unit: Any) -> None:
        self.runner, self.unit = runner, unit
        self.items: deque[dict[str, Any]] = deque()
        self.ended = False
        self._waiter: asyncio.Future[None] | None = None
        scope = {
            "type": "modbus",
            "asgi": dict(ASGI),
            "bus": runner.bus.port,
            "unit": unit.config.unit,
            "device": unit.config.device,
            "profile": unit.config.profile.as_scope(),
            "interval": unit.config.interval,
        }
        self.put({"type": "modbus.connect"})
        self.task = asyncio.create_task(
            runner.server.application(scope, self._receive, self._send),
            name=f"modbus[{runner.bus.port}#{unit.config.unit}].instance",
        )
        self.task.add_done_callback(self._instance_done)

    def _instance_done(self, task: asyncio.Task[None]) -> None:
        """An instance that ends while its unit is online crashed: count it; the unit's next
        answer starts a new one (with `modbus.connect`)."""
        if self.ended or task.cancelled():
            return
        self.ended = True
        CONSUMER_ERRORS.labels(protocol="modbus").inc()
        MESSAGES_REJECTED.labels(reason="consumer_error").inc()
        logger.error(
            "modbus unit %s: application instance ended; replacing it",
            self.unit.label,
            exc_info=task.exception(),
        )

    def put(self, event: dict[str, Any]) -> None:
        """Queue an event for the instance; when full, the oldest poll makes room (counted)."""
        if len(self.items) >= INBOX_LIMIT:
            for old in self.items:
                if old["type"] == "modbus.read":
                    self.items.remove(old)
                    MODBUS_READS_DROPPED.labels(bus=self.runner.bus.port).inc()
                    break
        self.items.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _receive(self) -> dict[str, Any]:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.items.popleft()

    async def _send(self, event: dict[str, Any]) -> None:
        validate_app_event(event)
        if self.ended or self.task.done():
            raise ConnectionError(f"modbus unit {self.unit.label} is offline")
        self.runner.submit_write(self, event)

    async def end(self, reason: str, error: str | None, grace: float) -> None:
        """Deliver `modbus.disconnect` and wait for the instance to return (else cancel it)."""
        if self.ended:  # it crashed earlier: nothing to tell
            return
        self.ended = True
        self.put({"type": "modbus.disconnect", "reason": reason, "error": error})
        if not self.task.done():
            done, _ = await asyncio.wait({self.task}, timeout=grace)
            if not done:
                self.task.cancel()
                await asyncio.wait({self.task}, timeout=1.0)
        if self.task.done() and not self.task.cancelled() and self.task.exception():
            CONSUMER_ERRORS.labels(protocol="modbus").inc()
            logger.error(
                "modbus unit %s: instance failed on disconnect",
                self.unit.label,
                exc_info=self.task.exception(),
            )
