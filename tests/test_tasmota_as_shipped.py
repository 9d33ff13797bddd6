"""Tasmota as it ships: multi-channel energy, switches, timestamps, SetOption4, dotted topics.

Payloads are Tasmota's own: Tasmota docs "Power Monitoring" (a Shelly 2.5's two channels as
arrays, written by tasmota/tasmota_xdrv_driver/xdrv_03_energy.ino), "Buttons and Switches"
(``"Switch1":"ON"`` in SENSOR), "Commands" (``Time 2/3/4``: ``Epoch``, epoch seconds and
milliseconds in ``Time``; ``SetOption4 1``: answers on ``stat/<topic>/<COMMAND>``) and "MQTT"
(the Topic, ``cmnd/<topic>/<Command>``), and tasmota/tasmota_support/support_tasmota.ino
(``stat/<topic>/POWER`` ``ON`` after the JSON answer).
"""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest
from channels.db import database_sync_to_async

from devices.commands import service as commands
from devices.conventions.tasmota_payloads import device_id_for, parse_tasmota
from devices.models import Command, Device, Reading
from devices.routing import mqtt_routes
from devices.telemetry.pipeline import current_pipeline
from gateway.mqtt.routing import TopicRouter
from gateway.mqtt.testing import MqttCommunicator
from tests.support.checks import dashboard_frame, rejected
from tests.test_tasmota import finished, gateway

pytestmark = pytest.mark.django_db(transaction=True)

# Tasmota docs "Power Monitoring": a two-channel device (Shelly 2.5), one array item per channel.
SHELLY25 = (
    b'{"Time":"2021-02-06T14:18:58","ENERGY":{"TotalStartTime":"2021-01-23T14:26:08",'
    b'"Total":[2.813,0.254],"Yesterday":[0.000,0.000],"Today":[0.021,0.002],"Period":[0,0],'
    b'"Power":[52,5],"ApparentPower":[54,12],"ReactivePower":[13,11],"Factor":[0.97,0.42],'
    b'"Voltage":235,"Current":[0.232,0.052]},"TempUnit":"C"}'
)


def test_energy_channels_switches_and_timestamps_are_readings():
    t = parse_tasmota(SHELLY25, 1_764_214_000.0, 65536, "SENSOR")
    assert t.metrics["ENERGY.Power.1"] == 52.0 and t.metrics["ENERGY.Power.2"] == 5.0
    assert t.metrics["ENERGY.Total.1"] == 2.813 and t.metrics["ENERGY.Total.2"] == 0.254
    assert t.metrics["ENERGY.Voltage"] == 235.0
    assert not any(name.startswith(("Time", "ENERGY.TotalStartTime")) for name in t.metrics)
    assert (t.ts, t.stamped) == (1_764_214_000.0, False)  # local time, no zone: receive time

    # Buttons and Switches: a switch's state is a boolean reading.
    switches = parse_tasmota(
        b'{"Time":"2026-11-27T05:46:00","Switch1":"ON","Switch2":"OFF"}', 1e9 * 1.8, 65536, "x"
    )
    assert switches.metrics == {"Switch1": True, "Switch2": False}

    # Time 2 / Time 3 / Time 4 (Tasmota docs "Commands"): the reading's own time.
    now = 1_764_222_500.0
    for payload in (
        b'{"Time":"2026-11-27T06:46:40","Epoch":1764222400,"DS18B20":{"Temperature":20.1}}',
        b'{"Time":1764222400,"DS18B20":{"Temperature":20.1}}',
        b'{"Time":1764222400000,"DS18B20":{"Temperature":20.1}}',
    ):
        t = parse_tasmota(payload, now, 65536, "SENSOR")
        assert (t.ts, t.stamped, t.metrics) == (
            1_764_222_400.0,
            True,
            {"DS18B20.Temperature": 20.1},
        )


@pytest.fixture
async def shelly(layer):
    comm = MqttCommunicator(TopicRouter(mqtt_routes), topic="tele/shelly-1/SENSOR")
    await comm.connect()
    yield comm
    await comm.retire()


async def test_multi_channel_energy_and_switches_are_stored(shelly, layer, dashboard):
    before = rejected("no_metrics")
    await shelly.send_message("tele/shelly-1/SENSOR", SHELLY25)
    await shelly.send_message(
        "tele/shelly-1/SENSOR", b'{"Time":"2026-11-27T05:46:00","Switch1":"ON"}'
    )
    await dashboard_frame(
        layer, dashboard, lambda f: f["type"] == "telemetry" and "Switch1" in f["metrics"]
    )
    await current_pipeline().flush()
    stored = await database_sync_to_async(
        lambda: dict(Reading.objects.filter(device_id="shelly-1").values_list("metric", "value"))
    )()
    assert stored["ENERGY.Power.1"] == 52.0 and stored["ENERGY.Power.2"] == 5.0
    assert stored["ENERGY.Factor.2"] == 0.42 and stored["Switch1"] == 1.0
    assert "Time" not in stored
    assert rejected("no_metrics") == before


async def test_setoption4_answers_ack_the_command_they_answer(shelly, layer, django_user_model):
    staff = await database_sync_to_async(django_user_model.objects.create_user)(
        "ops", password="pw-ops-12345", is_staff=True
    )
    await database_sync_to_async(Device.objects.create)(id="shelly-1")
    await shelly.send_message("tele/shelly-1/LWT", b"Online")
    async with asyncio.timeout(5):
        while "device.shelly-1" not in layer.groups:  # noqa: ASYNC110 - joined on mqtt.connect
            await asyncio.sleep(0.01)
    state = await commands.submit(staff, "shelly-1", {"name": "PowerOnState", "args": {"value": 3}})
    power = await commands.submit(staff, "shelly-1", {"name": "Power1", "args": {"value": True}})
    sent = [await shelly.receive_publish(5), await shelly.receive_publish(5)]
    assert [p["topic"] for p in sent] == ["cmnd/shelly-1/PowerOnState", "cmnd/shelly-1/Power1"]
    bad_value = rejected("bad_value")
    # SetOption4 1: each answer on stat/<topic>/<COMMAND>, the relay's answer then its state.
    await shelly.send_message("stat/shelly-1/POWER1", b'{"POWER1":"ON"}')
    await shelly.send_message("stat/shelly-1/POWER1", b"ON")
    await shelly.send_message("stat/shelly-1/POWERONSTATE", b'{"PowerOnState":3}')
    assert (await finished(power.id)).result == {"POWER1": "ON"}
    assert (await finished(state.id)).result == {"PowerOnState": 3}
    assert rejected("bad_value") == bad_value
    await current_pipeline().flush()
    relay = await database_sync_to_async(
        lambda: list(
            Reading.objects.filter(device_id="shelly-1", metric="POWER1").values_list(
                "value", flat=True
            )
        )
    )()
    assert relay == [1.0, 1.0]
    statuses = await database_sync_to_async(
        lambda: set(Command.objects.values_list("status", flat=True))
    )()
    assert statuses == {"acked"}


def test_topics_that_are_not_device_ids_map_to_stable_distinct_ones():
    assert device_id_for("plug-1") == "plug-1"
    mapped = {t: device_id_for(t) for t in ("living.room", "living_room", "living room", "bad.id!")}
    assert mapped["living_room"] == "living_room"  # valid: itself
    others = [mapped["living.room"], mapped["living room"], mapped["bad.id!"]]
    assert len(set(others) | {"living_room"}) == 4
    assert all(Device._meta.get_field("id").max_length >= len(m) for m in others)
    assert device_id_for("living.room") == mapped["living.room"]  # every bridge, every restart
    assert mapped["living.room"].startswith("living_room-")


async def test_a_dotted_topic_is_a_device_named_by_it(mosquitto, layer, django_user_model):
    device_id = device_id_for("living.room")
    staff = await database_sync_to_async(django_user_model.objects.create_user)(
        "ops", password="pw-ops-12345", is_staff=True
    )
    async with (
        gateway(mosquitto),
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="living.room") as tasmota,
    ):
        await tasmota.subscribe("cmnd/living.room/#", qos=1)
        await tasmota.publish("tele/living.room/LWT", b"Online", qos=1, retain=True)
        sensor = b'{"Time":"2026-11-27T05:46:00","AM2301":{"Temperature":21.3,"Humidity":48.2}}'
        await tasmota.publish("tele/living.room/SENSOR", sensor, qos=1)

        async def stored() -> Device | None:
            await current_pipeline().flush()
            return await database_sync_to_async(Device.objects.filter(id=device_id).first)()

        async with asyncio.timeout(10):
            while (device := await stored()) is None or not device.metrics:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert device.name == "living.room" and device.online is True
        assert device.metrics["AM2301.Temperature"] == 21.3

        power = await commands.submit(staff, device_id, {"name": "Power", "args": {"value": True}})
        async with asyncio.timeout(10):
            message = await anext(tasmota.messages)
        assert (message.topic.value, message.payload) == ("cmnd/living.room/Power", b"ON")
        await tasmota.publish("stat/living.room/RESULT", b'{"POWER":"ON"}', qos=1)
        assert (await finished(power.id)).status == "acked"
        await tasmota.publish("tele/living.room/LWT", b"", qos=1, retain=True)
