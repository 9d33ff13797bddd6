"""`ModbusServer` on a real pty with simulated units: one instance per online period, merged
requests, faults counted per unit, writes answered, and a dead unit that leaves the others
their schedule. The application is a plain ASGI callable that records what it is told.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.modbus import SimBus, SimUnit, read_profile
from firmware_sim.serial_device import open_pty
from gateway.metrics import MODBUS_REQUESTS
from gateway.modbus.config import parse_config
from gateway.modbus.server import ModbusServer
from tests.support.waiting import until

DIRS = [Path(__file__).resolve().parent.parent / "devices" / "conventions" / "modbus_profiles"]


class Recorder:
    """An ASGI application: per unit, every event in order; writes on request."""

    def __init__(self) -> None:
        self.events: dict[int, list[dict[str, Any]]] = {}
        self.instances: dict[int, int] = {}
        self.senders: dict[int, Any] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        unit = scope["unit"]
        self.instances[unit] = self.instances.get(unit, 0) + 1
        self.senders[unit] = send
        while True:
            event = await receive()
            self.events.setdefault(unit, []).append(event)
            if event["type"] == "modbus.disconnect":
                return

    def of(self, unit: int, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events.get(unit, []) if e["type"] == kind]


def counted(port: str, unit: int, result: str) -> float:
    return MODBUS_REQUESTS.labels(bus=port, unit=str(unit), result=result)._value.get()


@pytest.fixture
async def bus_of():
    """Serve simulated units on a fresh pty; yields a factory (units) → (path, SimBus)."""
    opened: list[tuple[int, int, SimBus]] = []

    def make(units: dict[int, SimUnit]) -> tuple[str, SimBus]:
        master, slave, path = open_pty()
        bus = SimBus(master, units)
        bus.start()
        opened.append((master, slave, bus))
        return path, bus

    yield make
    for master, slave, bus in opened:
        bus.stop()
        os.close(master)
        os.close(slave)


def config(path: str, units: list[dict], timeout: float = 0.2) -> Any:
    (bus,) = parse_config(
        {"buses": [{"port": path, "timeout": timeout, "units": units}]}, "t", DIRS
    )
    return bus


async def running(server: ModbusServer) -> asyncio.Task[None]:
    return asyncio.create_task(server.serve())


async def test_contiguous_points_are_read_in_one_request_per_block(bus_of):
    meter = SimUnit(read_profile("eastron-sdm120"), 1)
    path, sim = bus_of({1: meter})
    bus = config(path, [{"unit": 1, "device": "m", "profile": "eastron-sdm120", "interval": 0.1}])
    app = Recorder()
    server = ModbusServer(app, [bus])
    task = await running(server)
    try:
        await until(lambda: len(app.of(1, "modbus.read")) >= 3, what="three polls")
        polls = len(app.of(1, "modbus.read"))
        # frequency, import and export energy (70-75) are one request: 8 per poll, not 10.
        assert len(bus.units[0].profile.blocks) == 8
        assert sim.requests in range(8 * polls, 8 * (polls + 1) + 1)
        read = app.of(1, "modbus.read")[-1]
        block = next(b for b in read["blocks"] if b["address"] == 70)
        assert len(block["registers"]) == 6
        assert app.events[1][0] == {"type": "modbus.connect"}
    finally:
        await server.shutdown()
        await task
    assert app.events[1][-1]["type"] == "modbus.disconnect"
    assert app.events[1][-1]["reason"] == "shutdown"


async def test_faults_are_counted_and_a_silent_unit_does_not_starve_the_other(bus_of):
    fast, dead = SimUnit(read_profile("xy-md02"), 1), SimUnit(read_profile("xy-md02"), 2)
    path, _ = bus_of({1: fast, 2: dead})
    units = [
        {"unit": 1, "device": "a", "profile": "xy-md02", "interval": 0.2},
        {"unit": 2, "device": "b", "profile": "xy-md02", "interval": 0.2, "offline_after": 2},
    ]
    app = Recorder()
    server = ModbusServer(app, [config(path, units)])
    task = await running(server)
    try:
        await until(lambda: app.of(2, "modbus.read"), what="unit 2 online")
        dead.fault = "exception=4"
        await until(lambda: app.of(2, "modbus.disconnect"), what="unit 2 offline")
        assert app.of(2, "modbus.disconnect")[0]["reason"] == "offline"
        assert "code 4" in app.of(2, "modbus.disconnect")[0]["error"]
        assert counted(path, 2, "exception") >= 2

        dead.fault = "slow=0.5"  # later than the 0.2 s timeout: a timeout, then silence
        before = len(app.of(1, "modbus.read"))
        timeouts = counted(path, 2, "timeout")
        await until(lambda: counted(path, 2, "timeout") >= timeouts + 2, what="timeouts")
        # Unit 1 kept polling meanwhile and never saw an error.
        assert len(app.of(1, "modbus.read")) > before
        assert not app.of(1, "modbus.disconnect")

        dead.fault = None
        await until(lambda: app.instances.get(2) == 2, what="unit 2 back with a new instance")
        assert app.events[2][app.events[2].index(app.of(2, "modbus.disconnect")[0]) + 1] == {
            "type": "modbus.connect"
        }
    finally:
        await server.shutdown()
        await task


async def test_writes_are_answered_and_bad_ones_refused(bus_of):
    relay = SimUnit(read_profile("waveshare-relay-8ch"), 5)
    path, _ = bus_of({5: relay})
    units = [{"unit": 5, "device": "r", "profile": "waveshare-relay-8ch", "interval": 0.2}]
    app = Recorder()
    server = ModbusServer(app, [config(path, units)])
    task = await running(server)
    try:
        await until(lambda: app.of(5, "modbus.read"), what="unit 5 online")
        send = app.senders[5]
        await send(
            {"type": "modbus.write", "table": "coil", "address": 2, "values": [True], "ref": "a"}
        )
        await until(lambda: app.of(5, "modbus.written"), what="an answer")
        assert app.of(5, "modbus.written")[0] == {
            "type": "modbus.written",
            "ref": "a",
            "ok": True,
            "error": None,
        }
        assert relay.tables["coil"][2] == 1
        # Coil 9 does not exist on an 8-channel board: the unit answers "illegal address".
        await send(
            {"type": "modbus.write", "table": "coil", "address": 9, "values": [True], "ref": "b"}
        )
        await until(lambda: len(app.of(5, "modbus.written")) == 2, what="a second answer")
        answer = app.of(5, "modbus.written")[1]
        assert answer["ok"] is False and "code 2" in answer["error"]
        with pytest.raises(ValueError):
            await send({"type": "modbus.write", "table": "input", "address": 0, "values": [1]})
        with pytest.raises(ValueError):
            await send(
                {"type": "modbus.write", "table": "holding", "address": 0, "values": [70000]}
            )
    finally:
        await server.shutdown()
        await task


async def test_modbus_tcp_bus(bus_of):
    """A `tcp://host:port` bus: the same units behind a Modbus TCP server."""
    from firmware_sim.modbus import serve_tcp

    meter = SimUnit(read_profile("eastron-sdm120"), 9)
    tcp = await serve_tcp({9: meter})
    host, port = tcp.sockets[0].getsockname()[:2]
    units = [{"unit": 9, "device": "meter-9", "profile": "eastron-sdm120", "interval": 0.2}]
    app = Recorder()
    server = ModbusServer(app, [config(f"tcp://{host}:{port}", units)])
    task = await running(server)
    try:
        await until(lambda: app.of(9, "modbus.read"), what="a poll over TCP")
        blocks = app.of(9, "modbus.read")[0]["blocks"]
        assert {b["address"] for b in blocks} == {0, 6, 12, 18, 24, 30, 70, 342}
        meter.fault = "silent"
        await until(lambda: app.of(9, "modbus.disconnect"), what="offline")
        assert app.of(9, "modbus.disconnect")[0]["reason"] == "offline"  # the socket stays up
        meter.fault = None
        await until(lambda: app.instances.get(9) == 2, what="back online")
    finally:
        await server.shutdown()
        await task
        tcp.close()
