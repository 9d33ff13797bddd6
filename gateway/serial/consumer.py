"""`SerialConsumer`: the base class for applications of the `serial` protocol.

One instance serves one open period of one port (like a WebSocket consumer serves one
connection): `serial.connect`, then `serial.frame` per frame, then `serial.disconnect`, after
which it stops. It has a channel name and may join groups (e.g. `device.<id>`).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer


class SerialConsumer(AsyncConsumer):
    """Dispatches `serial.*` events to hooks; `write()` and `close()` talk back to the port."""

    #: Channel-layer groups this instance joins on start and leaves on stop.
    groups: ClassVar[list[str]] = []

    def get_groups(self) -> list[str]:
        """The groups to join; override to compute them from `self.scope`."""
        return list(self.groups)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the instance, leaving its groups whatever way it ends."""
        self._joined: list[str] = []
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._joined:
                # Shielded: the server may cancel an instance that ignores serial.disconnect.
                await asyncio.shield(self._leave_groups())

    async def _leave_groups(self) -> None:
        for group in self._joined:
            await self.channel_layer.group_discard(group, self.channel_name)
        self._joined = []

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Call the handler for `message["type"]`, without Channels' per-message thread hop.

        As in `MqttConsumer`: serial consumers hand readings to the telemetry pipeline and
        never touch the ORM directly, so `aclose_old_connections()` per frame is pure cost.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        if not self._joined and self.channel_layer is not None:
            groups = self.get_groups()
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)
            self._joined = groups
        await handler(message)

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
