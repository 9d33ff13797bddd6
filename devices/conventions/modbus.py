"""`ModbusDeviceConsumer`: a Modbus unit is a device like any other (docs/interface.md §7).

One instance per unit and online period (gateway/modbus/server.py starts it at the unit's first
answer). Each poll's raw registers/bits are decoded per the unit's profile
(`devices.conventions.modbus_codec`) into one reading named by the profile's points, submitted
to the telemetry pipeline and mirrored to the broker like a serial device. Online while the unit
answers; offline when it stops answering, its bus is lost or the gateway stops.

Commands: ``{"name": POINT, "args": {"value": V}}`` for a writable point is one Modbus write;
the unit's answer acks it (result ``{"value": V}``), an exception response, a timeout or a lost
bus fails it. Any other name or args fails at once with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from devices.commands import service as commands
from devices.conventions.mirror import get_mirror
from devices.conventions.modbus_codec import PointError, decode_blocks, encode_write
from devices.telemetry.pipeline import get_pipeline
from gateway.metrics import MESSAGES_REJECTED
from gateway.modbus.consumer import ModbusConsumer
from gateway.modbus.profile import Point

logger = logging.getLogger(__name__)

_BACKGROUND: set[asyncio.Task[None]] = set()


def mark_units_offline(device_ids: Iterable[str]) -> None:
    """At bridge start: every configured unit's device is offline until it answers."""
    pipeline, mirror, now = get_pipeline(), get_mirror(), time.time()
    for device_id in device_ids:
        pipeline.submit_status(device_id, ModbusDeviceConsumer.transport, False, now)
        if mirror is not None:
            mirror.status(device_id, False)


class ModbusDeviceConsumer(ModbusConsumer):
    """One unit: polls → readings, `device.command` → one write acked by its answer."""

    transport = "modbus"

    @property
    def device_id(self) -> str:
        """The device id the configuration gave this unit."""
        return self.scope["device"]

    @property
    def points(self) -> list[Point]:
        """The unit's profile points."""
        if not hasattr(self, "_points"):
            self._points = [Point(**p) for p in self.scope["profile"]["points"]]
            self._writes: dict[str, Any] = {}
        return self._points

    def get_groups(self) -> list[str]:
        """``device.<id>``, where commands for this unit arrive."""
        return [f"device.{self.device_id}"]

    async def connect(self) -> None:
        """The unit answers: online; commands held while it was away go out now."""
        self._set_online(True)
        try:
            await commands.deliver_pending(self.device_id, self.send_command)
        except Exception:
            logger.exception("device %s: delivering held commands failed", self.device_id)

    async def disconnect(self, reason: str, error: str | None) -> None:
        """Offline (unit silent, bus lost, shutdown); writes still awaiting end by their timers."""
        self._set_online(False)

    def _set_online(self, online: bool) -> None:
        get_pipeline().submit_status(self.device_id, self.transport, online, time.time())
        mirror = get_mirror()
        if mirror is not None:
            mirror.status(self.device_id, online)

    async def receive_read(self, blocks: list[dict[str, Any]], ts: float) -> None:
        """One poll: decode every point into one reading."""
        try:
            metrics = decode_blocks(self.points, blocks)
        except Exception as exc:
            MESSAGES_REJECTED.labels(reason="bad_value").inc()
            get_pipeline().submit_rejection(self.device_id, "bad_value", f"poll: {exc}")
            logger.exception("device %s: cannot decode a poll", self.device_id)
            return
        if not metrics:
            MESSAGES_REJECTED.labels(reason="no_metrics").inc()
            get_pipeline().submit_rejection(self.device_id, "no_metrics", "poll without a value")
            return
        get_pipeline().submit_reading(self.device_id, self.transport, ts, metrics)
        mirror = get_mirror()
        if mirror is not None:
            mirror.telemetry(self.device_id, ts, metrics)

    async def device_state(self, event: dict[str, Any]) -> None:
        """An MQTT instance of the same id shares what it heard (group ``device.<id>``).

        Ignored: a Modbus unit's presence is its answers to polls.
        """

    async def device_command(self, event: dict[str, Any]) -> None:
        """A command for this unit (group ``device.<id>``): claimed and written once."""
        try:
            await commands.deliver(event["id"], self.send_command)
        except Exception:
            logger.exception("device %s: command %r not delivered", self.device_id, event.get("id"))

    async def send_command(self, command: dict[str, Any]) -> None:
        """Put a command on the bus (ConnectionError while the unit or its bus is away)."""
        self.points  # noqa: B018 - loads the points and the write memory
        name, args, ref = command["name"], command.get("args") or {}, str(command["id"])
        point = next((p for p in self._points if p.name == name), None)
        try:
            if point is None:
                writable = ", ".join(p.name for p in self._points if p.writable) or "none"
                raise PointError(f"no point {name!r}; writable points: {writable}")
            if not isinstance(args, dict) or set(args) != {"value"}:
                raise PointError(f'{name} takes args {{"value": V}}, got {args!r}')
            table, address, values = encode_write(point, args["value"])
        except PointError as exc:
            # Failed after deliver() has marked it sent, never inside it.
            asyncio.get_running_loop().call_soon(self._finish_soon, ref, False, None, str(exc))
            return
        self._writes[ref] = args["value"]
        try:
            await self.write(table, address, values, ref=ref)
        except BaseException:
            self._writes.pop(ref, None)
            raise

    def _finish_soon(self, ref: str, ok: bool, result: Any, error: str | None) -> None:
        task = asyncio.create_task(self._finish(ref, ok, result, error))
        _BACKGROUND.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(_BACKGROUND.discard)

    async def _finish(self, ref: str, ok: bool, result: Any, error: str | None) -> None:
        if not await commands.apply_ack(self.device_id, ref, ok, result, error or ""):
            MESSAGES_REJECTED.labels(reason="unknown_command").inc()
            detail = f"no command {ref!r} awaiting a write's answer"
            get_pipeline().submit_rejection(self.device_id, "unknown_command", detail)

    async def written(self, ref: Any, ok: bool, error: str | None) -> None:
        """The unit answered a write (or it failed): the command ends acked or failed."""
        value = getattr(self, "_writes", {}).pop(str(ref), None)
        await self._finish(str(ref), ok, {"value": value} if ok else None, error)
