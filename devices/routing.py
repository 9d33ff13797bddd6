"""MQTT routes of the devices app (CONTRACT §3), mounted by `gateway/asgi.py`."""

from __future__ import annotations

from devices.consumers import PATTERNS, DeviceConsumer
from devices.tasmota import PATTERNS as TASMOTA_PATTERNS
from devices.tasmota import TasmotaConsumer
from gateway.mqtt.routing import topic

mqtt_routes = [
    topic(PATTERNS, DeviceConsumer.as_asgi(), key=["device_id"], name="device"),
    # Tasmota devices (devices/tasmota.py): their own instance per device id.
    topic(TASMOTA_PATTERNS, TasmotaConsumer.as_asgi(), key=["device_id"], name="tasmota"),
]
