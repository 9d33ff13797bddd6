"""`MqttConsumer`: the base class for applications of the `mqtt` protocol.

One instance serves one routing key (e.g. one device) for as long as messages keep coming, so
like a WebSocket consumer it has a channel name and may join groups.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer


class MqttConsumer(AsyncConsumer):
    """Dispatches `mqtt.*` events to `mqtt_*` handlers; helpers to publish and subscribe."""

    #: Channel-layer groups this instance joins on start and leaves on stop.
    groups: ClassVar[list[str]] = []

    def get_groups(self) -> list[str]:
        """The groups to join; override to compute them from `self.scope`."""
        return list(self.groups)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the instance, leaving its groups whatever way it ends."""
        self._joined: list[str] | None = None
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._joined:
                # Shielded: the server may be cancelling us after a retire grace period.
                await asyncio.shield(self._leave_groups())

    async def _leave_groups(self) -> None:
        for group in self._joined:
            await self.channel_layer.group_discard(group, self.channel_name)
        self._joined = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Call the handler for `message["type"]`, without Channels' per-message thread hop.

        `AsyncConsumer.dispatch` awaits `aclose_old_connections()` before every handler: a hop to
        a worker thread (~0.1 ms) to close stale database connections. MQTT consumers never
        touch the database directly (readings go to the telemetry pipeline, which writes in
        batches from its own thread), so at thousands of messages per second that hop is pure
        cost. A subclass that does its own ORM calls must use `database_sync_to_async`.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        if self._joined is None:
            self._joined = []
            if self.channel_layer is not None:
                for group in self.get_groups():
                    await self.channel_layer.group_add(group, self.channel_name)
                    self._joined.append(group)
        await handler(message)

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
