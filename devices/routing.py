"""MQTT routes of the devices app (CONTRACT §3), mounted by `gateway/asgi.py`."""

from __future__ import annotations

from devices.consumers import PATTERNS, DeviceConsumer
from gateway.mqtt.routing import topic

mqtt_routes = [topic(PATTERNS, DeviceConsumer.as_asgi(), key=["device_id"], name="device")]
