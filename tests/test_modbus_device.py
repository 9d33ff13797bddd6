"""ModbusDeviceConsumer with `ModbusCommunicator`: a unit's polls become readings of its profile's
points; a command on a writable point becomes one `modbus.write` whose answer ends it. Real
pipeline (test database, in-memory channel layer). Raw words are the devices' own encodings
(register maps cited in devices/conventions/modbus_profiles/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from channels.db import database_sync_to_async

from devices.commands import service as commands
from devices.conventions.modbus import ModbusDeviceConsumer
from devices.models import Command, Device
from devices.telemetry.pipeline import get_pipeline
from gateway.modbus.profile import load_profile
from gateway.modbus.testing import ModbusCommunicator
from tests.support.checks import dashboard_frame
from tests.support.waiting import eventually
from tests.test_serial_device import no_mirror  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)

APP = ModbusDeviceConsumer.as_asgi()
DIRS = [Path(__file__).resolve().parent.parent / "devices" / "conventions" / "modbus_profiles"]


async def test_polls_become_readings_and_presence(layer, dashboard):
    comm = ModbusCommunicator(APP, load_profile("eastron-sdm120", DIRS), device="meter-1")
    await comm.connect()
    status = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert status["device"] == "meter-1" and status["online"] is True
    await comm.send_read(
        [
            {"table": "input", "address": 0, "registers": [0x4366, 0x8000]},  # 230.5 V
            {"table": "input", "address": 6, "registers": [0x3FC0, 0x0000]},  # 1.5 A
        ],
        ts=1764214000.0,
    )
    frame = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert frame == {
        "type": "telemetry",
        "device": "meter-1",
        "ts": 1764214000.0,
        "metrics": {"voltage": 230.5, "current": 1.5},
    }
    await comm.disconnect()
    status = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert status["online"] is False
    await get_pipeline().flush()
    device = await Device.objects.aget(id="meter-1")
    assert device.transport == "modbus" and device.online is False


async def test_commands_write_points_and_end_by_the_answer(layer, dashboard, django_user_model):
    await Device.objects.acreate(id="relays", transport="modbus")
    admin = await database_sync_to_async(django_user_model.objects.create_superuser)(
        "root", password="x"
    )
    comm = ModbusCommunicator(
        APP, load_profile("waveshare-relay-8ch", DIRS), device="relays", unit=3
    )
    await comm.connect()
    await eventually(lambda: layer.groups.get("device.relays"), what="device.relays joined")

    command = await commands.submit(admin, "relays", {"name": "relay4", "args": {"value": True}})
    write = await comm.receive_write(timeout=5)
    assert write == {
        "type": "modbus.write",
        "table": "coil",
        "address": 3,
        "values": [True],
        "ref": str(command.id),
    }
    await comm.send_written(str(command.id), True)
    await dashboard_frame(layer, dashboard, lambda f: f.get("status") == "acked")
    stored = await Command.objects.aget(id=command.id)
    assert stored.status == "acked" and stored.result == {"value": True}

    command = await commands.submit(admin, "relays", {"name": "relay5", "args": {"value": False}})
    write = await comm.receive_write(timeout=5)
    await comm.send_written(write["ref"], False, "exception response, code 4")
    await dashboard_frame(layer, dashboard, lambda f: f.get("status") == "failed")
    assert "code 4" in (await Command.objects.aget(id=command.id)).error

    # Nothing goes on the bus for a point the unit does not have, or for bad args.
    for name, args in (("relay9", {"value": True}), ("relay1", {"on": True})):
        command = await commands.submit(admin, "relays", {"name": name, "args": args})
        failed = await dashboard_frame(
            layer,
            dashboard,
            lambda f, i=str(command.id): f.get("id") == i and f.get("status") == "failed",
        )
        assert failed["id"] == str(command.id)
    # Sentinel: a good command after them is the next thing on the bus.
    command = await commands.submit(admin, "relays", {"name": "relay2", "args": {"value": True}})
    assert (await comm.receive_write(timeout=5))["ref"] == str(command.id)
    await comm.disconnect()
