"""What a simulated device says and how it answers, without any I/O: the native firmware.

A `Firmware` turns clock ticks into telemetry messages and inbound commands into replies; the
`SimDevice` (device.py) owns the MQTT connection, timing and faults. Keeping the protocol pure
makes both styles (native here, Tasmota in tasmota.py) easy to read and to test.

Native convention (docs/interface.md §3): Last Will `devices/<id>/status` = `offline` (retained, QoS
1), retained `online` on connect, JSON telemetry on `devices/<id>/telemetry`, commands on
`devices/<id>/commands` acknowledged on `devices/<id>/commands/ack`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from firmware_sim.signals import SensorSignals

# Shortest telemetry interval a command may set (100 Hz) and the longest (a day).
MIN_INTERVAL = 0.01
MAX_INTERVAL = 86400.0


@dataclass(frozen=True)
class Outgoing:
    """One MQTT publication a firmware wants sent."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass
class Reply:
    """The answer to one inbound command: its acknowledgement messages and any follow-up."""

    messages: list[Outgoing] = field(default_factory=list)
    # Seconds until the device goes down for a reboot after acknowledging, or None.
    reboot_after_ack: float | None = None


class CommandError(Exception):
    """A command the firmware refuses; the message goes back to the sender."""


class Firmware:
    """Base of the device styles: shared state (signals, interval, sequence, uptime)."""

    style: ClassVar[str] = "base"

    def __init__(
        self,
        device_id: str,
        *,
        interval: float,
        rng: random.Random,
        qos: int = 0,
        reboot_delay: float = 1.0,
    ) -> None:
        self.device_id = device_id
        self.interval = _check_interval(interval)
        self.rng = rng
        self.qos = qos
        self.reboot_delay = reboot_delay
        self.signals = SensorSignals.create(rng)
        self.seq = 0
        self.boot_time = time.time()
        self.connects = 0

    @property
    def relay(self) -> bool:
        """The relay (power output) state; it only changes on command."""
        return self.signals.relay

    @relay.setter
    def relay(self, value: bool) -> None:
        self.signals.relay = bool(value)

    def boot(self) -> None:
        """A fresh start after a reboot: sequence numbers and uptime begin again."""
        self.seq = 0
        self.boot_time = time.time()

    def connected(self) -> None:
        """Called on every (re)connection, before `birth`."""
        self.connects += 1

    # The protocol every style implements.
    def will(self) -> Outgoing:
        """The Last Will the broker publishes if the device vanishes."""
        raise NotImplementedError

    def birth(self) -> list[Outgoing]:
        """Messages sent right after connecting (announce online)."""
        raise NotImplementedError

    def goodbye(self) -> Outgoing:
        """The message sent before a clean disconnect (the broker won't fire the Will then)."""
        raise NotImplementedError

    def subscriptions(self) -> list[str]:
        """Topic filters the device subscribes to (QoS 1)."""
        raise NotImplementedError

    def telemetry(self, now: float) -> list[Outgoing]:
        """The messages of one telemetry tick at epoch time `now`."""
        raise NotImplementedError

    def handle(self, topic: str, payload: bytes) -> Reply | None:
        """Answer one inbound message; None when it is not a command we can answer at all."""
        raise NotImplementedError


def _check_interval(seconds: Any) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise CommandError("seconds must be a number")
    if not math.isfinite(seconds) or not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise CommandError(f"seconds must be between {MIN_INTERVAL} and {MAX_INTERVAL:g}")
    return float(seconds)


def dumps(obj: Any) -> bytes:
    """Compact JSON as devices send it."""
    return json.dumps(obj, separators=(",", ":")).encode()


class NativeFirmware(Firmware):
    """The project's own convention: JSON telemetry and JSON commands with acks."""

    style = "native"

    @property
    def base(self) -> str:
        return f"devices/{self.device_id}"

    def will(self) -> Outgoing:
        return Outgoing(f"{self.base}/status", b"offline", qos=1, retain=True)

    def birth(self) -> list[Outgoing]:
        return [Outgoing(f"{self.base}/status", b"online", qos=1, retain=True)]

    def goodbye(self) -> Outgoing:
        return self.will()

    def subscriptions(self) -> list[str]:
        return [f"{self.base}/commands"]

    def telemetry(self, now: float) -> list[Outgoing]:
        self.seq += 1
        reading: dict[str, Any] = self.signals.sample(now)
        reading["seq"] = self.seq
        reading["ts"] = round(now, 3)
        return [Outgoing(f"{self.base}/telemetry", dumps(reading), qos=self.qos)]

    def handle(self, topic: str, payload: bytes) -> Reply | None:
        try:
            command = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(command, dict) or "id" not in command:
            return None
        reply = Reply()
        try:
            name = command.get("name")
            args = command.get("args") or {}
            if not isinstance(args, dict):
                raise CommandError("args must be an object")
            handler = getattr(self, f"cmd_{name}", None) if isinstance(name, str) else None
            if handler is None:
                raise CommandError(f"unknown command: {name!r}")
            result = handler(args, reply)
            body = {"id": command["id"], "ok": True, "result": result}
        except CommandError as exc:
            reply.reboot_after_ack = None
            body = {"id": command["id"], "ok": False, "error": str(exc)}
        reply.messages.append(Outgoing(f"{self.base}/commands/ack", dumps(body), qos=1))
        return reply

    # Commands: cmd_<name>(args, reply) -> result object.
    def cmd_set_interval(self, args: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """`{"seconds": s}`: publish telemetry every s seconds from now on."""
        self.interval = _check_interval(args.get("seconds"))
        return {"seconds": self.interval}

    def cmd_relay(self, args: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """`{"state": true|false}` switches the relay; no state toggles it."""
        state = args.get("state")
        if state is None:
            state = not self.relay
        elif not isinstance(state, bool):
            raise CommandError("state must be true or false")
        self.relay = state
        return {"relay": self.relay}

    def cmd_reboot(self, args: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """Acknowledge, say `offline`, disconnect cleanly, and come back after `delay` s."""
        delay = args.get("delay", self.reboot_delay)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 3600:
            raise CommandError("delay must be a number of seconds between 0 and 3600")
        reply.reboot_after_ack = float(delay)
        return {"rebooting": True, "delay": float(delay)}

    def cmd_status(self, args: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """The current readings, interval and uptime, without advancing the signals."""
        return {
            "relay": self.relay,
            "interval": self.interval,
            "seq": self.seq,
            "uptime": round(time.time() - self.boot_time, 3),
            "battery": round(self.signals.battery, 1),
        }
