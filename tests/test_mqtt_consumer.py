"""MqttConsumer and MqttCommunicator units: consumers defined in the test, no broker."""

from __future__ import annotations

import asyncio
import time

import pytest
from channels.layers import get_channel_layer

from gateway.exceptions import InvalidEvent
from gateway.mqtt.consumer import MqttConsumer
from gateway.mqtt.events import properties_from_dict, properties_to_dict, validate_app_event
from gateway.mqtt.routing import TopicRouter, topic
from gateway.mqtt.testing import MqttCommunicator
from tests.support.waiting import eventually


class EchoConsumer(MqttConsumer):
    """Echoes each message to echo/<device_id>/<metric or 'all'>, and records lifecycle events."""

    retired: list[str] = []

    def get_groups(self) -> list[str]:
        return [f"device.{self.scope['url_route']['kwargs']['device_id']}"]

    async def mqtt_message(self, message):
        device = self.scope["url_route"]["kwargs"]["device_id"]
        metric = message["params"].get("metric", "all")
        await self.publish(f"echo/{device}/{metric}", message["payload"], qos=message["qos"])

    async def mqtt_disconnect(self, message):
        await self.publish("echo/lifecycle", f"disconnect:{message['reason']}")

    async def device_ping(self, message):
        await self.publish("echo/ping", message["text"])

    async def on_retire(self):
        self.retired.append(self.scope["url_route"]["kwargs"]["device_id"])


def make_app() -> TopicRouter:
    return TopicRouter(
        [
            topic(
                ["devices/{device_id}/telemetry", "devices/{device_id}/telemetry/{metric}"],
                EchoConsumer.as_asgi(),
                name="device",
            )
        ]
    )


async def test_message_to_publish_with_params_from_router():
    comm = MqttCommunicator(make_app(), topic="devices/d1/telemetry")
    assert comm.scope["route"] == "device"
    assert comm.scope["url_route"]["kwargs"] == {"device_id": "d1"}
    assert comm.scope["asgi"] == {"version": "3.0", "spec_version": "1.0"}
    await comm.connect()
    await comm.send_message("devices/d1/telemetry/temperature", "21.5", qos=1)
    event = await comm.receive_publish()
    assert event == {
        "type": "mqtt.publish",
        "topic": "echo/d1/temperature",
        "payload": b"21.5",
        "qos": 1,
        "retain": False,
        "properties": None,
    }
    await comm.send_message("devices/d1/telemetry", b"{}")
    assert (await comm.receive_publish())["topic"] == "echo/d1/all"
    # Sentinel: the next message's echo is the next output; nothing else came of those two.
    await comm.send_message("devices/d1/telemetry/sentinel", b"1")
    assert (await comm.receive_publish())["topic"] == "echo/d1/sentinel"
    await comm.retire()


async def test_route_kwargs_scope_and_explicit_params():
    comm = MqttCommunicator(make_app(), route="device", kwargs={"device_id": "d7"})
    await comm.send_message("anything", b"x", params={"device_id": "d7", "metric": "m"})
    assert (await comm.receive_publish())["topic"] == "echo/d7/m"
    await comm.retire()


async def test_disconnect_keeps_instance_alive():
    comm = MqttCommunicator(make_app(), topic="devices/d2/telemetry")
    await comm.connect()
    await comm.disconnect("broker gone")
    assert (await comm.receive_publish())["payload"] == b"disconnect:broker gone"
    await comm.connect(session_present=True)
    await comm.send_message("devices/d2/telemetry", b"1")
    assert (await comm.receive_publish())["topic"] == "echo/d2/all"
    await comm.retire()


async def test_groups_joined_on_first_event_and_left_on_retire():
    layer = get_channel_layer()
    comm = MqttCommunicator(make_app(), topic="devices/d3/telemetry")
    await comm.connect()
    await eventually(lambda: layer.groups.get("device.d3"), what="device.d3 joined")
    await layer.group_send("device.d3", {"type": "device.ping", "text": "hello"})
    assert (await comm.receive_publish())["payload"] == b"hello"  # the first output: none before
    await comm.retire()
    assert "d3" in EchoConsumer.retired
    assert not layer.groups.get("device.d3")


async def test_dispatch_makes_no_thread_hop(monkeypatch):
    """AsyncConsumer.dispatch would await aclose_old_connections per message; ours must not."""

    async def forbidden():
        raise AssertionError("aclose_old_connections called")

    monkeypatch.setattr("channels.consumer.aclose_old_connections", forbidden)
    comm = MqttCommunicator(make_app(), topic="devices/d4/telemetry")
    await comm.send_message("devices/d4/telemetry", b"1")
    assert (await comm.receive_publish())["topic"] == "echo/d4/all"
    await comm.retire()


class BadConsumer(MqttConsumer):
    async def mqtt_message(self, message):
        await self.publish("out/#", b"x")


async def test_invalid_event_raises_from_send():
    app = TopicRouter([topic("in/{id}", BadConsumer.as_asgi())])
    comm = MqttCommunicator(app, topic="in/1")
    await comm.send_message("in/1", b"x")
    with pytest.raises(InvalidEvent, match="wildcards"):
        await comm.wait(1)


async def test_unhandled_event_type_raises():
    app = TopicRouter([topic("in/{id}", MqttConsumer.as_asgi())])
    comm = MqttCommunicator(app, topic="in/1")
    await comm.send_message("in/1", b"x")  # MqttConsumer has no mqtt_message handler
    with pytest.raises(ValueError, match="No handler"):
        await comm.wait(1)


class SlowConsumer(MqttConsumer):
    """Echoes a message after blocking work in a thread (as a database call is); `quiet`
    messages are handled without a word."""

    async def mqtt_message(self, message):
        if message["payload"] != b"quiet":
            await asyncio.to_thread(time.sleep, 0.3)
            await self.publish("out/slow", message["payload"])


async def test_receive_nothing_is_decided_once_the_app_handled_what_it_was_sent():
    comm = MqttCommunicator(TopicRouter([topic("in/{id}", SlowConsumer.as_asgi())]), topic="in/1")
    await comm.send_message("in/1", b"quiet")
    # The marker behind it never reaches the app, which has no handler for it and would raise.
    assert await comm.receive_nothing()
    await comm.send_message("in/1", b"late")
    # Not a quiet spell: asgiref's receive_nothing (0.1 s of silence) would say True here.
    assert not await comm.receive_nothing(timeout=5)
    assert comm.output_queue.get_nowait()["payload"] == b"late"  # there already
    await comm.retire()


async def test_handled_raises_what_the_app_raised():
    comm = MqttCommunicator(TopicRouter([topic("in/{id}", BadConsumer.as_asgi())]), topic="in/1")
    await comm.send_message("in/1", b"x")
    with pytest.raises(InvalidEvent, match="wildcards"):
        await comm.handled()


def test_communicator_needs_a_known_topic_or_route():
    with pytest.raises(ValueError, match="no route"):
        MqttCommunicator(make_app(), topic="nowhere")
    with pytest.raises(TypeError):
        MqttCommunicator(make_app())


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"type": "mqtt.publish", "topic": "a/+", "payload": b""}, "wildcards"),
        ({"type": "mqtt.publish", "topic": "", "payload": b""}, "non-empty"),
        ({"type": "mqtt.publish", "topic": "a", "payload": 5}, "bytes or str"),
        ({"type": "mqtt.publish", "topic": "a", "payload": None}, "bytes or str"),
        ({"type": "mqtt.publish", "topic": "a", "payload": b"", "qos": 3}, "qos"),
        ({"type": "mqtt.publish", "topic": "a", "payload": b"", "qos": True}, "qos"),
        ({"type": "mqtt.publish", "topic": "a", "payload": b"", "retain": 1}, "retain"),
        ({"type": "mqtt.publish", "topic": "a", "payload": b"", "properties": {"x": 1}}, "unknown"),
        (
            {
                "type": "mqtt.publish",
                "topic": "a",
                "payload": b"",
                "properties": {"content_type": 1},
            },
            "invalid value",
        ),
        ({"type": "mqtt.subscribe", "topic": "a/#/b"}, "last level"),
        ({"type": "mqtt.subscribe", "topic": "a/b+"}, "whole level"),
        ({"type": "mqtt.subscribe", "topic": "a", "qos": "1"}, "qos"),
        ({"type": "mqtt.unsubscribe"}, "non-empty"),
        ({"type": "mqtt.accept"}, "unknown event type"),
        ({"topic": "a"}, "unknown event type"),
        ("mqtt.publish", "must be a dict"),
    ],
)
def test_validate_app_event_rejects(event, message):
    with pytest.raises(InvalidEvent, match=message):
        validate_app_event(event)
    assert issubclass(InvalidEvent, ValueError)


def test_validate_app_event_normalises():
    assert validate_app_event({"type": "mqtt.publish", "topic": "a/b", "payload": "é"}) == {
        "type": "mqtt.publish",
        "topic": "a/b",
        "payload": "é".encode(),
        "qos": 0,
        "retain": False,
        "properties": None,
    }
    assert validate_app_event({"type": "mqtt.subscribe", "topic": "a/+/#"})["qos"] == 0
    props = {"content_type": "application/json", "user_properties": {"k": "v"}}
    event = validate_app_event(
        {"type": "mqtt.publish", "topic": "a", "payload": b"", "properties": props}
    )
    assert properties_to_dict(properties_from_dict(event["properties"])) == {
        "content_type": "application/json",
        "user_properties": [("k", "v")],
    }
