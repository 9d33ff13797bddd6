"""Tasmota's payloads and topics as it ships them, mapped onto readings and device ids.

What Tasmota publishes (Tasmota docs "MQTT", "Commands", "Power Monitoring"; source
tasmota/tasmota_support/support_tasmota.ino and tasmota/tasmota_xdrv_driver/xdrv_03_energy.ino)
and how it is read here:

- ``Time`` and ``Epoch`` (any case, any level) are timestamps, never metrics. The reading's
  time is ``Epoch`` (``Time 2``: ``"Epoch":1764214000``), else a numeric ``Time`` (``Time 3``:
  epoch seconds, ``Time 4``: epoch milliseconds); the default ``"Time":"2026-11-27T05:46:00"``
  is the device's local time without a zone, so such a reading gets the receive time.
- ``ON``/``OFF`` strings (any case, any level: ``POWER1``, ``Switch1``, ``Button1``…) are
  boolean readings.
- Lists are one value per channel, numbered from 1 as Tasmota numbers its channels:
  ``"ENERGY":{"Power":[52,5]}`` → ``ENERGY.Power.1`` = 52, ``ENERGY.Power.2`` = 5 (the same
  for phases). Items that are not numbers or ON/OFF are skipped.
- A device's MQTT Topic may hold any character a topic level may (``living.room``). One that is
  not a device id (1-64 of ``[A-Za-z0-9_-]``) maps to ``<slug>-<12 hex of its SHA-256>``
  (``living_room-…``): valid, the same on every bridge and restart, and two topics share one
  only if their SHA-256 prefixes do; the original topic becomes the device's name.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from devices.telemetry.parsing import (
    MAX_DEPTH,
    Telemetry,
    load_object,
    metrics_of,
    parse_timestamp,
    valid_device_id,
)
from gateway.exceptions import Rejected

TIME_KEYS = frozenset({"time", "epoch"})
_SWITCH = {"on": True, "off": False}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def device_id_for(topic: str) -> str:
    """The device id of a Tasmota MQTT Topic: itself when valid, else a stable mapping."""
    if valid_device_id(topic):
        return topic
    slug = _UNSAFE.sub("_", topic).strip("_")[:40] or "tasmota"
    return f"{slug}-{hashlib.sha256(topic.encode()).hexdigest()[:12]}"


def switch_state(value: Any) -> bool | None:
    """``ON``/``OFF`` (any case) → True/False; anything else → None."""
    if isinstance(value, str):
        return _SWITCH.get(value.strip().lower())
    return None


def _readings(obj: dict[str, Any], depth: int = 1) -> dict[str, Any]:
    """`obj` with timestamps left out, ON/OFF as booleans and lists as numbered channels."""
    if depth > MAX_DEPTH:
        raise Rejected("too_deep", f"objects nested deeper than {MAX_DEPTH} levels")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key.lower() in TIME_KEYS:
            continue
        if isinstance(value, dict):
            out[key] = _readings(value, depth + 1)
        elif isinstance(value, list):
            channels = {}
            for i, item in enumerate(value, 1):
                state = switch_state(item)
                if state is not None:
                    channels[str(i)] = state
                elif isinstance(item, int | float) and not isinstance(item, bool):
                    channels[str(i)] = item
            if channels:
                out[key] = channels
        else:
            state = switch_state(value)
            out[key] = value if state is None else state
    return out


def reading_time(data: dict[str, Any], received_at: float) -> tuple[float, bool]:
    """(epoch seconds, whether the device said it): ``Epoch``, a numeric ``Time``, else now."""
    for key in ("Epoch", "Time"):
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return parse_timestamp(value, received_at), True
    return received_at, False


def parse_tasmota(payload: bytes, received_at: float, max_bytes: int, what: str) -> Telemetry:
    """A ``tele/<t>/SENSOR`` or ``STATE`` object → a reading (rules in the module docstring)."""
    data = load_object(payload, max_bytes, what)
    ts, stamped = reading_time(data, received_at)
    return Telemetry(ts, metrics_of(_readings(data)), stamped)
