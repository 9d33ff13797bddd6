"""An in-process MQTT bridge (`MqttServer`) serving for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from gateway.mqtt.server import MqttServer


@contextlib.asynccontextmanager
async def running(server: MqttServer, stop: float = 4.0) -> AsyncIterator[MqttServer]:
    """`server.serve()` in the background, connected before the block; shut down (given `stop`
    seconds) and finished after it."""
    task = asyncio.create_task(server.serve())
    try:
        await server.wait_connected(10)
        yield server
    finally:
        await server.shutdown(stop)
        await asyncio.wait_for(task, 5)
