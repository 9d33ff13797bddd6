"""`ModbusConsumer`: the base class for applications of the `modbus` protocol.

One instance serves one online period of one unit: `modbus.connect`, then `modbus.read` per
poll and `modbus.written` per write it asked for, then `modbus.disconnect`, after which it
stops. It has a channel name and may join groups (e.g. `device.<id>`).
"""

from __future__ import annotations

from typing import Any

from channels.exceptions import StopConsumer

from gateway.consumer import BridgeConsumer


class ModbusConsumer(BridgeConsumer):
    """Dispatches `modbus.*` events to hooks; `write()` asks the bus for a write."""

    async def modbus_connect(self, message: dict[str, Any]) -> None:
        await self.connect()

    async def modbus_read(self, message: dict[str, Any]) -> None:
        await self.receive_read(message["blocks"], message["ts"])

    async def modbus_written(self, message: dict[str, Any]) -> None:
        await self.written(message.get("ref"), message["ok"], message.get("error"))

    async def modbus_disconnect(self, message: dict[str, Any]) -> None:
        await self.disconnect(message.get("reason", "lost"), message.get("error"))
        raise StopConsumer()

    # --- hooks ------------------------------------------------------------------------
    async def connect(self) -> None:
        """The unit answered (first event of the instance)."""

    async def receive_read(self, blocks: list[dict[str, Any]], ts: float) -> None:
        """One poll's raw blocks: ``{"table", "address", "registers" | "bits"}``."""

    async def written(self, ref: Any, ok: bool, error: str | None) -> None:
        """The answer to a `write()`: ok, or the error (exception response, timeout, lost)."""

    async def disconnect(self, reason: str, error: str | None) -> None:
        """The unit went `offline`, the bus was `lost`, or the server stops (`shutdown`)."""

    # --- talking back -----------------------------------------------------------------
    async def write(self, table: str, address: int, values: list[Any], ref: Any = None) -> None:
        """Queue a write on the bus (ConnectionError while the unit or bus is away)."""
        await self.send(
            {
                "type": "modbus.write",
                "table": table,
                "address": address,
                "values": values,
                "ref": ref,
            }
        )
