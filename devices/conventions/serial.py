"""`SerialDeviceConsumer`: a device on a serial port is the same kind of device as an MQTT one.

Registered and online while its port is open, offline when the port goes; its lines become readings
in the same pipeline (history, dashboards); commands for it arrive on group ``device.<id>`` and are
written to the port as one JSON line; ack lines go to the command service
(`devices.commands.service`). Mirrored to the broker by `devices.conventions.mirror` unless
mirroring is off.

Device id: the port's ``device`` option; else derived from the port name — the last path
segment (``/dev/ttyUSB0`` → ``ttyUSB0``, ``/dev/serial/by-id/usb-FTDI_…-port0`` → that name),
or ``<scheme>-<host>-<port>`` for URLs (``socket://10.0.0.5:7000`` → ``socket-10-0-0-5-7000``,
``loop://`` → ``loop``); every character outside ``[A-Za-z0-9_-]`` becomes ``-``, runs of ``-``
collapse, and the result is cut to 64 characters. Either way it must pass the device id rule.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import orjson

from devices.commands import service as commands
from devices.conventions.codecs import decode_frame
from devices.conventions.mirror import get_mirror
from devices.telemetry.parsing import Ack, valid_device_id
from devices.telemetry.pipeline import get_pipeline
from gateway.exceptions import Rejected
from gateway.metrics import MESSAGES_REJECTED
from gateway.serial.consumer import SerialConsumer

logger = logging.getLogger(__name__)

_INVALID = re.compile(r"[^A-Za-z0-9_-]+")


def derive_device_id(port: str) -> str:
    """The device id of a port without a ``device`` option (rule in the module docstring)."""
    if "://" in port:
        scheme, _, rest = port.partition("://")
        name = f"{scheme}-{rest.strip('/')}" if rest.strip("/") else scheme
    else:
        name = port.rstrip("/").rsplit("/", 1)[-1]
    name = _INVALID.sub("-", name).strip("-")[:64].strip("-")
    return name or "serial"


def device_id_for_scope(scope: dict[str, Any]) -> str:
    """The device bound to a serial scope; ValueError when the configured id is invalid."""
    device = scope.get("device") or derive_device_id(scope["port"])
    if not valid_device_id(device):
        raise ValueError(
            f"serial port {scope['port']!r}: device id {device!r} is not 1-64 characters "
            "of A-Z a-z 0-9 _ -"
        )
    return device


def mark_configured_offline(specs: Iterable[Any]) -> list[str]:
    """At bridge start: every configured port's device is offline until its port opens.

    Registers a configured device before it ever spoke, and corrects the stale ``online`` a
    gateway that died uncleanly left in the database and in the retained mirror topic (no
    per-device Last Will covers mirrored devices; docs/asgi-serial.md). Needs a running loop;
    returns the device ids (invalid ones are skipped, their consumer reports them).
    """
    devices = []
    for spec in specs:
        try:
            devices.append(device_id_for_scope(spec.as_scope()))
        except ValueError:
            continue
    if devices:
        pipeline, mirror, now = get_pipeline(), get_mirror(), time.time()
        for device_id in devices:
            pipeline.submit_status(device_id, SerialDeviceConsumer.transport, False, now)
            if mirror is not None:
                mirror.status(device_id, False)
    return devices


class SerialDeviceConsumer(SerialConsumer):
    """One serial device: lines → readings/acks, `device.command` → one JSON line."""

    transport = "serial"

    @property
    def device_id(self) -> str | None:
        """The bound device id, or None when the configured one is invalid."""
        if not hasattr(self, "_device_id"):
            try:
                self._device_id: str | None = device_id_for_scope(self.scope)
            except ValueError as exc:
                logger.error("%s", exc)
                self._device_id = None
        return self._device_id

    def get_groups(self) -> list[str]:
        """``device.<id>``, where commands for this device arrive (none for a bad id)."""
        return [f"device.{self.device_id}"] if self.device_id else []

    async def connect(self) -> None:
        """Port open: the device is online; commands held while it was away go out now."""
        self._set_online(True)
        if self.device_id is not None:
            try:
                await commands.deliver_pending(self.device_id, self.send_command)
            except Exception:
                logger.exception("device %s: delivering held commands failed", self.device_id)

    async def disconnect(self, reason: str) -> None:
        """Port lost, closed or shutting down: the device is offline."""
        self._set_online(False)

    def _set_online(self, online: bool) -> None:
        device_id = self.device_id
        if device_id is None:
            return
        get_pipeline().submit_status(device_id, self.transport, online, time.time())
        mirror = get_mirror()
        if mirror is not None:
            mirror.status(device_id, online)

    async def receive_frame(self, data: bytes, ts: float) -> None:
        """Decode a line: telemetry to the pipeline (and mirror), an ack to the commands."""
        device_id = self.device_id
        if device_id is None:
            MESSAGES_REJECTED.labels(reason="bad_device_id").inc()
            return
        try:
            decoded = decode_frame(data, ts)
            if decoded is None:
                return
            if isinstance(decoded, Ack):
                await self.handle_ack(decoded)
                return
            get_pipeline().submit_reading(device_id, self.transport, decoded.ts, decoded.metrics)
            mirror = get_mirror()
            if mirror is not None:
                mirror.telemetry(device_id, decoded.ts, decoded.metrics)
        except Rejected as exc:
            MESSAGES_REJECTED.labels(reason=exc.reason).inc()
            get_pipeline().submit_rejection(device_id, exc.reason, str(exc))
            logger.debug("device %s: line rejected (%s): %r", device_id, exc, data[:80])
        except Exception:
            MESSAGES_REJECTED.labels(reason="consumer_error").inc()
            get_pipeline().submit_rejection(device_id, "consumer_error", "gateway error")
            logger.exception("device %s: error handling line %r", device_id, data[:80])

    async def handle_ack(self, ack: Ack) -> None:
        """Finish the command the ack names; an unknown or finished id is rejected."""
        if not await commands.apply_ack(self.device_id, ack.id, ack.ok, ack.result, ack.error):
            raise Rejected("unknown_command", f"no command {ack.id!r} awaiting an ack")

    async def device_state(self, event: dict[str, Any]) -> None:
        """An MQTT instance of the same id shares what it heard (group ``device.<id>``).

        Ignored: a serial device is online exactly while its port is open.
        """

    async def device_command(self, event: dict[str, Any]) -> None:
        """A command for this device (group ``device.<id>``): deliver it as one JSON line.

        ``{"type": "device.command", "id": …}`` goes through the command service (claimed,
        sent once, held if the port is gone); a message that already carries ``name``/``args``
        is written as is.
        """
        try:
            if "name" in event:
                await self.send_command(
                    {"id": event.get("id"), "name": event["name"], "args": event.get("args") or {}}
                )
            else:
                await commands.deliver(event["id"], self.send_command)
        except Exception:
            logger.exception("device %s: command %r not delivered", self.device_id, event.get("id"))

    async def send_command(self, command: dict[str, Any]) -> None:
        """Write ``{"id", "name", "args"}`` as ONE line (ConnectionError if the port closed)."""
        line = {"id": command["id"], "name": command["name"], "args": command.get("args") or {}}
        framing = self.scope.get("framing") or {}
        end = framing.get("delimiter", b"\n") if framing.get("mode") == "delimiter" else b"\n"
        await self.write(orjson.dumps(line) + end)
