"""`SerialCommunicator`: drive a `serial` application in tests, like WebsocketCommunicator."""

# ruff: noqa: ASYNC109  (timeouts mirror ApplicationCommunicator's API)

from __future__ import annotations

import time
from typing import Any

from channels.testing import ApplicationCommunicator

from gateway.serial.events import ASGI, validate_app_event
from gateway.serial.spec import parse_spec


class SerialCommunicator(ApplicationCommunicator):
    """Builds the scope the server would for `spec` and validates what the app sends.

    `SerialCommunicator(app, "loop://?device=d1")`; then `connect()`, `send_frame(b"t=1")`,
    `receive_write()`, `disconnect()`.
    """

    def __init__(self, application: Any, spec: str = "loop://") -> None:
        self.spec = parse_spec(spec)
        self.scope = {"type": "serial", "asgi": dict(ASGI), **self.spec.as_scope()}

        async def validating_app(scope: dict[str, Any], receive: Any, send: Any) -> Any:
            async def checked_send(event: Any) -> None:
                await send(validate_app_event(event))

            return await application(scope, receive, checked_send)

        super().__init__(validating_app, self.scope)

    async def connect(self) -> None:
        """Tell the app its port is open (`serial.connect`)."""
        await self.send_input({"type": "serial.connect"})

    async def send_frame(self, data: bytes | str, ts: float | None = None) -> None:
        """Deliver one `serial.frame`."""
        payload = data.encode() if isinstance(data, str) else data
        event = {"type": "serial.frame", "bytes": payload, "ts": ts or time.time()}
        await self.send_input(event)

    async def receive_write(self, timeout: float = 1) -> bytes:
        """The bytes of the next event the app sent, which must be a `serial.write`."""
        event = await self.receive_output(timeout)
        assert event["type"] == "serial.write", f"expected serial.write, got {event!r}"
        return bytes(event["bytes"])

    async def disconnect(self, reason: str = "lost", timeout: float = 1) -> None:
        """Send `serial.disconnect` and wait for the app to return (raises if it raised)."""
        await self.send_input({"type": "serial.disconnect", "reason": reason, "error": None})
        await self.wait(timeout)
