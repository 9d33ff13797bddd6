"""MQTT routes of the devices app (docs/interface.md §3), mounted by `gateway/asgi.py`."""

from __future__ import annotations

from collections.abc import Mapping

from devices.conventions import homeassistant
from devices.conventions.homeassistant import HomeAssistantConsumer
from devices.conventions.native import PATTERNS, DeviceConsumer
from devices.conventions.tasmota import PATTERNS as TASMOTA_PATTERNS
from devices.conventions.tasmota import TasmotaConsumer
from devices.telemetry.parsing import valid_device_id
from gateway.mqtt.routing import TopicRoute, topic

#: Longest topic level taken as a Tasmota device's MQTT Topic (Tasmota allows 32 characters).
TASMOTA_TOPIC_MAX = 64


def native_device(key: Mapping[str, str]) -> str | None:
    """A native device id must be valid before any instance is made for it."""
    return None if valid_device_id(key["device_id"]) else "bad_device_id"


def tasmota_device(key: Mapping[str, str]) -> str | None:
    """A Tasmota topic level must be short before any instance is made for it."""
    return None if len(key["device_id"]) <= TASMOTA_TOPIC_MAX else "bad_device_id"


def build_routes() -> list[TopicRoute]:
    """The routes, as the settings say (Home Assistant discovery is optional)."""
    routes = [
        topic(
            PATTERNS,
            DeviceConsumer.as_asgi(),
            key=["device_id"],
            name="device",
            admit=native_device,
        ),
        # Tasmota devices (devices/conventions/tasmota.py): their own instance per device id.
        topic(
            TASMOTA_PATTERNS,
            TasmotaConsumer.as_asgi(),
            key=["device_id"],
            name="tasmota",
            admit=tasmota_device,
        ),
    ]
    if homeassistant.enabled():
        # Home Assistant discovery (docs/homeassistant.md): one static instance, started on
        # every connect, that also hears Home Assistant's birth message on <prefix>/status.
        routes.append(
            topic(
                f"{homeassistant.prefix()}/status",
                HomeAssistantConsumer.as_asgi(),
                name="homeassistant",
                static=True,
            )
        )
    return routes


mqtt_routes = build_routes()
