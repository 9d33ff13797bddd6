"""Tasmota devices: their topics mapped onto the same devices, metrics, status and commands.

A device running Tasmota (default FullTopic ``%prefix%/%topic%/``, its MQTT Topic being the
device id) is a device like any other (docs/interface.md §3.2):

- ``tele/<id>/SENSOR`` and ``tele/<id>/STATE`` → a reading: nested objects flattened with
  ``.`` (``AM2301.Temperature``, ``Wifi.RSSI``); numbers, booleans and ``ON``/``OFF``
  (``POWER1``, ``Switch1``) are metrics, lists one metric per channel (``ENERGY.Power.1``),
  ``Time``/``Epoch`` the reading's time; other strings and null are ignored
  (devices/conventions/tasmota_payloads.py).
- ``tele/<id>/LWT`` → status: ``Online`` / ``Offline`` (case-insensitive).
- ``stat/<id>/POWER[<n>]`` → a reading ``{"POWER[<n>]": true|false}`` (a relay switched);
  with SetOption4 its JSON form ``{"POWER":"ON"}`` is also the answer to a Power command.
- ``stat/<id>/RESULT`` → the answer to a command awaiting one (below).
- ``stat/<id>/STATUS[<n>]`` → the answer to a ``Status`` command (Tasmota answers it there).
- ``stat/<id>/<COMMAND>`` (SetOption4 1: answers there instead of RESULT, e.g.
  ``stat/<id>/POWERONSTATE {"PowerOnState":3}``) → the answer to an awaiting command of that
  name; other ``stat/<id>/…`` topics (``LOGGING``, ``UPGRADE``…) are not ours and are ignored
  without counting.

Any MQTT Topic Tasmota accepts is accepted: one that is not a device id (``living.room``) maps
to a stable valid one, and the topic is kept as the device's name. A retained message replayed
on subscribe (SensorRetain, StateRetain, PowerRetain) is state, not news: stored once, and no
evidence the device is alive; the retained LWT is (docs/retained-and-presence.md).

Commands. ``{"name": N, "args": A}`` is published on ``cmnd/<id>/<N>`` (QoS 1, not retained)
with the payload taken from ``A``: ``{}`` → empty (Tasmota's query), ``{"value": v}`` → ``v`` as
text (``true``/``false`` → ``ON``/``OFF``, numbers as JSON numbers, strings as they are, objects
and lists as JSON), anything else → ``A`` as a JSON object (the device judges it). Tasmota has no
command id, so the consumer remembers what it sent, in order: a RESULT acks the oldest awaiting
command whose name matches one of the RESULT's keys (case-insensitive, a trailing relay index
ignored: ``Power`` ↔ ``POWER1``), else the oldest awaiting one (``State`` answers with the STATE
object); ``{"Command": "Unknown"}`` / ``{"Command": "Error"}`` fail the oldest. The RESULT object
is the command's result. A RESULT while nothing awaits (a button pressed on the device) only
updates nothing; its ``stat/<id>/POWER`` twin records the relay.

The memory of sent commands lives in the consumer instance: if the instance is retired (idle),
awaiting commands end by their timeout. A device id that publishes both the native and the
Tasmota convention is one device: readings and status from both merge into it, and each command
is sent exactly once, on whichever convention's consumer claims it first (both serve group
``device.<id>``), so the convention is not predictable: give such devices distinct ids.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from functools import cached_property
from typing import Any

import orjson
from channels.db import database_sync_to_async

from devices.commands import service as commands
from devices.conventions.native import DeviceConsumer
from devices.conventions.tasmota_payloads import device_id_for, parse_tasmota, switch_state
from devices.models import Device
from devices.telemetry.parsing import (
    Metrics,
    load_object,
    parse_status,
)
from devices.telemetry.pipeline import get_pipeline
from gateway.exceptions import BrokerUnavailable, Rejected

logger = logging.getLogger(__name__)

SENSOR = "tele/{device_id}/SENSOR"
STATE = "tele/{device_id}/STATE"
LWT = "tele/{device_id}/LWT"
STAT = "stat/{device_id}/{kind}"
PATTERNS = [SENSOR, STATE, LWT, STAT]

POWER_KEY = re.compile(r"^POWER[0-9]*\Z", re.IGNORECASE)  # \Z: "POWER\n" is no relay
STATUS_KIND = re.compile(r"^STATUS[0-9]*\Z")
FAILURES = {"unknown", "error"}
#: Commands remembered per device while awaiting their RESULT; past it the oldest is forgotten
#: (it then ends by its timeout, counted as `timeout`).
MAX_AWAITING = 64


def command_payload(args: dict[str, Any] | None) -> bytes:
    """The ``cmnd/<id>/<Name>`` payload for a command's args (rule in the module docstring)."""
    if not args:
        return b""
    if set(args) != {"value"}:
        return orjson.dumps(args)
    value = args["value"]
    if value is None:
        return b""
    if value is True or value is False:
        return b"ON" if value else b"OFF"
    if isinstance(value, str):
        return value.encode()
    return orjson.dumps(value)


def parse_power(payload: bytes | str) -> bool:
    """``ON``/``OFF`` (also ``1``/``0``, ``true``/``false``) → bool; else `Rejected`."""
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    text = raw.strip().lower()
    if text in (b"on", b"1", b"true"):
        return True
    if text in (b"off", b"0", b"false"):
        return False
    raise Rejected("bad_value", "POWER must be ON or OFF")


def parse_state(payload: bytes, max_bytes: int) -> Metrics:
    """A ``tele/<id>/STATE`` object → flat metrics, ``POWER<n>`` ``ON``/``OFF`` as booleans."""
    return parse_tasmota(payload, time.time(), max_bytes, "STATE").metrics


def parse_result(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """A ``stat/<id>/RESULT`` (or STATUS) JSON object."""
    return load_object(payload, max_bytes, "a RESULT")


def _base_name(name: str) -> str:
    """Command/key name for matching: lower case, without a trailing relay index."""
    return name.lower().rstrip("0123456789") or name.lower()


class TasmotaConsumer(DeviceConsumer):
    """One Tasmota device's ``tele/``/``stat/`` topics, and its commands on ``cmnd/<id>/…``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (command id, command name) sent and not yet answered, oldest first.
        self.awaiting: deque[tuple[str, str]] = deque()

    label = "tasmota"
    #: Whether the device's name (its original topic) is stored yet (mapped ids only).
    named = False

    @cached_property
    def topic_name(self) -> str:
        """The device's MQTT Topic as Tasmota spells it (its ``cmnd/<topic>/…`` level)."""
        return str(self.scope.get("url_route", {}).get("kwargs", {}).get("device_id", ""))

    @cached_property
    def device_id(self) -> str:
        """The device id for this topic (`device_id_for`: the topic itself when valid)."""
        return device_id_for(self.topic_name)

    async def handle_message(self, pattern: str | None, event: dict[str, Any]) -> None:
        """One Tasmota message (``tele/``, ``stat/``); raises `Rejected` for bad input."""
        payload = event["payload"]
        replayed = bool(event.get("retain"))
        pipeline = get_pipeline()
        if not self.named and self.device_id != self.topic_name:
            try:
                await database_sync_to_async(_name_device)(self.device_id, self.topic_name)
                self.named = True
            except Exception:  # the database is away: the reading goes on, naming next time
                logger.warning("tasmota %s: naming it %r failed", self.device_id, self.topic_name)
        if pattern in (SENSOR, STATE):
            t = parse_tasmota(payload, time.time(), self.max_bytes, pattern.rsplit("/", 1)[-1])
            pipeline.submit_reading(
                self.device_id,
                self.transport,
                t.ts if t.stamped or not replayed else None,
                t.metrics,
                source=pattern,
                durable=self.defer_ack(),
                presence=not replayed,
            )
            if not replayed:
                await self.set_online(True)
        elif pattern == LWT:
            online = parse_status(payload)
            pipeline.submit_status(
                self.device_id,
                self.transport,
                online,
                time.time(),
                source=LWT,
                durable=self.defer_ack(),
            )
            await self.set_online(online)
        elif pattern == STAT:
            await self.handle_stat(event["params"].get("kind", ""), payload, replayed)
        else:
            raise Rejected("bad_topic", f"no handler for pattern {pattern!r}")

    async def handle_stat(self, kind: str, payload: bytes, replayed: bool = False) -> None:
        """``stat/<id>/<kind>``: relay state, command results, Status answers.

        A replayed (retained) relay state only fills the latest value; a replayed answer is
        an old one and is ignored.
        """
        if POWER_KEY.match(kind):
            answer = None
            if payload.lstrip()[:1] == b"{":  # SetOption4: the answer to a Power command
                answer = parse_result(payload, self.max_bytes)
                value = switch_state(next(iter(answer.values()), None))
                if value is None:
                    raise Rejected("bad_value", f"{kind} answer without ON/OFF")
            else:
                value = parse_power(_scalar(payload))
            get_pipeline().submit_reading(
                self.device_id,
                self.transport,
                None if replayed else time.time(),
                {kind.upper(): value},
                source=STAT,
                durable=self.defer_ack(),
                presence=not replayed,
            )
            if answer is not None and not replayed:
                await self.handle_result(answer, only="power")
        elif replayed:
            return
        elif kind == "RESULT":
            await self.handle_result(parse_result(payload, self.max_bytes))
        elif STATUS_KIND.match(kind):
            await self.handle_result(parse_result(payload, self.max_bytes), only="status")
        elif any(_base_name(name) == _base_name(kind) for _, name in self.awaiting):
            await self.handle_result(self._answer(kind, payload), only=_base_name(kind))
        else:
            return  # any other stat/ topic (LOGGING, UPGRADE…) is Tasmota's business, not ours
        if not replayed:
            await self.set_online(True)

    def _answer(self, kind: str, payload: bytes) -> dict[str, Any]:
        """A SetOption4 answer: its JSON object, or ``{kind: text}`` for a bare value."""
        if payload.lstrip()[:1] == b"{":
            return parse_result(payload, self.max_bytes)
        return {kind: _scalar(payload).decode("utf-8", "replace").strip()}

    async def handle_result(self, result: dict[str, Any], only: str | None = None) -> None:
        """Finish the awaiting command this RESULT answers (rule in the module docstring)."""
        if not self.awaiting:
            logger.debug("tasmota %s: RESULT with no command awaiting: %s", self.device_id, result)
            return
        verdict = result.get("Command")
        failed = isinstance(verdict, str) and verdict.lower() in FAILURES
        for entry in self._candidates(result, failed, only):
            self.awaiting.remove(entry)
            command_id, name = entry
            if failed:
                error = f"Tasmota answered {orjson.dumps(result).decode()[:200]} to {name}"
                done = await commands.apply_ack(self.device_id, command_id, False, None, error)
            else:
                done = await commands.apply_ack(self.device_id, command_id, True, result, "")
            if done:
                return
            # That one had already ended (timed out): the answer belongs to the next one.

    def _candidates(
        self, result: dict[str, Any], failed: bool, only: str | None
    ) -> list[tuple[str, str]]:
        """Awaiting commands this RESULT may answer, best first."""
        entries = list(self.awaiting)
        if only is not None:
            return [e for e in entries if _base_name(e[1]) == only]
        if failed:
            return entries
        keys = {_base_name(k) for k in result}
        by_name = [e for e in entries if _base_name(e[1]) in keys]
        return by_name + [e for e in entries if e not in by_name]

    async def send_command(self, command: dict[str, Any]) -> None:
        """Publish to ``cmnd/<id>/<Name>`` with the args' payload, QoS 1, not retained;
        ConnectionError while the broker is unavailable (the service holds the command)."""
        entry = (str(command["id"]), str(command["name"]))
        if len(self.awaiting) >= MAX_AWAITING:
            forgotten = self.awaiting.popleft()
            logger.warning("tasmota %s: forgetting unanswered %s", self.device_id, forgotten)
        self.awaiting.append(entry)
        topic = f"cmnd/{self.topic_name}/{command['name']}"
        try:
            await self.publish(topic, command_payload(command.get("args")), qos=1, retain=False)
        except BrokerUnavailable as exc:
            self.awaiting.remove(entry)
            raise ConnectionError(str(exc) or "broker unavailable") from exc
        except BaseException:
            if entry in self.awaiting:
                self.awaiting.remove(entry)
            raise


def _name_device(device_id: str, topic: str) -> None:
    """Register a device whose id is mapped from its topic, named by that topic."""
    device, created = Device.objects.get_or_create(id=device_id, defaults={"name": topic[:200]})
    if not created and not device.name:
        Device.objects.filter(id=device_id, name="").update(name=topic[:200])


def _scalar(payload: bytes) -> bytes:
    if len(payload) > 100:
        raise Rejected("too_large", f"payload of {len(payload)} bytes is too long")
    return payload
