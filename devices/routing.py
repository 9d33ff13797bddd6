"""MQTT routes of the devices app (CONTRACT §3), mounted by `gateway/asgi.py`."""

from __future__ import annotations

from devices import homeassistant
from devices.consumers import PATTERNS, DeviceConsumer
from devices.homeassistant import HomeAssistantConsumer
from devices.tasmota import PATTERNS as TASMOTA_PATTERNS
from devices.tasmota import TasmotaConsumer
from gateway.mqtt.routing import TopicRoute, topic


def build_routes() -> list[TopicRoute]:
    """The routes, as the settings say (Home Assistant discovery is optional)."""
    routes = [
        topic(PATTERNS, DeviceConsumer.as_asgi(), key=["device_id"], name="device"),
        # Tasmota devices (devices/tasmota.py): their own instance per device id.
        topic(TASMOTA_PATTERNS, TasmotaConsumer.as_asgi(), key=["device_id"], name="tasmota"),
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
    # Alert events (docs/alerts.md): one static instance that starts the evaluator and
    # publishes on gateway/<id>/alerts/<device>.
    from alerts.mqtt import AlertPublisher, alerts_topic

    routes.append(topic(alerts_topic(), AlertPublisher.as_asgi(), name="alerts", static=True))
    return routes


mqtt_routes = build_routes()
