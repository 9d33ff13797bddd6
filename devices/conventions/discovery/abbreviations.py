"""Home Assistant discovery abbreviations and the ``~`` base topic.

The keys are those of Home Assistant's MQTT abbreviation list (homeassistant/components/mqtt/
abbreviations.py: ``ABBREVIATIONS``, ``DEVICE_ABBREVIATIONS``, ``ORIGIN_ABBREVIATIONS``) that
matter to the components this gateway ingests (docs/conventions.md); other keys are kept as
they are and ignored. ``expand`` applies them to an entity document, its ``dev``, ``o``,
``avty`` entries and each ``cmps`` component, then replaces ``~`` at the start or end of every
``…_topic`` / ``topic`` value with the document's ``~`` (Home Assistant's rule).
"""

from __future__ import annotations

from typing import Any

ABBREVIATIONS: dict[str, str] = {
    "avty": "availability",
    "avty_mode": "availability_mode",
    "avty_t": "availability_topic",
    "avty_tpl": "availability_template",
    "bri_cmd_t": "brightness_command_topic",
    "bri_cmd_tpl": "brightness_command_template",
    "bri_scl": "brightness_scale",
    "bri_stat_t": "brightness_state_topic",
    "bri_val_tpl": "brightness_value_template",
    "cmd_t": "command_topic",
    "cmd_tpl": "command_template",
    "cmps": "components",
    "dev": "device",
    "dev_cla": "device_class",
    "e": "encoding",
    "en": "enabled_by_default",
    "ent_cat": "entity_category",
    "exp_aft": "expire_after",
    "ic": "icon",
    "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template",
    "max": "max",
    "min": "min",
    "name": "name",
    "o": "origin",
    "obj_id": "object_id",
    "ops": "options",
    "opt": "optimistic",
    "p": "platform",
    "pl_avail": "payload_available",
    "pl_cls": "payload_close",
    "pl_not_avail": "payload_not_available",
    "pl_off": "payload_off",
    "pl_on": "payload_on",
    "pl_open": "payload_open",
    "pl_prs": "payload_press",
    "pl_stop": "payload_stop",
    "pos_t": "position_topic",
    "pos_tpl": "position_template",
    "qos": "qos",
    "ret": "retain",
    "schema": "schema",
    "set_pos_t": "set_position_topic",
    "set_pos_tpl": "set_position_template",
    "stat_cla": "state_class",
    "stat_clsd": "state_closed",
    "stat_closing": "state_closing",
    "stat_off": "state_off",
    "stat_on": "state_on",
    "stat_open": "state_open",
    "stat_opening": "state_opening",
    "stat_stopped": "state_stopped",
    "stat_t": "state_topic",
    "stat_tpl": "state_template",
    "stat_val_tpl": "state_value_template",
    "step": "step",
    "sug_dsp_prc": "suggested_display_precision",
    "t": "topic",
    "uniq_id": "unique_id",
    "unit_of_meas": "unit_of_measurement",
    "val_tpl": "value_template",
}
DEVICE_ABBREVIATIONS: dict[str, str] = {
    "cns": "connections",
    "cu": "configuration_url",
    "hw": "hw_version",
    "ids": "identifiers",
    "mf": "manufacturer",
    "mdl": "model",
    "mdl_id": "model_id",
    "name": "name",
    "sa": "suggested_area",
    "sn": "serial_number",
    "sw": "sw_version",
    "via_device": "via_device",
}
ORIGIN_ABBREVIATIONS: dict[str, str] = {"name": "name", "sw": "sw_version", "url": "support_url"}


def _renamed(doc: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    return {table.get(key, key): value for key, value in doc.items()}


def _tilde(doc: dict[str, Any], base: Any) -> None:
    """Replace a leading or trailing ``~`` of every topic value with `base` (in place)."""
    if not isinstance(base, str):
        return
    for key, value in doc.items():
        if (key == "topic" or key.endswith("_topic")) and isinstance(value, str):
            if value.startswith("~"):
                doc[key] = base + value[1:]
            elif value.endswith("~"):
                doc[key] = value[:-1] + base


def expand_entity(doc: dict[str, Any], base: Any = None) -> dict[str, Any]:
    """One entity (or device) document with full key names and ``~`` resolved."""
    out = _renamed(doc, ABBREVIATIONS)
    own = out.pop("~", None)
    base = own if own is not None else base
    if isinstance(out.get("device"), dict):
        out["device"] = _renamed(out["device"], DEVICE_ABBREVIATIONS)
    if isinstance(out.get("origin"), dict):
        out["origin"] = _renamed(out["origin"], ORIGIN_ABBREVIATIONS)
    availability = out.get("availability")
    if isinstance(availability, list):
        entries = []
        for entry in availability:
            if isinstance(entry, dict):
                entry = _renamed(entry, ABBREVIATIONS)
                _tilde(entry, base)
            entries.append(entry)
        out["availability"] = entries
    _tilde(out, base)
    if own is not None:
        out["~"] = own
    return out


def expand(doc: dict[str, Any]) -> dict[str, Any]:
    """A discovery document expanded, components (device-level ``cmps``) included; a
    component inherits the document's ``~`` unless it has its own."""
    out = expand_entity(doc)
    components = out.get("components")
    if isinstance(components, dict):
        out["components"] = {
            key: expand_entity(comp, out.get("~")) if isinstance(comp, dict) else comp
            for key, comp in components.items()
        }
    return out
