"""The server's retained status topic (`online`/`offline`, its Last Will), kept `online` while
any bridge of the gateway runs.

All bridges of one gateway (`runmqtt --shared-group`) share `gateway/<GATEWAY_ID>/status`, so one
bridge's Last Will or shutdown says `offline` while the others still run. Each server therefore
listens to its own status topic and answers every live `offline` it hears with `online`
(docs/scale-out.md). It never answers `online`, so bridges cannot ping-pong; when the last
bridge is gone nobody answers and `offline` stays, as docs/interface.md §3.3 says.
"""

from __future__ import annotations

import asyncio
import logging

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

logger = logging.getLogger("gateway.mqtt")

ONLINE = b"online"
OFFLINE = b"offline"


class StatusTopic:
    """One server's status topic: its Will, its publishes, and the answer to others' `offline`."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._answers: set[asyncio.Task[None]] = set()

    def will(self) -> aiomqtt.Will:
        """`offline`, retained, QoS 1: what the broker says when the connection dies."""
        return aiomqtt.Will(self.topic, OFFLINE, qos=1, retain=True)

    def subscription(self, v5: bool) -> tuple[str, SubscribeOptions | int]:
        """The (never shared) subscription to hear the other bridges' `offline`.

        v5: No Local (our own publishes are not sent back) and no retained replay (we publish
        `online` right after subscribing anyway). 3.1.1 has neither: `heard` skips retained
        replays, and our own publishes are `online` (not answered) or the `offline` of
        shutdown, sent after the receive loop has stopped.
        """
        if v5:
            return self.topic, SubscribeOptions(qos=1, noLocal=True, retainHandling=2)
        return self.topic, 1

    async def publish(self, client: aiomqtt.Client, payload: bytes) -> None:
        """Publish `payload` retained with QoS 1 (waits for the PUBACK)."""
        await client.publish(self.topic, payload, qos=1, retain=True)

    def heard(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """Handle a message on the status topic: ack it; answer a live `offline` with `online`.

        Called by the receive loop instead of routing, only while connected. The answer is a
        task so routing never waits for its PUBACK; `cancel()` drops it if not yet sent.
        """
        if message.qos:
            client._client.ack(message.mid, message.qos)  # manual-ack mode: nobody else will
        payload = message.payload
        if message.retain or not isinstance(payload, bytes) or payload.lower() != OFFLINE:
            return
        logger.info("%s says offline while this bridge runs: publishing online", self.topic)
        task = asyncio.create_task(self._answer(client), name=f"status-answer[{self.topic}]")
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _answer(self, client: aiomqtt.Client) -> None:
        try:
            await self.publish(client, ONLINE)
        except (aiomqtt.MqttError, TimeoutError) as exc:  # the reconnect publishes it anyway
            logger.warning("could not republish 'online' status: %s", exc)

    def cancel(self) -> None:
        """Drop pending answers (shutdown, disconnect): `offline` must not be overtaken."""
        for task in self._answers:
            task.cancel()
