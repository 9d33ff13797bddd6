"""Zigbee2MQTT without Home Assistant discovery: its device list (``exposes``) → entities.

Topics (base topic ``ZIGBEE2MQTT_BASE_TOPIC``, default ``zigbee2mqtt``; Zigbee2MQTT's docs,
guide/usage/mqtt_topics_and_messages.md and guide/usage/exposes.md):

- ``<base>/bridge/devices`` (retained): the device list; each republish replaces the previous
  one (devices gone from it are retired). The coordinator, unsupported devices
  (``definition: null``) and disabled ones are skipped.
- ``<base>/<friendly_name>``: a device's state, one JSON object (friendly names may contain
  ``/``); each expose's ``property`` is a key of it.
- ``<base>/<friendly_name>/availability``: ``{"state": "online"}`` or the legacy plain
  ``online``/``offline``.
- ``<base>/<friendly_name>/set``: commands, ``{"<property>": value}``.

Exposes map as: ``numeric`` → ``sensor`` (read-only) or ``number`` (settable, access bit 2),
``binary`` → ``binary_sensor`` or ``switch`` (``value_on``/``value_off``), the ``state`` of a
``switch``/``light`` group → ``switch``/``light`` (a light's ``brightness`` → ``number``),
settable ``enum`` → ``select``. Text, list, composite and read-only enum exposes carry no
number and are not ingested. The device id is the IEEE address, the name its friendly name.
"""

from __future__ import annotations

from typing import Any

import orjson

from devices.conventions.discovery.entities import Availability, Entity, device_id_for, metric_name
from gateway.exceptions import Rejected

SETTABLE = 0b010


def devices_topic(base: str) -> str:
    """Where Zigbee2MQTT publishes its device list."""
    return f"{base}/bridge/devices"


def _features(expose: dict[str, Any]) -> list[tuple[dict[str, Any], str | None]]:
    """(feature, the group's type) pairs: a group's features, or the expose itself."""
    features = expose.get("features")
    if isinstance(features, list):
        group = expose.get("type")
        return [
            (f, group if isinstance(group, str) else None) for f in features if isinstance(f, dict)
        ]
    return [(expose, None)]


def _entity(
    base_topic: str,
    ieee: str,
    device_id: str,
    name: str,
    feature: dict[str, Any],
    group: str | None,
) -> Entity | None:
    prop = feature.get("property")
    kind = feature.get("type")
    if not isinstance(prop, str) or not prop or len(prop) > 64:
        return None
    access = feature.get("access", 1)
    settable = isinstance(access, int) and bool(access & SETTABLE)
    if kind == "numeric":
        component = "number" if settable else "sensor"
    elif kind == "binary":
        if group in ("switch", "light") and prop.startswith("state"):
            component = group if settable else "binary_sensor"
        else:
            component = "switch" if settable else "binary_sensor"
    elif kind == "enum" and settable and isinstance(feature.get("values"), list):
        component = "select"
    else:
        return None
    label = feature.get("label") or feature.get("name") or prop
    entity = Entity(
        key=f"{base_topic}/bridge/devices#{ieee}#{prop}",
        config_topic=devices_topic(base_topic),
        component=component,
        device_id=device_id,
        device_name=name,
        metric=metric_name(prop),
        name=str(label)[:200],
        unit=str(feature["unit"])[:32] if isinstance(feature.get("unit"), str) else None,
        state_topic=f"{base_topic}/{name}",
        json_key=prop,
        json_command=True,
        command_topic=f"{base_topic}/{name}/set" if settable else None,
        availability=[
            Availability(f"{base_topic}/{name}/availability", "online", "offline", json_state=True)
        ],
    )
    if kind == "binary":
        entity.payload_on = feature.get("value_on", True)
        entity.payload_off = feature.get("value_off", False)
    if component == "select":
        entity.options = [str(v)[:200] for v in feature["values"][:256]]
    return entity


def entities_of(base_topic: str, payload: bytes, max_bytes: int) -> list[Entity]:
    """Every entity of a ``bridge/devices`` list; `Rejected` when it cannot be read."""
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"device list of {len(payload)} bytes")
    try:
        devices = orjson.loads(payload) if payload.strip() else []
    except orjson.JSONDecodeError as exc:
        raise Rejected("bad_json", f"device list: {exc}") from None
    if not isinstance(devices, list):
        raise Rejected("bad_value", "the device list is not a list")
    found: list[Entity] = []
    for device in devices:
        if not isinstance(device, dict) or device.get("type") == "Coordinator":
            continue
        definition = device.get("definition")
        ieee, name = device.get("ieee_address"), device.get("friendly_name")
        if not isinstance(definition, dict) or device.get("disabled") is True:
            continue
        if not isinstance(ieee, str) or not isinstance(name, str) or not name or len(name) > 200:
            continue
        if "+" in name or "#" in name or name.startswith("bridge/") or name == "bridge":
            continue
        exposes = definition.get("exposes")
        if not isinstance(exposes, list):
            continue
        device_id = device_id_for(ieee)
        for expose in exposes:
            if not isinstance(expose, dict):
                continue
            for feature, group in _features(expose):
                entity = _entity(base_topic, ieee, device_id, name, feature, group)
                if entity is not None:
                    found.append(entity)
    return found
