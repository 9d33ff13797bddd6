"""SerialDeviceConsumer: SerialCommunicator units, then the real server on ptys, the real
pipeline (test database, in-memory channel layer) and, for mirroring, a real mosquitto."""

from __future__ import annotations

# ruff: noqa: ASYNC109
import asyncio
import time
from typing import Any

import aiomqtt
import orjson
import pytest
from channels.db import database_sync_to_async

from devices.commands import service as commands
from devices.conventions import mirror
from devices.conventions.serial import SerialDeviceConsumer, derive_device_id, device_id_for_scope
from devices.models import Command, Device, Reading
from devices.telemetry.pipeline import get_pipeline
from gateway.mqtt.events import properties_to_dict
from gateway.serial.testing import SerialCommunicator
from tests.support.checks import dashboard_frame, rejected
from tests.support.waiting import eventually
from tests.test_serial_server import Pty, serving

pytestmark = pytest.mark.django_db(transaction=True)
APP = SerialDeviceConsumer.as_asgi()


@pytest.fixture(autouse=True)
def no_mirror():
    """Mirroring is on by default; these tests turn it on only where they test it."""
    saved = dict(mirror._config)
    mirror.configure(enabled=False)
    yield
    mirror._config.update(saved)


def test_device_id_rule():
    assert derive_device_id("/dev/ttyUSB0") == "ttyUSB0"
    by_id = "/dev/serial/by-id/usb-Arduino__www.arduino.cc__0043_7583-if00"
    assert derive_device_id(by_id) == "usb-Arduino__www-arduino-cc__0043_7583-if00"
    assert derive_device_id("socket://10.0.0.5:7000") == "socket-10-0-0-5-7000"
    assert derive_device_id("loop://") == "loop"
    assert len(derive_device_id("/dev/" + "x" * 100)) == 64
    assert derive_device_id("/dev/...") == "serial"
    assert device_id_for_scope({"port": "/dev/ttyACM0", "device": "weather-1"}) == "weather-1"
    with pytest.raises(ValueError, match="device id"):
        device_id_for_scope({"port": "/dev/ttyACM0", "device": "bad id!"})


async def test_json_and_key_value_lines_reach_pipeline_and_dashboard(layer, dashboard):
    comm = SerialCommunicator(APP, "loop://?device=ser-a")
    await comm.connect()
    status = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert status["device"] == "ser-a" and status["online"] is True
    await comm.send_frame(b'{"temperature": 21.5, "env": {"hum": 40}, "ts": 1764214000.5}')
    frame = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert frame == {
        "type": "telemetry",
        "device": "ser-a",
        "ts": 1764214000.5,
        "metrics": {"temperature": 21.5, "env.hum": 40.0},
    }
    await comm.send_frame(b"temp=22.5,hum=41 relay=true\r")
    frame = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert frame["metrics"] == {"temp": 22.5, "hum": 41.0, "relay": True}
    await comm.disconnect()
    status = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert status["online"] is False
    await get_pipeline().flush()
    device = await Device.objects.aget(id="ser-a")
    assert device.transport == "serial" and device.online is False
    assert await Reading.objects.filter(device_id="ser-a").acount() == 5


async def test_bad_lines_are_counted_and_good_ones_still_arrive(layer, dashboard):
    before = {r: rejected(r) for r in ("bad_frame", "bad_encoding", "bad_json", "no_metrics")}
    comm = SerialCommunicator(APP, "loop://?device=ser-b")
    await comm.connect()
    for line in (b"#$%^&*", b"\xff\xfe\xc3(", b'{"temperature": 2', b"fw=v1.2", b"", b"t=1"):
        await comm.send_frame(line)
    frame = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert frame["metrics"] == {"t": 1.0}
    for reason in before:
        assert rejected(reason) - before[reason] == 1, reason
    await comm.disconnect()


async def test_invalid_device_option_rejects_every_line(layer, dashboard):
    before = rejected("bad_device_id")
    comm = SerialCommunicator(APP, "loop://?device=no%20spaces")
    await comm.connect()
    await comm.send_frame(b"t=1")
    await comm.disconnect()
    assert rejected("bad_device_id") - before == 1


async def test_device_command_message_is_written_as_one_json_line(layer):
    comm = SerialCommunicator(APP, "loop://?device=ser-c&delimiter=hex:0d0a")
    await comm.connect()
    await eventually(lambda: layer.groups.get("device.ser-c"), what="device.ser-c joined")
    await layer.group_send(
        "device.ser-c",
        {"type": "device.command", "id": "c1", "name": "set_interval", "args": {"seconds": 5}},
    )
    line = await comm.receive_write(timeout=5)  # the first output: no held command before it
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == {"id": "c1", "name": "set_interval", "args": {"seconds": 5}}
    await comm.disconnect()


async def test_an_mqtt_instance_of_the_same_id_sharing_its_state_is_ignored(layer):
    """`device.state` from an MQTT instance of the same id neither crashes nor changes the port."""
    comm = SerialCommunicator(APP, "loop://?device=ser-s")
    await comm.connect()
    await eventually(lambda: layer.groups.get("device.ser-s"), what="device.ser-s joined")
    await layer.group_send("device.ser-s", {"type": "device.state", "online": False, "at": 1.0})
    await layer.group_send(
        "device.ser-s", {"type": "device.command", "id": "c2", "name": "ping", "args": {}}
    )
    assert orjson.loads(await comm.receive_write(timeout=5))["id"] == "c2", "still serving"
    await comm.disconnect()


async def test_command_service_delivery_and_ack(layer, dashboard, django_user_model):
    await Device.objects.acreate(id="ser-d", transport="serial")
    admin = await database_sync_to_async(django_user_model.objects.create_superuser)(
        "root", password="x"
    )
    comm = SerialCommunicator(APP, "loop://?device=ser-d")
    await comm.connect()
    await eventually(lambda: layer.groups.get("device.ser-d"), what="device.ser-d joined")
    command = await commands.submit(admin, "ser-d", {"name": "ping", "args": {}})
    line = orjson.loads(await comm.receive_write(timeout=5))
    assert line == {"id": str(command.id), "name": "ping", "args": {}}
    before = rejected("unknown_command")
    await comm.send_frame(orjson.dumps({"id": str(command.id), "ok": True, "result": {"p": 1}}))
    acked = await dashboard_frame(
        layer, dashboard, lambda f: f["type"] == "command" and f["status"] == "acked"
    )
    assert acked["id"] == str(command.id)
    assert (await Command.objects.aget(id=command.id)).status == "acked"
    await comm.send_frame(b'{"id": "nope", "ok": true}')  # unknown ack
    await comm.disconnect()
    assert rejected("unknown_command") - before == 1


async def test_server_pty_unplug_replug_end_to_end(layer, dashboard, tmp_path):
    link = str(tmp_path / "usb-weather")
    device = Pty(link)
    async with serving(APP, f"{link}?device=weather-1") as server:
        await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status" and f["online"])
        await device.write(b'{"temperature": 20.5}\ntemperature=20.7,humidity=40\n')
        seen = []
        while len(seen) < 2:
            f = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
            seen.append(f["metrics"])  # may be coalesced into one frame
            if f["metrics"].get("humidity") == 40.0:
                break
        assert seen[-1]["temperature"] == 20.7
        device.close()
        offline = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
        assert offline == {**offline, "device": "weather-1", "online": False}
        assert len(server.ports) == 1 and not server.connected
        await asyncio.sleep(0.3)
        device = Pty(link)
        replugged = time.monotonic()
        await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status" and f["online"])
        await device.write(b"temperature=21\n")
        f = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
        assert f["metrics"] == {"temperature": 21.0}
        print(
            f"\nserial device replug → telemetry on dashboard: {time.monotonic() - replugged:.3f} s"
        )
    device.close()


async def test_mirroring_visible_to_a_plain_mqtt_subscriber(mosquitto, layer, dashboard):
    mirror.configure(enabled=True, url=mosquitto.url)
    async with aiomqtt.Client(
        "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as sub:
        await sub.subscribe("devices/ser-m/#")
        comm = SerialCommunicator(APP, "loop://?device=ser-m")
        await comm.connect()
        await comm.send_frame(b"temp=21.5,ts=1764214000")
        got: dict[str, Any] = {}
        async with asyncio.timeout(10):
            async for message in sub.messages:
                got[str(message.topic)] = message
                if len(got) == 2:
                    break
        await comm.disconnect()
        assert got["devices/ser-m/status"].payload == b"online"
        telemetry = got["devices/ser-m/telemetry"]
        assert orjson.loads(telemetry.payload) == {"temp": 21.5, "ts": 1764214000.0}
        # The gateway's own MQTT bridge recognises (and skips) its mirror's publishes.
        topic, payload = "devices/ser-m/telemetry", telemetry.payload
        assert mirror.is_mirror_echo(topic, payload, properties_to_dict(telemetry.properties))
        # Copying the property onto another payload (or topic) does not make it an echo.
        copied = properties_to_dict(telemetry.properties)
        assert not mirror.is_mirror_echo(topic, b'{"temp": 99}', copied)
        assert not mirror.is_mirror_echo("devices/other/telemetry", payload, copied)
        assert not mirror.is_mirror_echo(
            topic, payload, {"user_properties": [("gateway-mirror", "x")]}
        )
        await mirror.close_mirror()
    # The last status is retained: a late subscriber sees the device offline.
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as late:
        await late.subscribe("devices/ser-m/status")
        async with asyncio.timeout(5):
            async for message in late.messages:
                assert message.payload == b"offline" and message.retain
                break


async def test_mirrored_device_commands_go_to_the_port_not_the_broker(
    mosquitto, layer, dashboard, tmp_path, django_user_model
):
    """With mirroring on, the gateway's own MQTT bridge sees the serial device's echoes; its
    MQTT instance for that id must not take the device's commands (group `device.<id>`)."""
    from gateway.asgi import application
    from gateway.runner import mqtt_bridge

    mirror.configure(enabled=True, url=mosquitto.url)
    admin = await database_sync_to_async(django_user_model.objects.create_superuser)(
        "root", password="x"
    )
    link = str(tmp_path / "usb-mirrored")
    port = Pty(link)
    bridge = mqtt_bridge(application, mosquitto.url)
    bridge_task = asyncio.create_task(bridge.serve())
    try:
        async with (
            serving(application, f"{link}?device=ser-x"),
            aiomqtt.Client("127.0.0.1", mosquitto.port) as sub,
        ):
            await sub.subscribe("devices/ser-x/commands", qos=1)
            await eventually(lambda: bridge.connected)
            await port.write(b"temp=1\n")
            # The echo reached the bridge once its device instance joined `device.ser-x`.
            deadline = time.monotonic() + 10
            while len(layer.groups.get("device.ser-x", {})) < 2:
                assert time.monotonic() < deadline, "the mirror echo never reached the bridge"
                await port.write(b"temp=1\n")
                await asyncio.sleep(0.1)
            await get_pipeline().flush()  # the device is registered
            for n in range(5):
                command = await commands.submit(admin, "ser-x", {"name": "ping", "args": {}})
                line = (await port.read_until(b"}\n")).splitlines()[-1]
                assert orjson.loads(line)["id"] == str(command.id), n
                await port.write(orjson.dumps({"id": str(command.id), "ok": True}) + b"\n")
                await dashboard_frame(
                    layer,
                    dashboard,
                    lambda f, cid=str(command.id): (
                        f["type"] == "command" and f["id"] == cid and f["status"] == "acked"
                    ),
                )
            # Sentinel: published here after the last ack, it is the first message on the
            # commands topic; the mirror republished none of the five before it.
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as probe:
                await probe.publish("devices/ser-x/commands", b"sentinel", qos=1)
            async with asyncio.timeout(10):
                first = await anext(aiter(sub.messages))
            assert first.payload == b"sentinel", first.payload
    finally:
        await mirror.close_mirror()
        await bridge.shutdown()
        bridge_task.cancel()
        port.close()


async def test_mirror_republishes_statuses_after_a_broker_restart(mosquitto, layer, dashboard):
    """A broker without persistence forgets retained messages; the mirror publishes each
    device's last status again when it reconnects."""
    mirror.configure(enabled=True, url=mosquitto.url)
    comm = SerialCommunicator(APP, "loop://?device=ser-r")
    await comm.connect()
    await comm.send_frame(b"temp=1")
    try:
        assert await mirror.get_mirror().flush(10)
        # Forget the retained status whatever the broker keeps across a restart.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as other:
            await other.publish("devices/ser-r/status", b"", qos=1, retain=True)
        mosquitto.stop()
        mosquitto.start()
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as sub:
            await sub.subscribe("devices/ser-r/status", qos=1)
            async with asyncio.timeout(15):
                message = await anext(aiter(sub.messages))
        assert message.payload == b"online"
    finally:
        await comm.disconnect()
        await mirror.close_mirror()
