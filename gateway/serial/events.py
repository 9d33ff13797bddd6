"""The `serial` ASGI events (docs/asgi-serial.md): their shapes and validation.

Shared by the interface server and `SerialCommunicator`, so a consumer unit test fails on the
same bad event the real server would refuse.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from gateway.exceptions import InvalidEvent

ASGI = {"version": "3.0", "spec_version": "1.0"}


class ConnectEvent(TypedDict):
    type: Literal["serial.connect"]


class FrameEvent(TypedDict):
    type: Literal["serial.frame"]
    bytes: bytes
    ts: float  # epoch seconds when the frame's last bytes arrived


class DisconnectEvent(TypedDict):
    type: Literal["serial.disconnect"]
    reason: Literal["lost", "closed", "shutdown"]
    error: str | None


class WriteEvent(TypedDict):
    type: Literal["serial.write"]
    bytes: bytes


class CloseEvent(TypedDict):
    type: Literal["serial.close"]
    reopen: NotRequired[bool]


def validate_app_event(event: Any) -> dict[str, Any]:
    """Check an event an application sends; raise InvalidEvent naming what is wrong."""
    if not isinstance(event, dict) or "type" not in event:
        raise InvalidEvent(f"serial app event must be a dict with a 'type', got {event!r}")
    kind = event["type"]
    if kind == "serial.write":
        data = event.get("bytes")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidEvent("serial.write needs 'bytes' of type bytes")
        return event
    if kind == "serial.close":
        if not isinstance(event.get("reopen", True), bool):
            raise InvalidEvent("serial.close 'reopen' must be a bool")
        return event
    raise InvalidEvent(f"unknown serial app event type {kind!r}")
