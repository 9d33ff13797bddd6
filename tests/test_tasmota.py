"""Tasmota devices in the gateway (devices/conventions/tasmota.py): units through MqttCommunicator,
then the simulator's Tasmota style against a real mosquitto, MqttServer, pipeline, layer and
database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async

from devices.commands import service as commands
from devices.conventions.tasmota import command_payload, parse_state
from devices.models import Command, Device, Reading
from devices.routing import mqtt_routes
from devices.telemetry.pipeline import current_pipeline
from firmware_sim.fleet import Fleet
from gateway.exceptions import Rejected
from gateway.mqtt.routing import TopicRouter
from gateway.mqtt.server import MqttServer
from gateway.mqtt.testing import MqttCommunicator
from tests.support.bridge import running
from tests.support.checks import dashboard_frame, rejected

pytestmark = pytest.mark.django_db(transaction=True)

SENSOR = (
    b'{"Time":"2026-11-27T05:46:00","AM2301":{"Temperature":21.3,"Humidity":48.2,'
    b'"DewPoint":9.9},"BMP280":{"Temperature":21.7,"Pressure":1013.2},'
    b'"PressureUnit":"hPa","TempUnit":"C"}'
)
STATE = (
    b'{"Time":"2026-11-27T05:46:00","Uptime":"0T00:01:00","UptimeSec":60,"SleepMode":"Dynamic",'
    b'"POWER":"ON","Wifi":{"RSSI":70,"Signal":-65,"SSId":"net"}}'
)


# --- pure functions and routes -------------------------------------------------------------


def test_routes_map_tasmota_topics_to_their_own_instance_per_device():
    router = TopicRouter(mqtt_routes)
    assert {"tele/+/SENSOR", "tele/+/STATE", "tele/+/LWT", "stat/+/+"} <= set(router.subscriptions)
    sensor, result = router.resolve("tele/plug-1/SENSOR"), router.resolve("stat/plug-1/RESULT")
    assert sensor.instance_key == result.instance_key == ("tasmota", "plug-1")
    assert result.params["kind"] == "RESULT"
    # The same id on the native convention is another instance (see the module docstring).
    assert router.resolve("devices/plug-1/telemetry").instance_key == ("device", "plug-1")
    assert router.resolve("cmnd/plug-1/Power") is None  # our own commands never come back in
    assert router.resolve("tele/plug-1/INFO1") is None


@pytest.mark.parametrize(
    ("args", "payload"),
    [
        ({}, b""),
        (None, b""),
        ({"value": "ON"}, b"ON"),
        ({"value": True}, b"ON"),
        ({"value": False}, b"OFF"),
        ({"value": 30}, b"30"),
        ({"value": 2.5}, b"2.5"),
        ({"value": None}, b""),
        ({"value": {"a": 1}}, b'{"a":1}'),
        ({"Dimmer": 50, "Fade": 1}, b'{"Dimmer":50,"Fade":1}'),
    ],
)
def test_command_args_to_payload(args, payload):
    assert command_payload(args) == payload


def test_state_power_is_boolean_and_strings_are_ignored():
    metrics = parse_state(STATE, 65536)
    assert metrics == {"UptimeSec": 60.0, "POWER": True, "Wifi.RSSI": 70.0, "Wifi.Signal": -65.0}
    off = parse_state(b'{"POWER1":"off","POWER2":"ON","Heap":25}', 65536)
    assert off == {"POWER1": False, "POWER2": True, "Heap": 25.0}
    with pytest.raises(Rejected) as err:
        parse_state(b'{"Time":"x","POWER":"maybe"}', 65536)
    assert err.value.reason == "no_metrics"


# --- the consumer through MqttCommunicator -------------------------------------------------


@pytest.fixture
async def plug(layer):
    comm = MqttCommunicator(TopicRouter(mqtt_routes), topic="tele/plug-1/SENSOR")
    await comm.connect()
    yield comm
    await comm.retire()


async def test_sensor_state_lwt_and_power_frames(plug, layer, dashboard):
    await plug.send_message("tele/plug-1/LWT", b"Online", qos=1, retain=True)
    online = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert (online["device"], online["online"]) == ("plug-1", True)

    await plug.send_message("tele/plug-1/SENSOR", SENSOR)
    sensor = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert sensor["device"] == "plug-1"
    assert sensor["metrics"] == {
        "AM2301.Temperature": 21.3,
        "AM2301.Humidity": 48.2,
        "AM2301.DewPoint": 9.9,
        "BMP280.Temperature": 21.7,
        "BMP280.Pressure": 1013.2,
    }
    await plug.send_message("tele/plug-1/STATE", STATE)
    state = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert state["metrics"]["POWER"] is True and state["metrics"]["UptimeSec"] == 60.0
    await plug.send_message("stat/plug-1/POWER", b"OFF")
    power = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert power["metrics"] == {"POWER": False}

    await plug.send_message("tele/plug-1/LWT", b"Offline", qos=1, retain=True)
    offline = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert offline["online"] is False

    await current_pipeline().flush()
    stored = await database_sync_to_async(
        lambda: set(Reading.objects.filter(device_id="plug-1").values_list("metric", flat=True))
    )()
    assert {"AM2301.Temperature", "BMP280.Pressure", "POWER", "Wifi.RSSI"} <= stored
    assert not stored & {"Time", "TempUnit", "PressureUnit", "Uptime", "SleepMode"}
    device = await database_sync_to_async(Device.objects.get)(id="plug-1")
    assert (device.transport, device.online) == ("mqtt", False)


async def test_bad_input_is_counted_and_the_next_good_message_arrives(plug, layer, dashboard):
    cases = [
        ("tele/plug-1/SENSOR", b'{"AM2301":{"Temperature":', "bad_json"),
        ("tele/plug-1/SENSOR", b"\xff\xfe garbage", "bad_encoding"),
        ("tele/plug-1/SENSOR", b'{"Time":"2026-11-27T05:46:00","TempUnit":"C"}', "no_metrics"),
        ("tele/plug-1/STATE", b"[1, 2]", "not_object"),
        ("tele/plug-1/LWT", b"Maybe", "bad_status"),
        ("stat/plug-1/RESULT", b"not json at all", "bad_json"),
        ("stat/plug-1/POWER", b"SOMETIMES", "bad_value"),
        ("tele/plug-1/SENSOR", b'{"a":' * 20 + b"1" + b"}" * 20, "too_deep"),
    ]
    for topic, payload, reason in cases:
        before = rejected(reason)
        await plug.send_message(topic, payload)
        await plug.send_message("tele/plug-1/SENSOR", b'{"AM2301":{"Temperature":20.5}}')
        good = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
        assert good["metrics"] == {"AM2301.Temperature": 20.5}, topic
        assert rejected(reason) == before + 1, (topic, payload, reason)
    # Other stat/ topics are Tasmota's own business: neither stored nor counted.
    before = {r: rejected(r) for r in ("bad_topic", "bad_json", "consumer_error")}
    await plug.send_message("stat/plug-1/LOGGING", b"whatever")
    await plug.send_message("stat/plug-1/RESULT", b'{"POWER":"ON"}')  # nothing awaits it
    await plug.send_message("tele/plug-1/SENSOR", b'{"AM2301":{"Temperature":20.6}}')
    await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert {r: rejected(r) for r in before} == before


async def test_a_topic_that_is_no_device_id_is_mapped_not_rejected(layer, dashboard):
    comm = MqttCommunicator(TopicRouter(mqtt_routes), topic="tele/bad.id!/SENSOR")
    await comm.connect()
    before = rejected("bad_device_id")
    await comm.send_message("tele/bad.id!/SENSOR", SENSOR)
    await comm.send_message("tele/bad.id!/LWT", b"Online")
    await comm.send_message("stat/bad.id!/RESULT", b'{"POWER":"ON"}')
    await comm.retire()
    assert rejected("bad_device_id") == before
    assert not await database_sync_to_async(Device.objects.filter(id="bad.id!").exists)()
    device = await database_sync_to_async(Device.objects.get)(name="bad.id!")
    assert device.id.startswith("bad_id-")


async def test_command_published_on_cmnd_and_result_matched_by_name(plug, layer, django_user_model):
    staff = await database_sync_to_async(django_user_model.objects.create_user)(
        "ops", password="pw-ops-12345", is_staff=True
    )
    await database_sync_to_async(Device.objects.create)(id="plug-1")
    await plug.send_message("tele/plug-1/LWT", b"Online")  # commands wait until it is heard
    async with asyncio.timeout(5):
        while "device.plug-1" not in layer.groups:  # noqa: ASYNC110 - joined on mqtt.connect
            await asyncio.sleep(0.01)
    tele = await commands.submit(staff, "plug-1", {"name": "TelePeriod", "args": {"value": 30}})
    power = await commands.submit(staff, "plug-1", {"name": "Power", "args": {"value": True}})
    first, second = await plug.receive_publish(5), await plug.receive_publish(5)
    assert (first["topic"], first["payload"], first["qos"]) == ("cmnd/plug-1/TelePeriod", b"30", 1)
    assert (second["topic"], second["payload"]) == ("cmnd/plug-1/Power", b"ON")
    assert first["retain"] is False
    # Answered out of order: each RESULT finds its command by name.
    await plug.send_message("stat/plug-1/RESULT", b'{"POWER":"ON"}')
    await plug.send_message("stat/plug-1/RESULT", b'{"TelePeriod":30}')
    for command, result in ((power, {"POWER": "ON"}), (tele, {"TelePeriod": 30})):
        async with asyncio.timeout(5):
            while True:
                stored = await database_sync_to_async(Command.objects.get)(id=command.id)
                if stored.status == "acked":
                    break
                await asyncio.sleep(0.02)
        assert stored.result == result


# --- the simulator's Tasmota style against a real broker and the in-process gateway ---------


@contextlib.asynccontextmanager
async def gateway(broker):
    """MqttServer on the devices' routes (as rungateway mounts them) against `broker`."""
    uid = uuid.uuid4().hex[:8]
    server = MqttServer(
        TopicRouter(mqtt_routes),
        url=broker.url,
        client_id=f"gw-{uid}",
        status_topic=f"gateway/{uid}/status",
        backoff_initial=0.05,
        backoff_max=0.5,
        retire_grace=0.5,
    )
    async with running(server):
        yield server


async def finished(command_id: Any, wait: float = 10.0) -> Command:
    """The command once it reached a final status."""
    async with asyncio.timeout(wait):
        while True:
            command = await database_sync_to_async(Command.objects.get)(id=command_id)
            if command.status in ("acked", "failed", "timeout"):
                return command
            await asyncio.sleep(0.05)


async def test_simulated_tasmota_fleet_end_to_end(mosquitto, layer, dashboard, django_user_model):
    async with (
        gateway(mosquitto),
        Fleet(mosquitto.url, devices=2, rate=5, style="tasmota") as fleet,
    ):
        await asyncio.wait_for(fleet.wait_connected(), 10)
        first = fleet.ids[0]
        # Telemetry, flattened, on the dashboard and in the database.
        # Frames of `first` itself: the other device may publish first under load.
        sensor = await dashboard_frame(
            layer,
            dashboard,
            lambda f: (
                f["type"] == "telemetry"
                and f["device"] == first
                and "AM2301.Temperature" in f["metrics"]
            ),
        )
        assert {"AM2301.Humidity", "BMP280.Pressure"} <= set(sensor["metrics"])
        await dashboard_frame(
            layer,
            dashboard,
            lambda f: f["type"] == "telemetry" and f["device"] == first and "POWER" in f["metrics"],
        )
        await current_pipeline().flush()
        stored = await database_sync_to_async(
            lambda: set(Reading.objects.filter(device_id=first).values_list("metric", flat=True))
        )()
        assert {"AM2301.Temperature", "POWER"} <= stored

        # Commands: Power acked with its RESULT, relay really switched; unknown → failed.
        staff = await database_sync_to_async(django_user_model.objects.create_user)(
            "ops", password="pw-ops-12345", is_staff=True
        )
        relay = fleet[first].relay
        want = "OFF" if relay else "ON"
        power = await commands.submit(staff, first, {"name": "Power", "args": {"value": want}})
        done = await finished(power.id)
        assert (done.status, done.result) == ("acked", {"POWER": want})
        assert fleet[first].relay is (want == "ON")
        acked = await dashboard_frame(
            layer,
            dashboard,
            lambda f: (
                f["type"] == "command" and f["id"] == str(power.id) and f["status"] == "acked"
            ),
        )
        assert (acked["device"], acked["result"]) == (first, {"POWER": want})
        # The relay's new state reaches the dashboard (stat/<id>/POWER, then STATE).
        await dashboard_frame(
            layer,
            dashboard,
            lambda f: (
                f["type"] == "telemetry"
                and f["device"] == first
                and f["metrics"].get("POWER") is (want == "ON")
            ),
        )
        query = await commands.submit(staff, first, {"name": "Power", "args": {}})
        done = await finished(query.id)
        assert (done.status, done.result) == ("acked", {"POWER": want})
        unknown = await commands.submit(staff, first, {"name": "Frobnicate", "args": {"value": 1}})
        done = await finished(unknown.id)
        assert done.status == "failed" and "Unknown" in done.error
        bad = await commands.submit(staff, first, {"name": "Power", "args": {"value": "maybe"}})
        done = await finished(bad.id)
        assert done.status == "failed" and "Error" in done.error

        # LWT: a device vanishing → offline (its Last Will), coming back → online.
        fleet[first].drop()
        gone = await dashboard_frame(
            layer, dashboard, lambda f: f["type"] == "status" and f["device"] == first
        )
        assert gone["online"] is False
        fleet[first].restore()
        back = await dashboard_frame(
            layer, dashboard, lambda f: f["type"] == "status" and f["device"] == first
        )
        assert back["online"] is True


async def test_simulated_tasmota_noack_times_out(mosquitto, layer, django_user_model):
    async with (
        gateway(mosquitto),
        Fleet(mosquitto.url, devices=1, rate=2, style="tasmota") as fleet,
    ):
        await asyncio.wait_for(fleet.wait_connected(), 10)
        device_id = fleet.ids[0]
        await database_sync_to_async(Device.objects.get_or_create)(id=device_id)
        staff = await database_sync_to_async(django_user_model.objects.create_user)(
            "ops", password="pw-ops-12345", is_staff=True
        )
        fleet[device_id].set_noack(True)
        data = {"name": "Power", "args": {"value": "TOGGLE"}, "timeout": 0.5}
        silent = await commands.submit(staff, device_id, data)
        done = await finished(silent.id)
        assert done.status == "timeout"
        # The next command's RESULT is not mistaken for the timed-out one's.
        fleet[device_id].set_noack(False)
        query = await commands.submit(staff, device_id, {"name": "TelePeriod", "args": {}})
        done = await finished(query.id)
        assert done.status == "acked" and done.result == {"TelePeriod": 0.5}
        silent = await finished(silent.id)
        assert (silent.status, silent.result) == ("timeout", None)
