"""Which convention a device speaks, and the command buttons that convention makes safe.

A device's ``transport`` says how it reaches the gateway (``mqtt``, ``serial``, ``modbus``); its
convention says what its messages mean, and so which commands it accepts (docs/interface.md
§5.2). The convention is derived, not stored, the cheapest way that is right:

- ``serial`` and ``modbus`` transports are their own convention;
- an MQTT device this process discovered (its registry at ``/api/discovery/``) is
  ``zigbee2mqtt`` when its id is a Zigbee IEEE address (``0x`` and 16 hex digits: Zigbee2MQTT's
  device list) or Zigbee2MQTT's own discovery identifier (``zigbee2mqtt_0x…``), else
  ``discovery`` (Home Assistant discovery);
- an MQTT device whose id starts with ``tasmota`` or whose metrics are Tasmota's own
  (``UptimeSec``, ``Wifi.*``, ``POWER<n>``, ``AM2301.*``… from ``tele/<id>/STATE`` and
  ``SENSOR``) is ``tasmota``;
- any other MQTT device is ``native``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from devices.conventions.discovery.consumer import describe
from devices.conventions.modbus_units import points_of

#: Metric names only Tasmota firmware reports (its STATE and SENSOR objects, flattened).
TASMOTA_METRIC = re.compile(
    r"^(UptimeSec|LoadAvg|MqttCount|Heap|POWER\d*"
    r"|(Wifi|AM2301|BMP280|BME280|DHT11|DS18B20|SHT3X|ENERGY|SI7021|ANALOG)\..+)$"
)
_RELAY = re.compile(r"^POWER(\d*)$")
_ZIGBEE = re.compile(r"^(zigbee2mqtt_)?0x[0-9A-Fa-f]{16}$")
#: How the dashboard names each convention.
LABELS = {
    "native": "native",
    "tasmota": "Tasmota",
    "discovery": "discovery",
    "zigbee2mqtt": "Zigbee2MQTT",
    "serial": "serial",
    "modbus": "Modbus",
}
#: Diagnostic values (as Home Assistant's ``entity_category: diagnostic``): the device's own
#: health and radio rather than what it measures; the dashboard shows them collapsed. The same
#: pattern is in dashboard/static/dashboard/live.js.
DIAGNOSTIC = re.compile(
    r"^(Uptime|UptimeSec|uptime|Heap|LoadAvg|Sleep|SleepMode|MqttCount|Vcc|rssi|RSSI"
    r"|linkquality|Wifi\..+|wifi\..+)$"
)


def is_diagnostic(metric: str) -> bool:
    """Whether a metric is a diagnostic value (shown collapsed)."""
    return DIAGNOSTIC.match(metric) is not None


def _discovered() -> dict[str, list[dict[str, Any]]]:
    return {d["device"]: d["entities"] for d in describe()}


def convention(device: Mapping[str, Any], discovered: Mapping[str, Any] | None = None) -> str:
    """``native``, ``tasmota``, ``discovery``, ``zigbee2mqtt``, ``serial`` or ``modbus``
    (module docstring)."""
    transport = device.get("transport") or "mqtt"
    if transport != "mqtt":
        return str(transport)
    found = _discovered() if discovered is None else discovered
    if device.get("id") in found:
        return "zigbee2mqtt" if _ZIGBEE.match(str(device["id"])) else "discovery"
    if str(device.get("id", "")).lower().startswith("tasmota"):
        return "tasmota"
    if any(TASMOTA_METRIC.match(str(name)) for name in device.get("metrics") or {}):
        return "tasmota"
    return "native"


def with_conventions(devices: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """`devices` (`Device.as_dict()` shapes), each with its ``convention`` added."""
    found = _discovered()
    out = []
    for device in devices:
        device["convention"] = convention(device, found)
        out.append(device)
    return out


def _button(label: str, name: str, args: dict[str, Any], fill: bool = False) -> dict[str, Any]:
    # `fill`: the button puts the command in the form to edit (a value to choose) instead of
    # sending it.
    return {"label": label, "name": name, "args": json.dumps(args), "fill": fill}


def _tasmota(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    relays = sorted(m.group(1) for m in map(_RELAY.match, metrics) if m) or [""]
    if len(relays) > 1 and "" in relays:
        relays.remove("")  # POWER and POWER1 are the same relay
    return [
        _button(f"Power{n} {verb}", f"Power{n}", {"value": verb})
        for n in relays
        for verb in ("ON", "OFF", "TOGGLE")
    ]


def _modbus(device_id: str) -> list[dict[str, Any]]:
    out = []
    for point in points_of(device_id):
        if not point.writable:
            continue
        if point.table == "coil":
            out += [
                _button(f"{point.name} on", point.name, {"value": True}),
                _button(f"{point.name} off", point.name, {"value": False}),
            ]
        else:
            out.append(_button(f"{point.name}…", point.name, {"value": 0}, fill=True))
    return out


def _discovery(entities: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for entity in entities:
        if not entity.get("commandable"):
            continue
        metric, label = entity["metric"], entity.get("name") or entity["metric"]
        component = entity.get("component")
        if component in ("switch", "light"):
            out += [
                _button(f"{label} on", metric, {"value": True}),
                _button(f"{label} off", metric, {"value": False}),
            ]
        elif component == "button":
            out.append(_button(label, metric, {}))
        elif component == "cover":
            verbs = ("open", "close", "stop")
            out += [_button(f"{label} {v}", metric, {"value": v}) for v in verbs]
        else:  # number, select: a value to choose
            out.append(_button(f"{label}…", metric, {"value": ""}, fill=True))
    return out


def command_buttons(device: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Buttons for what the device is known to accept; none for a native or serial device,
    whose commands only its firmware knows (the free-form form sends them)."""
    kind = convention(device)
    if kind == "tasmota":
        return _tasmota(device.get("metrics") or {})
    if kind == "modbus":
        return _modbus(str(device["id"]))
    if kind in ("discovery", "zigbee2mqtt"):
        return _discovery(_discovered().get(device["id"], []))
    return []
