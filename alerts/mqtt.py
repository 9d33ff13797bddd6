"""Alert events on MQTT: ``gateway/<GATEWAY_ID>/alerts/<device>``, JSON, QoS 1, not retained.

`AlertPublisher` is a static `mqtt` application (the Home Assistant discovery publisher's pattern,
devices/conventions/homeassistant.py): the bridge starts it on every broker connect; it starts this
loop's alert evaluator and publishes every ``alert.changed`` message of group `MQTT_GROUP`
(alerts/outbox.py). Its route listens on ``gateway/<id>/alerts/+``, which carries only these events:
the echoes of its own publishes are ignored.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from django.conf import settings

from alerts.hooks import current_evaluator, start_evaluator
from alerts.outbox import MQTT_GROUP
from gateway.metrics import ALERT_DROPPED
from gateway.mqtt.consumer import MqttConsumer

logger = logging.getLogger(__name__)


def alerts_topic(device: str = "+") -> str:
    """``gateway/<GATEWAY_ID>/alerts/<device>`` (``+``: the route's filter)."""
    return f"gateway/{settings.GATEWAY['GATEWAY_ID']}/alerts/{device}"


class AlertPublisher(MqttConsumer):
    """Publishes alert changes on the broker; starts the evaluator where the bridge runs."""

    groups = [MQTT_GROUP]

    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        """The broker session is up: make sure this loop evaluates rules."""
        start_evaluator()

    async def on_retire(self) -> None:
        """The bridge stops: store what the evaluator decided, stop its timers."""
        evaluator = current_evaluator()
        if evaluator is not None:
            await evaluator.close()

    async def mqtt_message(self, event: dict[str, Any]) -> None:
        """Our own events coming back (the route's topic): nothing to do."""

    async def alert_changed(self, event: dict[str, Any]) -> None:
        """One alert change: publish it, QoS 1, not retained (counted when the broker is away)."""
        alert = event.get("alert")
        if not isinstance(alert, dict) or not isinstance(alert.get("device"), str):
            return
        try:
            await self.publish(alerts_topic(alert["device"]), orjson.dumps(alert), qos=1)
        except Exception as exc:
            ALERT_DROPPED.labels(reason="mqtt_unavailable").inc()
            logger.warning("alert %s not published on MQTT: %s", alert.get("id"), exc)
