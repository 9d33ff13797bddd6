"""`MqttConsumer`: the base class for applications of the `mqtt` protocol.

One instance serves one routing key (e.g. one device) for as long as messages keep coming, so
like a WebSocket consumer it has a channel name and may join groups.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from channels.exceptions import StopConsumer

from gateway.consumer import BridgeConsumer

#: Acknowledges one QoS 1/2 message to the broker when awaited (see `MqttConsumer.defer_ack`).
AckCallback = Callable[[], Awaitable[None]]


class MqttConsumer(BridgeConsumer):
    """Dispatches `mqtt.*` events to `mqtt_*` handlers; helpers to publish and subscribe.

    A QoS 1/2 message is acknowledged (`mqtt.ack`) once its handler returns, or raises (the
    failure is counted; redelivering a message that breaks the handler would not help),
    unless the handler took that over with `defer_ack`, e.g. until the data is stored.
    """

    #: The `ack` handle of the QoS 1/2 message being handled; None once deferred (or QoS 0).
    _ack: Any = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Dispatch, then acknowledge a QoS 1/2 message unless its handler deferred that."""
        ack = message.get("ack")
        if ack is None:
            await super().dispatch(message)
            return
        self._ack = ack
        try:
            await super().dispatch(message)
        except Exception:
            await self.send({"type": "mqtt.ack", "ack": ack})
            raise
        finally:
            undeferred, self._ack = self._ack, None
        if undeferred is not None:
            await self.send({"type": "mqtt.ack", "ack": ack})

    def defer_ack(self) -> AckCallback | None:
        """Take over acknowledging the message being handled: await the returned callable
        once it is safe, e.g. stored (a second call does nothing). None when there is
        nothing to acknowledge (QoS 0, or already deferred)."""
        ack, self._ack = self._ack, None
        if ack is None:
            return None
        return functools.partial(self.send, {"type": "mqtt.ack", "ack": ack})

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
