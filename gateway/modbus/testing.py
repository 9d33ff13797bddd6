"""`ModbusCommunicator`: drive a `modbus` application in tests, like WebsocketCommunicator."""

# ruff: noqa: ASYNC109  (timeouts mirror ApplicationCommunicator's API)

from __future__ import annotations

import time
from typing import Any

from channels.testing import ApplicationCommunicator

from gateway.modbus.events import ASGI, validate_app_event
from gateway.modbus.profile import Profile


class ModbusCommunicator(ApplicationCommunicator):
    """Builds the scope the server would for one unit and validates what the app sends.

    `ModbusCommunicator(app, profile, device="meter-1", unit=1)`; then `connect()`,
    `send_read([...blocks])`, `receive_write()`, `send_written(ref, ok)`, `disconnect()`.
    """

    def __init__(
        self, application: Any, profile: Profile, *, device: str, unit: int = 1, bus: str = "test"
    ) -> None:
        self.scope = {
            "type": "modbus",
            "asgi": dict(ASGI),
            "bus": bus,
            "unit": unit,
            "device": device,
            "profile": profile.as_scope(),
            "interval": 1.0,
        }

        async def validating_app(scope: dict[str, Any], receive: Any, send: Any) -> Any:
            async def checked_send(event: Any) -> None:
                await send(validate_app_event(event))

            return await application(scope, receive, checked_send)

        super().__init__(validating_app, self.scope)

    async def connect(self) -> None:
        """Tell the app its unit answers (`modbus.connect`)."""
        await self.send_input({"type": "modbus.connect"})

    async def send_read(self, blocks: list[dict[str, Any]], ts: float | None = None) -> None:
        """Deliver one poll's `modbus.read`."""
        await self.send_input({"type": "modbus.read", "ts": ts or time.time(), "blocks": blocks})

    async def receive_write(self, timeout: float = 1) -> dict[str, Any]:
        """The next event the app sent, which must be a `modbus.write`."""
        event = await self.receive_output(timeout)
        assert event["type"] == "modbus.write", f"expected modbus.write, got {event!r}"
        return event

    async def send_written(self, ref: Any, ok: bool, error: str | None = None) -> None:
        """Answer a write (`modbus.written`)."""
        await self.send_input({"type": "modbus.written", "ref": ref, "ok": ok, "error": error})

    async def disconnect(self, reason: str = "offline", timeout: float = 1) -> None:
        """Send `modbus.disconnect` and wait for the app to return (raises if it raised)."""
        await self.send_input({"type": "modbus.disconnect", "reason": reason, "error": None})
        await self.wait(timeout)
