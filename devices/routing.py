"""MQTT routes of the devices app (docs/interface.md §3), mounted by `gateway/asgi.py`."""

from __future__ import annotations

from devices.admission import DeviceAdmission, RouteAdmission
from devices.conventions import homeassistant
from devices.conventions.discovery import consumer as discovery
from devices.conventions.discovery.registry import TOPICS
from devices.conventions.homeassistant import HomeAssistantConsumer
from devices.conventions.native import PATTERNS, DeviceConsumer
from devices.conventions.tasmota import PATTERNS as TASMOTA_PATTERNS
from devices.conventions.tasmota import TasmotaConsumer
from devices.conventions.tasmota_payloads import device_id_for
from gateway.mqtt.routing import TopicRoute, topic

#: Longest topic level taken as a Tasmota device's MQTT Topic (Tasmota allows 32 characters).
TASMOTA_TOPIC_MAX = 64
#: New devices are admitted by one policy whatever their convention (devices/admission.py).
ADMISSION = DeviceAdmission()


def tasmota_device_id(topic: str) -> str:
    """The device id of a Tasmota topic level; "" (refused) when it is too long to be one."""
    return device_id_for(topic) if len(topic) <= TASMOTA_TOPIC_MAX else ""


def build_routes() -> list[TopicRoute]:
    """The routes, as the settings say (Home Assistant discovery is optional)."""
    routes = [
        topic(
            PATTERNS,
            DeviceConsumer.as_asgi(),
            key=["device_id"],
            name="device",
            admit=RouteAdmission(ADMISSION),
        ),
        # Tasmota devices (devices/conventions/tasmota.py): their own instance per device id.
        topic(
            TASMOTA_PATTERNS,
            TasmotaConsumer.as_asgi(),
            key=["device_id"],
            name="tasmota",
            admit=RouteAdmission(ADMISSION, tasmota_device_id),
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
    if discovery.enabled():
        # Self-describing devices (docs/conventions.md): one static instance for the config
        # topics, then one instance per state/availability topic it subscribed (last, so it
        # never shadows a convention above; TOPICS.accepts: only those topics).
        routes.append(
            topic(
                discovery.config_patterns(),
                discovery.DiscoveryConsumer.as_asgi(),
                key=[],
                name="discovery",
                static=True,
            )
        )
        routes.append(
            topic(
                "{topic:#}",
                discovery.EntityConsumer.as_asgi(),
                key=["topic"],
                name="discovered",
                subscribe=False,
                accepts=TOPICS.accepts,
            )
        )
    return routes


mqtt_routes = build_routes()
