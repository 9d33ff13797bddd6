"""The MQTT device consumer: one instance per device, parses its topics, feeds the pipeline.

Every message is handled on its own: a rejection is counted by reason
(``gateway_messages_rejected_total{reason}``) and in the device's rejection record
(devices/telemetry/rejections.py), and the next message goes through as usual; an
unexpected exception is counted as ``consumer_error`` and logged, and the instance lives on.

Commands (`devices.commands.service`) are delivered only while the device is reachable: the instance
tracks the device's online state from what it hears (any telemetry or ack → online; the
``status`` topic, e.g. its Last Will, → online/offline; nothing heard yet, or nothing since the
broker connection was lost → unknown) and whether the broker is connected. Otherwise a command
stays pending (held); it goes out when the device turns online while the broker is connected:
one query for the held commands per such transition, never one per message.

Several bridges in a shared group each get some of a device's messages, so each change of
state is also sent to the device's group (``device.state``, with the time it was heard): every
instance serving the device adopts the newest news, whichever bridge heard it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from django.conf import settings

from devices.commands import service as commands
from devices.commands.timers import get_timers
from devices.conventions.mirror import is_mirror_echo
from devices.models import Transport
from devices.telemetry.parsing import (
    Ack,
    parse_ack,
    parse_metric_value,
    parse_status,
    parse_telemetry,
    valid_device_id,
    valid_metric_name,
)
from devices.telemetry.pipeline import get_pipeline
from gateway.exceptions import BrokerUnavailable, Rejected
from gateway.metrics import MESSAGES_REJECTED
from gateway.mqtt.consumer import MqttConsumer

logger = logging.getLogger(__name__)

TELEMETRY = "devices/{device_id}/telemetry"
METRIC = "devices/{device_id}/telemetry/{metric}"
STATUS = "devices/{device_id}/status"
ACK = "devices/{device_id}/commands/ack"
PATTERNS = [TELEMETRY, METRIC, STATUS, ACK]
#: Longest wait for the channel layer when sharing a change of the device's state.
SHARE_TIMEOUT = 1.0
#: Rejection lines logged per window at most, whatever the number of devices and reasons.
REJECTION_LINES, REJECTION_WINDOW = 20, 60.0
_rejection_log = {"window": 0.0, "lines": 0, "suppressed": 0}


def log_rejection(label: str, device_id: str, topic: str | None, exc: Rejected) -> None:
    """Log a device's first rejection of a reason, at most `REJECTION_LINES` per window."""
    now = time.monotonic()
    state = _rejection_log
    if now - state["window"] >= REJECTION_WINDOW:
        if state["suppressed"]:
            logger.warning("%d more rejected messages not logged", state["suppressed"])
        state.update(window=now, lines=0, suppressed=0)
    if state["lines"] >= REJECTION_LINES:
        state["suppressed"] += 1
        return
    state["lines"] += 1
    logger.warning(
        "%s %s: %s rejected (%s): %s; further %s rejections of it are only counted",
        label,
        device_id[:80],
        (topic or "")[:120],
        exc.reason,
        exc,
        exc.reason,
    )


class DeviceConsumer(MqttConsumer):
    """One device's native topics (docs/interface.md §3.1): telemetry, metrics, status, acks."""

    transport = Transport.MQTT.value
    #: The device's state as last heard, here or by another bridge (None: nothing heard yet).
    online: bool | None = None
    #: When that was heard (epoch s): older news from another bridge does not override it.
    online_at: float = 0.0
    #: Whether the broker session is up (commands can be published).
    broker_up: bool = False
    #: Rejection reasons already logged for this device (the first of each is logged).
    logged_reasons: frozenset[str] = frozenset()

    # Remembered in plain attributes, not `cached_property`: that writes through `__dict__`,
    # which gives each of thousands of instances a dict object of its own.
    _device_id: str | None = None
    _valid: bool | None = None

    @property
    def device_id(self) -> str:
        """The device this instance serves (the route's key parameter)."""
        device_id = self._device_id
        if device_id is None:
            kwargs = self.scope.get("url_route", {}).get("kwargs", {})
            device_id = self._device_id = str(kwargs.get("device_id", ""))
        return device_id

    @property
    def valid(self) -> bool:
        """Whether the device id is valid; an invalid one only ever counts rejections."""
        valid = self._valid
        if valid is None:
            valid = self._valid = valid_device_id(self.device_id)
        return valid

    @property
    def max_bytes(self) -> int:
        return settings.GATEWAY["MAX_PAYLOAD_BYTES"]

    def get_groups(self) -> list[str]:
        """``device.<id>``, where commands for this device arrive (none for a bad id)."""
        return [f"device.{self.device_id}"] if self.valid else []

    #: Names this convention in log lines.
    label = "device"

    async def mqtt_message(self, event: dict[str, Any]) -> None:
        """Handle one message by the pattern it matched; count it if rejected.

        The boundary every convention shares: a bad id, a rejection or a bug costs this one
        message (counted by reason), never the device or the next message.
        """
        if event.get("payload") == b"":
            return  # clears a retained topic (`mosquitto_pub -r -n`): no message, no error
        if not self.valid:
            MESSAGES_REJECTED.labels(reason="bad_device_id").inc()
            return
        if is_mirror_echo(event["topic"], event["payload"], event.get("properties")):
            return  # our own mirror of a serial device: already stored by the serial bridge
        try:
            await self.handle_message(event.get("pattern"), event)
        except Rejected as exc:
            MESSAGES_REJECTED.labels(reason=exc.reason).inc()
            get_pipeline().submit_rejection(self.device_id, exc.reason, str(exc))
            if exc.reason not in self.logged_reasons:
                self.logged_reasons = self.logged_reasons | {exc.reason}
                log_rejection(self.label, self.device_id, event.get("topic"), exc)
        except Exception:
            MESSAGES_REJECTED.labels(reason="consumer_error").inc()
            get_pipeline().submit_rejection(self.device_id, "consumer_error", "gateway error")
            logger.exception(
                "%s %s: error handling %r", self.label, self.device_id, event.get("topic")
            )

    async def handle_message(self, pattern: str | None, event: dict[str, Any]) -> None:
        """One native message (docs/interface.md §3.1); raises `Rejected` for bad input.

        A retained message replayed on subscribe is the device's state, not news of it
        (docs/retained-and-presence.md): stored once (with its own ``ts``; without one it only
        fills latest values), and no evidence that the device is alive, except its status.
        """
        payload = event["payload"]
        replayed = bool(event.get("retain"))
        if pattern == TELEMETRY:
            t = parse_telemetry(payload, time.time(), self.max_bytes)
            get_pipeline().submit_reading(
                self.device_id,
                self.transport,
                t.ts if t.stamped or not replayed else None,
                t.metrics,
                source=TELEMETRY,
                durable=self.defer_ack(),
                presence=not replayed,
            )
            if not replayed:
                await self.set_online(True)
        elif pattern == METRIC:
            name = event["params"].get("metric")
            if not valid_metric_name(name):
                raise Rejected("bad_value", f"bad metric name {name!r}")
            value = parse_metric_value(payload)
            get_pipeline().submit_reading(
                self.device_id,
                self.transport,
                None if replayed else time.time(),
                {name: value},
                source=METRIC,
                durable=self.defer_ack(),
                presence=not replayed,
            )
            if not replayed:
                await self.set_online(True)
        elif pattern == STATUS:
            online = parse_status(payload)
            get_pipeline().submit_status(
                self.device_id,
                self.transport,
                online,
                time.time(),
                source=STATUS,
                durable=self.defer_ack(),
            )
            await self.set_online(online)
        elif pattern == ACK:
            ack = parse_ack(payload, self.max_bytes)
            if replayed:
                return  # an old answer kept by the broker; a live one is never replayed
            await self.set_online(True)
            await self.handle_ack(ack)
        else:
            raise Rejected("bad_topic", f"no handler for pattern {pattern!r}")

    async def handle_ack(self, ack: Ack) -> None:
        """Finish the command the ack names (command service); unknown ids are rejected."""
        if not await commands.apply_ack(self.device_id, ack.id, ack.ok, ack.result, ack.error):
            raise Rejected("unknown_command", f"no command {ack.id!r} awaiting an ack")

    async def set_online(self, online: bool) -> None:
        """Track the device's state; on a change to online, send the commands held for it.

        A change is also told to the other instances of this device (other bridges of a
        shared group, `device_state`), so none of them sends to a device this one saw go
        offline, and each sees the next change to online as one.
        """
        self.online_at = time.time()
        if online == self.online:
            return
        self.online = online
        if self.channel_layer is not None and self.valid:
            event = {"type": "device.state", "online": online, "at": self.online_at}
            try:
                async with asyncio.timeout(SHARE_TIMEOUT):
                    await self.channel_layer.group_send(
                        f"device.{self.device_id}", {**event, "origin": self.channel_name}
                    )
            except Exception as exc:  # the layer is down: this bridge still decides alone
                logger.debug("device %s: state not shared: %r", self.device_id, exc)
        if online and self.broker_up:
            await self.deliver_held()

    async def device_state(self, event: dict[str, Any]) -> None:
        """Another instance of this device (another bridge) heard it change state: adopt
        that if it is newer than what this one heard. Held commands are its business.

        An offline is also stored from here, after whatever this bridge still holds of the
        device: an earlier reading committed later would otherwise mark it online again.
        """
        if event.get("origin") == self.channel_name:
            return
        at = event.get("at")
        if isinstance(at, int | float) and at > self.online_at:
            self.online, self.online_at = bool(event.get("online")), float(at)
            if not self.online:
                get_pipeline().submit_status(self.device_id, self.transport, False, float(at))

    async def deliver_held(self) -> None:
        """Send this device's pending commands, oldest first (`commands.deliver_pending`)."""
        try:
            await commands.deliver_pending(self.device_id, self.send_command)
        except Exception:
            logger.exception("device %s: delivering held commands failed", self.device_id)

    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        """Broker session (re-)established: send commands held while it was down.

        A new instance gets this before its first message: the device's state is unknown
        then, and held commands wait for that message (a retained ``offline`` must not
        trigger a send). Also starts the command timers (restart recovery).
        """
        self.broker_up = True
        if not self.valid:
            return
        get_timers()
        if self.online:
            await self.deliver_held()

    async def mqtt_disconnect(self, message: dict[str, Any]) -> None:
        """Broker connection lost: hold commands until the device is heard again.

        What we knew of the device is stale now (the broker may have restarted and lost it,
        the device may reconnect later than we do), so its state becomes unknown: after the
        reconnect, its retained ``status`` (replayed on subscribe) or its next message decides.
        """
        self.broker_up = False
        self.online = None

    async def device_command(self, event: dict[str, Any]) -> None:
        """A command for this device (group ``device.<id>``), published by `send_command`.

        ``{"type": "device.command", "id": …}`` goes through the command service: claimed and
        sent once when the device is online and the broker connected, else left pending (held)
        for the next transition. One that carries ``name``/``args`` is published as is.
        """
        try:
            if "name" in event:
                command = {"id": event.get("id"), "name": event["name"], "args": event.get("args")}
                await self.send_command(command)
            elif self.online and self.broker_up:
                await commands.deliver(event["id"], self.send_command)
            else:
                logger.debug(
                    "device %s: command %s held (device %s, broker %s)",
                    self.device_id,
                    event.get("id"),
                    {None: "not heard yet", False: "offline"}.get(self.online, "online"),
                    "up" if self.broker_up else "down",
                )
        except Exception:
            logger.exception("device %s: command %r not delivered", self.device_id, event.get("id"))

    async def send_command(self, command: dict[str, Any]) -> None:
        """Publish ``{"id", "name", "args"}`` to ``devices/<id>/commands``, QoS 1, not retained;
        ConnectionError while the broker is unavailable (the service holds the command)."""
        body = {"id": command["id"], "name": command["name"], "args": command.get("args") or {}}
        try:
            await self.publish(
                f"devices/{self.device_id}/commands", orjson.dumps(body), qos=1, retain=False
            )
        except BrokerUnavailable as exc:
            raise ConnectionError(str(exc) or "broker unavailable") from exc
