"""Discovered entities: what a discovery document (or a Zigbee2MQTT expose) says, checked once.

An `Entity` is one readable and/or commandable thing of a device: where its state comes from
and how to read it (a compiled ``value_template``, a JSON key, or the bare payload), where its
availability comes from, and how to command it. `entities_of` turns one expanded Home Assistant
discovery document (docs/conventions.md) into entities; an entity this gateway cannot serve is
still returned, with `unsupported` saying why, so the API can show it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from devices.conventions.discovery.templates import Template, Unsupported, compile_template

READ_ONLY = {"sensor", "binary_sensor"}
COMMANDABLE = {"switch", "light", "number", "select", "button", "cover"}
COMPONENTS = READ_ONLY | COMMANDABLE
MAX_TOPIC = 1024
_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_METRIC = re.compile(r"[^A-Za-z0-9_.:-]+")


class Refused(ValueError):
    """A document that cannot be read at all (the message says why)."""


def device_id_for(identifier: str) -> str:
    """A device id (``[A-Za-z0-9_-]{1,64}``) for a discovery identifier: itself when it already
    is one, else a slug plus 8 hex digits of its SHA-1 (stable, and two identifiers never share
    an id: a slug with a hash is never a plain identifier of the same text)."""
    if 0 < len(identifier) <= 64 and not _ID_CHARS.search(identifier):
        return identifier
    slug = _ID_CHARS.sub("-", identifier).strip("-")[:55] or "device"
    return f"{slug}-{hashlib.sha1(identifier.encode()).hexdigest()[:8]}"


def metric_name(text: str) -> str:
    """A metric/command name (``[A-Za-z0-9_.:-]``, at most 64) for an object id or key."""
    name = _METRIC.sub("_", text).strip("_")
    if 0 < len(name) <= 64 and name == text:
        return name
    return f"{name[:55] or 'entity'}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@dataclass(slots=True)
class Availability:
    """One availability topic and its payloads."""

    topic: str
    payload_available: str = "online"
    payload_not_available: str = "offline"
    template: Template | None = None
    json_state: bool = False  # Zigbee2MQTT: {"state": "online"} or the legacy plain string


@dataclass(slots=True)
class Entity:
    """One discovered entity (see the module docstring)."""

    key: str  # unique: the config topic, plus ``#<component id>`` for device-level documents
    config_topic: str
    component: str
    device_id: str
    device_name: str
    metric: str
    name: str
    unit: str | None = None
    device_class: str | None = None
    state_topic: str | None = None
    value_template: Template | None = None
    json_key: str | None = None  # read this key of a JSON object instead of a template
    payload_on: Any = "ON"
    payload_off: Any = "OFF"
    state_on: Any = None
    state_off: Any = None
    command_topic: str | None = None
    command_template: Template | None = None
    json_command: bool = False  # Zigbee2MQTT: {"<json_key>": value} on the command topic
    payload_press: str = "PRESS"
    payload_open: str = "OPEN"
    payload_close: str = "CLOSE"
    payload_stop: str = "STOP"
    options: list[str] = field(default_factory=list)
    light_json: bool = False  # light with ``schema: json``
    brightness_state_topic: str | None = None
    brightness_template: Template | None = None
    brightness_command_topic: str | None = None
    brightness_scale: int = 255
    availability: list[Availability] = field(default_factory=list)
    availability_mode: str = "latest"
    qos: int = 0
    retain: bool = False
    unsupported: str | None = None

    def topics(self) -> set[str]:
        """Every topic this entity listens to."""
        found = {a.topic for a in self.availability}
        for topic in (self.state_topic, self.brightness_state_topic):
            if topic:
                found.add(topic)
        return found

    def describe(self) -> dict[str, Any]:
        """What the API shows of it."""
        return {
            "metric": self.metric,
            "name": self.name,
            "component": self.component,
            "unit": self.unit,
            "device_class": self.device_class,
            "commandable": self.component in COMMANDABLE and self.unsupported is None,
            "unsupported": self.unsupported,
        }


def _text(value: Any, what: str, limit: int = 200) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Unsupported(f"{what} must be a string")
    text = str(value)
    if len(text) > limit or any(ord(c) < 32 for c in text):
        raise Unsupported(f"{what} is too long or has control characters")
    return text


def _topic(value: Any, what: str) -> str | None:
    topic = _text(value, what, MAX_TOPIC)
    if topic is not None and (not topic or "+" in topic or "#" in topic or "\0" in topic):
        raise Unsupported(f"{what} {topic!r} is not a topic")
    return topic


def _template(value: Any, what: str) -> Template | None:
    if value is None:
        return None
    try:
        return compile_template(value)
    except Unsupported as exc:
        raise Unsupported(f"{what}: {exc}") from None


def _availability(doc: dict[str, Any]) -> tuple[list[Availability], str]:
    default_on = _text(doc.get("payload_available", "online"), "payload_available") or "online"
    default_off = _text(doc.get("payload_not_available", "offline"), "payload_not_available")
    found: list[Availability] = []
    if doc.get("availability_topic") is not None:
        found.append(
            Availability(
                _topic(doc["availability_topic"], "availability_topic") or "",
                default_on,
                default_off or "offline",
                _template(doc.get("availability_template"), "availability_template"),
            )
        )
    entries = doc.get("availability")
    if entries is not None:
        if not isinstance(entries, list) or len(entries) > 16:
            raise Unsupported("availability must be a list of at most 16 entries")
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("topic") is None:
                raise Unsupported("each availability entry needs a topic")
            found.append(
                Availability(
                    _topic(entry["topic"], "availability topic") or "",
                    _text(entry.get("payload_available", "online"), "payload_available")
                    or "online",
                    _text(entry.get("payload_not_available", "offline"), "payload_not_available")
                    or "offline",
                    _template(entry.get("value_template"), "availability value_template"),
                )
            )
    mode = doc.get("availability_mode", "latest")
    if mode not in ("all", "any", "latest"):
        raise Unsupported(f"availability_mode {mode!r}")
    return found, mode


def identity(doc: dict[str, Any], fallback: str) -> tuple[str, str, str]:
    """(device id, device name, raw identifier) of an expanded document."""
    device = doc.get("device")
    raw = None
    name = None
    if isinstance(device, dict):
        ids = device.get("identifiers")
        if isinstance(ids, list) and ids and isinstance(ids[0], str | int):
            raw = str(ids[0])
        elif isinstance(ids, str | int) and not isinstance(ids, bool):
            raw = str(ids)
        elif isinstance(device.get("connections"), list) and device["connections"]:
            first = device["connections"][0]
            if isinstance(first, list) and len(first) == 2:
                raw = f"{first[0]}_{first[1]}"
        if isinstance(device.get("name"), str):
            name = device["name"][:200]
    if not raw:
        unique = doc.get("unique_id")
        raw = str(unique) if isinstance(unique, str | int) and unique != "" else fallback
    raw = raw[:512]
    return device_id_for(raw), name or raw[:200], raw


def build_entity(
    doc: dict[str, Any],
    *,
    key: str,
    config_topic: str,
    component: str,
    object_id: str,
    device: tuple[str, str, str],
) -> Entity:
    """One entity from an expanded component document; never raises for content (an
    entity it cannot serve comes back with `unsupported` set)."""
    device_id, device_name, _ = device
    name = doc.get("name")
    friendly = name if isinstance(name, str) and name else object_id
    entity = Entity(
        key=key,
        config_topic=config_topic,
        component=component,
        device_id=device_id,
        device_name=device_name,
        metric=metric_name(object_id),
        name=friendly[:200],
    )
    try:
        _fill(entity, doc)
    except Unsupported as exc:
        entity.unsupported = str(exc)[:300]
    return entity


def _fill(entity: Entity, doc: dict[str, Any]) -> None:
    if entity.component not in COMPONENTS:
        raise Unsupported(f"component {entity.component!r} is not supported")
    entity.unit = _text(doc.get("unit_of_measurement"), "unit_of_measurement", 32)
    entity.device_class = _text(doc.get("device_class"), "device_class", 64)
    entity.state_topic = _topic(doc.get("state_topic"), "state_topic")
    entity.value_template = _template(doc.get("value_template"), "value_template")
    entity.command_topic = _topic(doc.get("command_topic"), "command_topic")
    entity.command_template = _template(doc.get("command_template"), "command_template")
    for attr in ("payload_on", "payload_off", "state_on", "state_off"):
        if doc.get(attr) is not None:
            setattr(entity, attr, _text(doc[attr], attr))
    for attr in ("payload_press", "payload_open", "payload_close", "payload_stop"):
        if doc.get(attr) is not None:
            setattr(entity, attr, _text(doc[attr], attr) or "")
    entity.availability, entity.availability_mode = _availability(doc)
    qos = doc.get("qos", 0)
    entity.qos = qos if qos in (0, 1, 2) else 0
    entity.retain = doc.get("retain") is True
    if entity.component == "select":
        options = doc.get("options")
        if not isinstance(options, list) or not 0 < len(options) <= 256:
            raise Unsupported("a select needs 1-256 options")
        entity.options = [_text(o, "option") or "" for o in options]
    if entity.component == "light":
        schema = doc.get("schema", "default")
        if schema not in ("default", "basic", "json"):
            raise Unsupported(f"light schema {schema!r} is not supported")
        entity.light_json = schema == "json"
        entity.brightness_state_topic = _topic(
            doc.get("brightness_state_topic"), "brightness_state_topic"
        )
        entity.brightness_template = _template(
            doc.get("brightness_value_template"), "brightness_value_template"
        )
        entity.brightness_command_topic = _topic(
            doc.get("brightness_command_topic"), "brightness_command_topic"
        )
        scale = doc.get("brightness_scale", 255)
        entity.brightness_scale = scale if isinstance(scale, int) and 0 < scale < 2**31 else 255
    if entity.component in COMMANDABLE and not entity.command_topic:
        raise Unsupported(f"a {entity.component} without command_topic")
    if entity.component in READ_ONLY and not entity.state_topic:
        raise Unsupported(f"a {entity.component} without state_topic")
