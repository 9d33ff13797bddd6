"""`MqttCommunicator`: drive an `mqtt` app in tests, like Channels' WebsocketCommunicator."""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from typing import Any

from channels.testing import ApplicationCommunicator

from gateway.exceptions import InvalidEvent
from gateway.mqtt.events import ASGI, validate_app_event
from gateway.mqtt.routing import find_topic_router

#: The type of the marker `MqttCommunicator.handled` queues; taken by `receive`, never handed on.
HANDLED = "mqtt.communicator.handled"


class TestAck:
    """The opaque `ack` handle the communicator gives a QoS 1/2 message (as the server does)."""

    __slots__ = ("topic", "acked")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.acked = False

    def __repr__(self) -> str:
        return f"<TestAck {self.topic!r} {'acked' if self.acked else 'pending'}>"


class MqttCommunicator(ApplicationCommunicator):
    """Builds an `mqtt` scope for one instance and validates what the app sends, as the server does.

    Either `MqttCommunicator(app, route="device", kwargs={"device_id": "d1"})` or
    `MqttCommunicator(app, topic="devices/d1/telemetry")` (resolved by the app's TopicRouter).
    """

    def __init__(
        self,
        application: Any,
        topic: str | None = None,
        *,
        route: str | int | None = None,
        kwargs: dict[str, str] | None = None,
        client_id: str = "test-gateway",
        broker: dict[str, Any] | None = None,
    ) -> None:
        self._future = None  # asgiref's __del__ reads it even if we raise below
        self.router = None
        if topic is not None:
            self.router = find_topic_router(application)
            match = self.router.resolve(topic)
            if match is None:
                raise ValueError(f"no route matches topic {topic!r}")
            route, kwargs = match.route, match.key_params
        elif route is None:
            raise TypeError("MqttCommunicator needs a topic or a route")
        else:
            try:
                self.router = find_topic_router(application)
            except ValueError:
                pass
        self.scope = {
            "type": "mqtt",
            "asgi": dict(ASGI),
            "broker": broker or {"host": "127.0.0.1", "port": 1883, "tls": False},
            "client_id": client_id,
            "route": route,
            "url_route": {"args": (), "kwargs": dict(kwargs or {})},
        }

        self.acks: list[TestAck] = []  # acknowledged handles, in order (not in the outputs)
        self._ack_seen: asyncio.Event | None = None

        async def validating_app(scope: dict[str, Any], receive: Any, send: Any) -> Any:
            async def marked_receive() -> Any:
                while True:
                    event = await receive()
                    if event.get("type") != HANDLED:
                        return event
                    if not event["reached"].done():
                        event["reached"].set_result(None)

            async def checked_send(event: Any) -> None:
                event = validate_app_event(event)
                if event["type"] == "mqtt.ack":
                    self._record_ack(event["ack"])
                    return
                await send(event)

            return await application(scope, marked_receive, checked_send)

        super().__init__(validating_app, self.scope)

    async def connect(self, session_present: bool = False) -> None:
        """Tell the app the broker session is up (`mqtt.connect`)."""
        await self.send_input({"type": "mqtt.connect", "session_present": session_present})

    async def disconnect(self, reason: str = "test") -> None:
        """Tell the app the broker connection was lost (`mqtt.disconnect`)."""
        await self.send_input({"type": "mqtt.disconnect", "reason": reason})

    async def send_message(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> TestAck | None:
        """Deliver an `mqtt.message`; `params`/`pattern` come from the router unless given.

        A QoS 1/2 message carries an `ack` handle, returned: see `wait_acked`.
        """
        pattern = ""
        if self.router is not None:
            match = self.router.resolve(topic)
            if match is not None:
                pattern = match.pattern
                if params is None:
                    params = match.params
        event = {
            "type": "mqtt.message",
            "topic": topic,
            "payload": payload.encode() if isinstance(payload, str) else payload,
            "qos": qos,
            "retain": retain,
            "properties": dict(properties or {}),
            "params": dict(params or {}),
            "pattern": pattern,
        }
        handle = event["ack"] = TestAck(topic) if qos else None
        if handle is None:
            del event["ack"]
        await self.send_input(event)
        return handle

    def _record_ack(self, handle: Any) -> None:
        if not isinstance(handle, TestAck):
            raise InvalidEvent(f"mqtt.ack: {handle!r} is not a handle this communicator gave")
        if not handle.acked:  # a second ack of one message is ignored, as the server does
            handle.acked = True
            self.acks.append(handle)
        if self._ack_seen is not None:
            self._ack_seen.set()

    async def wait_acked(self, handle: TestAck, timeout: float = 1) -> None:  # noqa: ASYNC109
        """Wait until the app acknowledged that message (`mqtt.ack`); TimeoutError if not."""
        async with asyncio.timeout(timeout):
            while not handle.acked:
                self._ack_seen = asyncio.Event()
                await self._ack_seen.wait()

    async def receive_publish(self, timeout: float = 1) -> dict[str, Any]:  # noqa: ASYNC109
        """The next event the app sent, which must be an `mqtt.publish`."""
        event = await self.receive_output(timeout)
        assert event["type"] == "mqtt.publish", f"expected mqtt.publish, got {event!r}"
        return event

    async def handled(self, timeout: float = 1) -> None:  # noqa: ASYNC109
        """Wait until the app has handled every event sent to it so far.

        A marker queued after those events is taken by the app's next `receive`, which a
        consumer calls only once it is done with the previous event (one at a time, in order),
        so whatever it sent for them is in the output queue by then. The app never sees the
        marker. Not covered: work the app hands on (a task, a thread, the telemetry pipeline)
        or a channel-layer message it handles while it waits in `receive`: wait for that
        work's own effect, or for a later message on the same path.
        """
        reached = asyncio.get_running_loop().create_future()
        await self.send_input({"type": HANDLED, "reached": reached})
        await asyncio.wait({reached, self.future}, timeout=timeout, return_when=FIRST_COMPLETED)
        if self.future.done():
            self.future.result()  # raises what the app raised
        if reached.done():
            return
        reached.cancel()
        if self.future.done():
            raise AssertionError("the app ended before it handled the events sent to it")
        raise TimeoutError(f"the app did not handle the events sent to it within {timeout} s")

    async def receive_nothing(self, timeout: float = 1) -> bool:  # noqa: ASYNC109
        """True if the app sent nothing (still unread) for the events sent to it so far.

        Decided once the app has `handled` them, not after a pause as in asgiref's version.
        """
        await self.handled(timeout)
        return self.output_queue.empty()

    async def retire(self, timeout: float = 1) -> None:  # noqa: ASYNC109
        """Send `mqtt.retire` and wait for the app to return (raises if it raised)."""
        await self.send_input({"type": "mqtt.retire", "reason": "test"})
        await self.wait(timeout)
