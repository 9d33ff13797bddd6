"""The `modbus` ASGI events (docs/asgi-modbus.md): their shapes and validation."""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from gateway.exceptions import InvalidEvent

ASGI = {"version": "3.0", "spec_version": "1.0"}


class ReadEvent(TypedDict):
    type: Literal["modbus.read"]
    ts: float  # epoch seconds when the poll finished
    blocks: list[dict[str, Any]]  # {"table", "address", "registers" | "bits"}


class WrittenEvent(TypedDict):
    type: Literal["modbus.written"]
    ref: Any
    ok: bool
    error: str | None


class DisconnectEvent(TypedDict):
    type: Literal["modbus.disconnect"]
    reason: Literal["offline", "lost", "shutdown"]
    error: str | None


class WriteEvent(TypedDict):
    type: Literal["modbus.write"]
    table: Literal["coil", "holding"]
    address: int
    values: list[int] | list[bool]
    ref: NotRequired[Any]


def validate_app_event(event: Any) -> dict[str, Any]:
    """Check an event an application sends; raise InvalidEvent naming what is wrong."""
    if not isinstance(event, dict) or event.get("type") != "modbus.write":
        raise InvalidEvent(f"unknown modbus app event {event!r:.80}")
    table, address, values = event.get("table"), event.get("address"), event.get("values")
    if table not in ("coil", "holding"):
        raise InvalidEvent("modbus.write 'table' must be 'coil' or 'holding'")
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= 0xFFFF:
        raise InvalidEvent("modbus.write 'address' must be an integer 0-65535")
    limit = 1968 if table == "coil" else 123  # Modbus v1.1b3 §6.11, §6.12
    if not isinstance(values, list) or not 1 <= len(values) <= limit:
        raise InvalidEvent(f"modbus.write 'values' must be a list of 1-{limit} values")
    if address + len(values) > 0x10000:
        raise InvalidEvent("modbus.write runs past address 65535")
    if table == "coil" and not all(isinstance(v, bool) for v in values):
        raise InvalidEvent("modbus.write coil values must be booleans")
    if table == "holding" and not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF for v in values
    ):
        raise InvalidEvent("modbus.write register values must be integers 0-65535")
    return event
