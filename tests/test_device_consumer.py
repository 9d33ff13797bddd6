"""DeviceConsumer driven through the real TopicRouter with MqttCommunicator, real layer and DB."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from channels.db import database_sync_to_async

from devices.models import Device, Reading
from devices.routing import mqtt_routes
from devices.telemetry.pipeline import current_pipeline
from gateway.mqtt.routing import TopicRouter
from gateway.mqtt.testing import MqttCommunicator
from tests.support.checks import rejected

pytestmark = pytest.mark.django_db(transaction=True)
TS = 1_764_214_000.0


@pytest.fixture
def app():
    return TopicRouter(mqtt_routes)


@pytest.fixture
async def device(app, layer):
    """A running consumer instance for device d1."""
    comm = MqttCommunicator(app, topic="devices/d1/telemetry")
    await comm.connect()
    yield comm
    await comm.retire()


async def frames(layer, channel, count: int, wait: float = 5.0) -> list[dict]:
    """The next `count` dashboard frames (across however many batches they come in)."""
    out: list[dict] = []
    async with asyncio.timeout(wait):
        while len(out) < count:
            message = await layer.receive(channel)
            assert message["type"] == "dashboard.events"
            out += message["events"]
    return out


async def sentinel_is_next(comm: MqttCommunicator, device: str, layer, dashboard) -> None:
    """A reading sent now is the next frame: nothing else came from what was sent before it."""
    await comm.send_message(f"devices/{device}/telemetry", b'{"sentinel": 1}')
    received = await frames(layer, dashboard, 1)
    assert [(f["device"], f["metrics"]) for f in received] == [(device, {"sentinel": 1.0})]


def test_routes_cover_the_contract_topics():
    router = TopicRouter(mqtt_routes)
    # The Tasmota routes (tests/test_tasmota.py) come after these.
    assert router.subscriptions[:4] == [
        "devices/+/telemetry",
        "devices/+/telemetry/+",
        "devices/+/status",
        "devices/+/commands/ack",
    ]
    match = router.resolve("devices/d1/telemetry/temperature")
    assert match.key_params == {"device_id": "d1"} and match.params["metric"] == "temperature"
    assert router.resolve("devices/d1/other") is None


async def test_telemetry_reaches_dashboard_and_database(device, layer, dashboard):
    payload = orjson.dumps({"temperature": 21.5, "humidity": 40, "ts": TS, "env": {"ok": True}})
    await device.send_message("devices/d1/telemetry", payload)
    status, telemetry = await frames(layer, dashboard, 2)
    assert status["type"] == "status" and status["device"] == "d1" and status["online"] is True
    assert telemetry == {
        "type": "telemetry",
        "device": "d1",
        "ts": TS,
        "metrics": {"temperature": 21.5, "humidity": 40.0, "env.ok": True},
    }
    await current_pipeline().flush()
    stored = await database_sync_to_async(
        lambda: sorted(Reading.objects.values_list("device_id", "metric", "value"))
    )()
    assert stored == [("d1", "env.ok", 1.0), ("d1", "humidity", 40.0), ("d1", "temperature", 21.5)]
    d1 = await database_sync_to_async(Device.objects.get)(id="d1")
    assert (d1.transport, d1.online) == ("mqtt", True)


async def test_single_metric_and_status(device, layer, dashboard):
    await device.send_message("devices/d1/telemetry/co2", b" 612 ")
    status, telemetry = await frames(layer, dashboard, 2)
    assert telemetry["metrics"] == {"co2": 612.0} and telemetry["device"] == "d1"
    # a retained Last Will replayed by the broker counts like a live one
    await device.send_message("devices/d1/status", b"OFFLINE", qos=1, retain=True)
    (offline,) = await frames(layer, dashboard, 1)
    assert (offline["type"], offline["online"]) == ("status", False)
    await device.send_message("devices/d1/status", b"online\n", retain=True)
    (online,) = await frames(layer, dashboard, 1)
    assert online["online"] is True


@pytest.mark.parametrize(
    "topic, payload, reason",
    [
        ("devices/d1/telemetry", b"{not json", "bad_json"),
        ("devices/d1/telemetry", b"[1]", "not_object"),
        ("devices/d1/telemetry", b'{"a": "x"}', "no_metrics"),
        ("devices/d1/telemetry", b'{"a": 1, "ts": 5}', "bad_timestamp"),
        ("devices/d1/telemetry", b"\xff\xfe", "bad_encoding"),
        ("devices/d1/telemetry", b'{"a": 1, "pad": "' + b"x" * 70_000 + b'"}', "too_large"),
        ("devices/d1/telemetry/temp", b"warm", "bad_value"),
        ("devices/d1/telemetry/te\x01mp", b"1", "bad_value"),
        ("devices/d1/status", b"maybe", "bad_status"),
        ("devices/d1/commands/ack", b'{"id": "nope", "ok": true}', "unknown_command"),
        (
            "devices/d1/commands/ack",
            b'{"id": "6f1c2a3e-0000-4000-8000-000000000000", "ok": true}',
            "unknown_command",
        ),
        ("devices/d1/commands/ack", b'{"ok": true}', "bad_value"),
    ],
)
async def test_bad_payload_counted_and_next_message_still_works(
    device, layer, dashboard, topic, payload, reason
):
    before = rejected(reason)
    await device.send_message(topic, payload)
    await device.send_message("devices/d1/telemetry", b'{"t": 1}')
    received = await frames(layer, dashboard, 2)
    assert received[-1]["metrics"] == {"t": 1.0}
    assert rejected(reason) - before == 1
    await sentinel_is_next(device, "d1", layer, dashboard)


async def test_bad_device_id_counted_per_message_and_joins_no_group(app, layer, dashboard):
    before = rejected("bad_device_id")
    bad = MqttCommunicator(app, topic="devices/bad.id/telemetry")
    await bad.connect()
    for _ in range(3):
        await bad.send_message("devices/bad.id/telemetry", b'{"t": 1}')
    assert not any(g.startswith("device.bad") for g in layer.groups)
    await bad.retire()  # returns once every queued message was handled
    assert rejected("bad_device_id") - before == 3
    good = MqttCommunicator(app, topic="devices/ok/telemetry")
    await good.send_message("devices/ok/telemetry", b'{"t": 2}')
    received = await frames(layer, dashboard, 2)
    assert {f["device"] for f in received} == {"ok"}
    await sentinel_is_next(good, "ok", layer, dashboard)  # nothing ever came from the bad id
    assert "device.ok" in layer.groups
    await good.retire()
    assert "device.ok" not in layer.groups  # left on retire


async def test_unexpected_error_is_contained(device, layer, dashboard, caplog):
    before = rejected("consumer_error")
    broken = {
        "type": "mqtt.message",
        "topic": "devices/d1/telemetry",
        "payload": None,  # never sent by the server: makes the handler itself fail
        "qos": 0,
        "retain": False,
        "properties": {},
        "params": {"device_id": "d1"},
        "pattern": "devices/{device_id}/telemetry",
    }
    with caplog.at_level(logging.ERROR, logger="devices.conventions.native"):
        await device.send_input(broken)
        await device.send_message("devices/d1/telemetry", b'{"t": 3}')
        received = await frames(layer, dashboard, 2)
    assert received[-1]["metrics"] == {"t": 3.0}
    assert rejected("consumer_error") - before == 1
    assert any(r.exc_info for r in caplog.records), "logged with a traceback"


async def test_device_command_is_published_qos1(device, layer):
    async with asyncio.timeout(5):
        while "device.d1" not in layer.groups:  # noqa: ASYNC110 - joined on mqtt.connect
            await asyncio.sleep(0.01)
    await layer.group_send(
        "device.d1",
        {"type": "device.command", "id": "c-1", "name": "set_interval", "args": {"seconds": 5}},
    )
    event = await device.receive_publish(timeout=5)
    assert event["topic"] == "devices/d1/commands"
    assert (event["qos"], event["retain"]) == (1, False)
    assert orjson.loads(event["payload"]) == {
        "id": "c-1",
        "name": "set_interval",
        "args": {"seconds": 5},
    }


async def test_command_service_delivery_and_ack(device, layer, dashboard, django_user_model):
    from devices.commands import service as commands
    from devices.commands.timers import get_timers
    from devices.models import Command

    async with asyncio.timeout(5):
        while "device.d1" not in layer.groups:  # noqa: ASYNC110 - joined on mqtt.connect
            await asyncio.sleep(0.01)
    staff = await database_sync_to_async(django_user_model.objects.create_user)(
        "ops", password="pw-ops-12345", is_staff=True
    )
    await database_sync_to_async(Device.objects.create)(id="d1")
    # Commands go out only to a device heard online (held otherwise): it reports in first.
    await device.send_message("devices/d1/status", b"online")
    command = await commands.submit(staff, "d1", {"name": "set_interval", "args": {"seconds": 5}})
    event = await device.receive_publish(timeout=5)
    assert event["topic"] == "devices/d1/commands" and event["qos"] == 1
    body = orjson.loads(event["payload"])
    assert body == {"id": str(command.id), "name": "set_interval", "args": {"seconds": 5}}
    await device.send_message(
        "devices/d1/commands/ack",
        orjson.dumps({"id": body["id"], "ok": True, "result": {"seconds": 5}}),
    )

    async with asyncio.timeout(5):
        while True:
            message = await layer.receive(dashboard)
            if any(f["type"] == "command" and f["status"] == "acked" for f in message["events"]):
                break
    stored = await database_sync_to_async(Command.objects.get)(id=command.id)
    assert (stored.status, stored.result) == ("acked", {"seconds": 5})
    get_timers().cancel_all()


async def test_the_first_rejection_of_each_reason_is_logged_then_only_counted(app, layer, caplog):
    caplog.set_level(logging.WARNING, logger="devices.conventions.native")
    comm = MqttCommunicator(app, topic="devices/noisy/telemetry")
    await comm.connect()
    for payload in (b"not json", b"not json either", b"[1]", b"{"):
        await comm.send_message("devices/noisy/telemetry", payload)
    await comm.retire(timeout=5)
    lines = [r.getMessage() for r in caplog.records if "noisy" in r.getMessage()]
    assert len(lines) == 2, lines  # bad_json once, not_object once
    assert "(bad_json)" in lines[0] and "(not_object)" in lines[1]
