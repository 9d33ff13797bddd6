"""MQTT route of the alerts app (docs/alerts.md), mounted by `gateway/asgi.py`."""

from __future__ import annotations

from alerts.mqtt import AlertPublisher, alerts_topic
from gateway.mqtt.routing import TopicRoute, topic


def build_routes() -> list[TopicRoute]:
    """One static instance that starts the evaluator and publishes alert events on
    ``gateway/<id>/alerts/<device>``."""
    return [topic(alerts_topic(), AlertPublisher.as_asgi(), name="alerts", static=True)]


mqtt_routes = build_routes()
