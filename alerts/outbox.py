"""Where a stored alert change goes: every dashboard, the MQTT event topic, notifications.

- Dashboards: one ``{"type": "alert", "alert": {...}}`` frame inside the ``dashboard.events``
  message of group ``dashboard``, the path the telemetry and command frames take.
- MQTT: ``{"type": "alert.changed", "alert": {...}}`` to group `MQTT_GROUP`, where the
  bridge's `AlertPublisher` (alerts/mqtt.py) publishes it on ``gateway/<id>/alerts/<device>``.
- Evaluators (group `EVALUATORS_GROUP`, every process): what changed, so each keeps its
  in-memory view of open alerts in step with the database.
- Notifications (raised and cleared only): the loop's Apprise queue (alerts/notify.py).
"""

from __future__ import annotations

import asyncio
import logging

from channels.layers import get_channel_layer

from alerts.notify import get_notifier
from alerts.store import Change
from gateway.metrics import ALERT_DROPPED, ALERT_TRANSITIONS

logger = logging.getLogger(__name__)

DASHBOARD_GROUP = "dashboard"
MQTT_GROUP = "alerts-mqtt"
#: Every process's evaluator: rule changes (``alert.rules``) and alert changes (``alert.changed``,
#: so an evaluator forgets an alert another process cleared, or adopts one it raised).
EVALUATORS_GROUP = "alert-evaluators"
SEND_TIMEOUT = 5.0


def frame(change: Change) -> dict:
    """The dashboard's ``alert`` frame of a change."""
    return {"type": "alert", "alert": change.alert}


async def emit(changes: list[Change], notify: bool = True) -> None:
    """Send stored changes to dashboards and the MQTT publisher; queue their notifications."""
    if not changes:
        return
    for change in changes:
        ALERT_TRANSITIONS.labels(kind=change.kind).inc()
        if notify and change.kind in ("raised", "cleared"):
            get_notifier().submit(change)
    layer = get_channel_layer()
    if layer is None:
        return
    messages = [
        (DASHBOARD_GROUP, {"type": "dashboard.events", "events": [frame(c) for c in changes]}),
        *((MQTT_GROUP, {"type": "alert.changed", "alert": c.alert}) for c in changes),
        *((EVALUATORS_GROUP, {"type": "alert.changed", "alert": c.alert}) for c in changes),
    ]
    for group, message in messages:
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await layer.group_send(group, message)
        except Exception as exc:
            ALERT_DROPPED.labels(reason="layer_error").inc()
            logger.warning("alert change to group %s not sent: %r", group, exc)
