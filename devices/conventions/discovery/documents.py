"""Home Assistant discovery documents → entities (docs/interface.md §3.7).

Topics: ``<prefix>/<component>/[<node_id>/]<object_id>/config`` (one entity) and
``<prefix>/device/<object_id>/config`` (device-level: ``cmps`` holds the entities). An empty
payload removes what that topic announced; a device-level component reduced to its platform
(``{"p": "sensor"}``) is removed likewise. Documents the gateway itself publishes
(docs/interface.md §3.4: origin ``mqtt-channels-gateway``, identifiers ``<GATEWAY_ID>_…``) are
recognised and never ingested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from devices.conventions.discovery.abbreviations import expand
from devices.conventions.discovery.entities import Entity, build_entity, identity
from devices.conventions.homeassistant import ORIGIN_NAME as OWN_ORIGIN
from devices.conventions.homeassistant import identifier
from gateway.exceptions import Rejected

#: Components one device-level document may hold.
MAX_COMPONENTS = 256
_LEVEL_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True, slots=True)
class ConfigTopic:
    """The parts of a discovery config topic."""

    component: str
    node_id: str | None
    object_id: str


def parse_topic(topic: str, prefix: str) -> ConfigTopic | None:
    """The parts of ``<prefix>/<component>/[<node_id>/]<object_id>/config``, else None."""
    if not topic.startswith(prefix + "/") or not topic.endswith("/config"):
        return None
    levels = topic[len(prefix) + 1 : -len("/config")].split("/")
    if len(levels) not in (2, 3) or not all(lv and set(lv) <= _LEVEL_OK for lv in levels):
        return None
    if len(levels) == 2:
        return ConfigTopic(levels[0], None, levels[1])
    return ConfigTopic(levels[0], levels[1], levels[2])


def is_own(doc: dict[str, Any], gateway_id: str) -> bool:
    """Whether an expanded document is one the gateway itself published."""
    origin = doc.get("origin")
    if isinstance(origin, dict) and origin.get("name") == OWN_ORIGIN:
        return True
    device = doc.get("device")
    if isinstance(device, dict):
        ids = device.get("identifiers")
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, str) and first.startswith(identifier(gateway_id) + ":"):
            return True  # ours: `<gw>:device:<id>`, `<gw>:gateway` (docs/interface.md §3.4)
    return False


def load_document(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """A config payload as a JSON object; `Rejected` (counted by reason) otherwise."""
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"discovery document of {len(payload)} bytes")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected("bad_json", f"discovery document: {exc}") from None
    if not isinstance(doc, dict):
        raise Rejected("not_object", "discovery document is not an object")
    return doc


def entities_of(
    topic: str, parts: ConfigTopic, payload: bytes, *, max_bytes: int, gateway_id: str
) -> list[Entity] | None:
    """The entities a config message announces ([] for a removal); None for the gateway's
    own documents; `Rejected` for a document that cannot be read."""
    if not payload.strip():
        return []
    doc = expand(load_document(payload, max_bytes))
    if is_own(doc, gateway_id):
        return None
    fallback = parts.node_id or parts.object_id
    if parts.component == "device":
        components = doc.get("components")
        if not isinstance(components, dict) or not components:
            raise Rejected("bad_value", "a device document needs components (cmps)")
        if len(components) > MAX_COMPONENTS:
            raise Rejected("too_large", f"{len(components)} components (at most {MAX_COMPONENTS})")
        device = identity(doc, parts.object_id)
        shared = {k: v for k, v in doc.items() if k not in ("components", "device", "origin")}
        found = []
        for comp_id, comp in components.items():
            if not isinstance(comp, dict):
                raise Rejected("bad_value", f"component {comp_id!r} is not an object")
            if set(comp) <= {"platform"}:
                continue  # reduced to its platform: removed (Home Assistant's rule)
            merged = {**shared, **comp}
            found.append(
                build_entity(
                    merged,
                    key=f"{topic}#{comp_id}",
                    config_topic=topic,
                    component=str(comp.get("platform", "")),
                    object_id=str(comp.get("object_id") or comp_id),
                    device=device,
                )
            )
        return found
    device = identity(doc, fallback)
    return [
        build_entity(
            doc,
            key=topic,
            config_topic=topic,
            component=parts.component,
            object_id=parts.object_id,
            device=device,
        )
    ]
