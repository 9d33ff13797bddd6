"""`SerialConsumer`: the base class for applications of the `serial` protocol.

One instance serves one open period of one port (like a WebSocket consumer serves one
connection): `serial.connect`, then `serial.frame` per frame, then `serial.disconnect`, after
which it stops. It has a channel name and may join groups (e.g. `device.<id>`).
"""

from __future__ import annotations

from typing import Any

from channels.exceptions import StopConsumer

from gateway.consumer import BridgeConsumer


class SerialConsumer(BridgeConsumer):
    """Dispatches `serial.*` events to hooks; `write()` and `close()` talk back to the port."""

    async def serial_connect(self, message: dict[str, Any]) -> None:
        await self.connect()

    async def serial_frame(self, message: dict[str, Any]) -> None:
        await self.receive_frame(message["bytes"], message["ts"])

    async def serial_disconnect(self, message: dict[str, Any]) -> None:
        await self.disconnect(message.get("reason", "lost"))
        raise StopConsumer()

    # --- hooks ------------------------------------------------------------------------
    async def connect(self) -> None:
        """The port is open."""

    async def receive_frame(self, data: bytes, ts: float) -> None:
        """One frame arrived (delimiter stripped); `ts` is its arrival time in epoch seconds."""

    async def disconnect(self, reason: str) -> None:
        """The port is gone (`lost`), closed at our request (`closed`) or the server stops."""

    # --- talking back -----------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Write bytes to the port (waits while the port's write buffer is full)."""
        await self.send({"type": "serial.write", "bytes": data})

    async def close(self, reopen: bool = True) -> None:
        """Close the port; the server reopens it after a pause unless `reopen` is False."""
        await self.send({"type": "serial.close", "reopen": reopen})
