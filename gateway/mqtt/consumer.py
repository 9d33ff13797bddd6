"""`MqttConsumer`: the base class for applications of the `mqtt` protocol.

One instance serves one routing key (e.g. one device) for as long as messages keep coming, so
like a WebSocket consumer it has a channel name and may join groups.
"""

from __future__ import annotations

from typing import Any

from channels.exceptions import StopConsumer

from gateway.consumer import BridgeConsumer


class MqttConsumer(BridgeConsumer):
    """Dispatches `mqtt.*` events to `mqtt_*` handlers; helpers to publish and subscribe."""

    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        """The broker session is (re-)established; nothing to do by default."""

    async def mqtt_disconnect(self, message: dict[str, Any]) -> None:
        """The broker connection was lost; the instance stays alive. Nothing by default."""

    async def mqtt_retire(self, message: dict[str, Any]) -> None:
        """The server retires this instance (idle or shutdown): run `on_retire`, then stop."""
        await self.on_retire()
        raise StopConsumer()

    async def on_retire(self) -> None:
        """Hook: flush or save anything before the instance goes away."""

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> None:
        """Publish to the broker; raises BrokerUnavailable while disconnected."""
        event: dict[str, Any] = {"type": "mqtt.publish", "topic": topic, "payload": payload}
        event.update(qos=qos, retain=retain)
        if properties:
            event["properties"] = properties
        await self.send(event)

    async def subscribe(self, topic: str, qos: int = 0) -> None:
        """Subscribe to a filter (kept across reconnects); its messages go through the router."""
        await self.send({"type": "mqtt.subscribe", "topic": topic, "qos": qos})

    async def unsubscribe(self, topic: str) -> None:
        """Drop a subscription this or another instance asked for."""
        await self.send({"type": "mqtt.unsubscribe", "topic": topic})
