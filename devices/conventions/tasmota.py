"""Tasmota devices: their topics mapped onto the same devices, metrics, status and commands.

A device running Tasmota (default FullTopic ``%prefix%/%topic%/``, its MQTT Topic being the
device id) is a device like any other (docs/interface.md §3.2):

- ``tele/<id>/SENSOR`` → a reading: nested objects flattened with ``.``
  (``AM2301.Temperature``); numbers and booleans are metrics; strings (``Time``,
  ``TempUnit``…), null and lists are ignored.
- ``tele/<id>/STATE`` → a reading: its numbers flattened the same way (``UptimeSec``,
  ``Wifi.RSSI``…), and ``POWER``/``POWER<n>`` ``ON``/``OFF`` as a boolean metric of that name.
- ``tele/<id>/LWT`` → status: ``Online`` / ``Offline`` (case-insensitive).
- ``stat/<id>/POWER[<n>]`` → a reading ``{"POWER[<n>]": true|false}`` (a relay switched).
- ``stat/<id>/RESULT`` → the answer to a command awaiting one (below).
- ``stat/<id>/STATUS[<n>]`` → the answer to a ``Status`` command (Tasmota answers it there).

Tasmota's ``Time`` is the device's local time without a zone, so readings are stamped with the
receive time. The device id follows the usual rule (1-64 of ``[A-Za-z0-9_-]``); any other id is
rejected and counted (``bad_device_id``). Other ``stat/<id>/…`` topics (``LOGGING``,
``UPGRADE``…) are not ours and are ignored without counting.

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
from typing import Any

import orjson

from devices.commands import service as commands
from devices.conventions.native import DeviceConsumer
from devices.telemetry.parsing import (
    Metrics,
    load_object,
    metrics_of,
    parse_status,
    parse_telemetry,
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
    data = load_object(payload, max_bytes, "STATE")
    for key, value in data.items():
        if POWER_KEY.match(key) and isinstance(value, str):
            try:
                data[key] = parse_power(value)
            except Rejected:
                pass  # not ON/OFF: a string, ignored like any other
    return metrics_of(data)


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

    async def handle_message(self, pattern: str | None, event: dict[str, Any]) -> None:
        """One Tasmota message (``tele/``, ``stat/``); raises `Rejected` for bad input."""
        payload = event["payload"]
        pipeline = get_pipeline()
        if pattern == SENSOR:
            t = parse_telemetry(payload, time.time(), self.max_bytes)
            pipeline.submit_reading(
                self.device_id,
                self.transport,
                time.time(),
                t.metrics,
                source=SENSOR,
                durable=self.defer_ack(),
            )
            await self.set_online(True)
        elif pattern == STATE:
            metrics = parse_state(payload, self.max_bytes)
            pipeline.submit_reading(
                self.device_id,
                self.transport,
                time.time(),
                metrics,
                source=STATE,
                durable=self.defer_ack(),
            )
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
            await self.handle_stat(event["params"].get("kind", ""), payload)
        else:
            raise Rejected("bad_topic", f"no handler for pattern {pattern!r}")

    async def handle_stat(self, kind: str, payload: bytes) -> None:
        """``stat/<id>/<kind>``: relay state, command results, Status answers."""
        if POWER_KEY.match(kind):
            value = parse_power(_scalar(payload))
            get_pipeline().submit_reading(
                self.device_id,
                self.transport,
                time.time(),
                {kind.upper(): value},
                source=STAT,
                durable=self.defer_ack(),
            )
        elif kind == "RESULT":
            await self.handle_result(parse_result(payload, self.max_bytes))
        elif STATUS_KIND.match(kind):
            await self.handle_result(parse_result(payload, self.max_bytes), only="status")
        else:
            return  # any other stat/ topic (LOGGING, UPGRADE…) is Tasmota's business, not ours
        await self.set_online(True)

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
        topic = f"cmnd/{self.device_id}/{command['name']}"
        try:
            await self.publish(topic, command_payload(command.get("args")), qos=1, retain=False)
        except BrokerUnavailable as exc:
            self.awaiting.remove(entry)
            raise ConnectionError(str(exc) or "broker unavailable") from exc
        except BaseException:
            if entry in self.awaiting:
                self.awaiting.remove(entry)
            raise


def _scalar(payload: bytes) -> bytes:
    if len(payload) > 100:
        raise Rejected("too_large", f"payload of {len(payload)} bytes is too long")
    return payload
