"""End to end: Modbus RTU units on a real pseudo-terminal through the real gateway process.

The bus is one pty; its device end is `firmware_sim.modbus.SimBus` (the firmware `python -m
firmware_sim modbus --pty` runs) in the test's loop, serving an XY-MD02 temperature/humidity
probe (unit 1) and a Waveshare 8-channel relay board (unit 2), so the test can switch faults on
and off. The gateway is `manage.py rungateway --modbus cfg.json`; the dashboard is a logged-in
`websockets` client. Register maps: devices/conventions/modbus_profiles/*.json (sources cited
there).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from firmware_sim.modbus import SimBus, SimUnit, read_profile
from firmware_sim.serial_device import open_pty
from tests.support.timing import allowance
from tests.support.waiting import until
from tests.test_e2e import logged_in_gateway, next_frame, status_of, telemetry_of
from tests.test_serial_e2e import submit_command

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

POLL = 0.5
OFFLINE_AFTER = 3


def tenths(value: float) -> bool:
    """True when a value is a whole number of tenths (an int16 × 0.1 register)."""
    return abs(value * 10 - round(value * 10)) < 1e-6


def requests_counted(gw, unit: int, result: str) -> float:
    """`gateway_modbus_requests_total` of one unit and result, from /metrics."""
    status, text = gw.http_get("/metrics")
    assert status == 200
    total = 0.0
    for line in str(text).splitlines():
        if line.startswith("gateway_modbus_requests_total{") and (
            f'unit="{unit}"' in line and f'result="{result}"' in line
        ):
            total += float(line.split()[-1])
    return total


def command_end(command_id: str):
    return lambda f: (
        f.get("type") == "command"
        and f.get("id") == command_id
        and f.get("status") in ("acked", "failed", "timeout")
    )


async def test_two_units_on_one_pty_readings_commands_faults(mosquitto, tmp_path: Path):
    master, slave, path = open_pty()
    probe = SimUnit(read_profile("xy-md02"), 1)
    relay = SimUnit(read_profile("waveshare-relay-8ch"), 2)
    bus = SimBus(master, {1: probe, 2: relay})
    bus.start()
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "buses": [
                    {
                        "port": path,
                        "baudrate": 9600,
                        "parity": "N",
                        "stopbits": 1,
                        "timeout": 0.3,
                        "units": [
                            {
                                "unit": 1,
                                "device": "probe-1",
                                "profile": "xy-md02",
                                "interval": POLL,
                            },
                            {
                                "unit": 2,
                                "device": "relay-1",
                                "profile": "waveshare-relay-8ch",
                                "interval": POLL,
                            },
                        ],
                    }
                ]
            }
        )
    )
    try:
        with logged_in_gateway(mosquitto.url, args=["--modbus", str(config)]) as (gw, cookie):
            async with gw.ws_connect(cookie) as ws:
                # Readings carry the profile's names and scaling: int16 × 0.1 °C, uint16 × 0.1 %.
                frame = await next_frame(ws, telemetry_of("probe-1"))
                temperature = frame["metrics"]["temperature"]
                humidity = frame["metrics"]["humidity"]
                assert 15 < temperature < 30 and tenths(temperature), frame
                assert 35 < humidity < 55 and tenths(humidity), frame
                frame = await next_frame(ws, telemetry_of("relay-1"))
                assert frame["metrics"]["relay1"] is False, frame

                # ... and are stored: the history API has them.
                points = await until(
                    lambda: gw.history(cookie, "probe-1", "temperature"), what="stored readings"
                )
                assert all(15 < v < 30 and tenths(v) for _, v in points), points

                # A writable coil is a command, acked by the unit's answer to the write.
                command_id = submit_command(gw, cookie, "relay-1", "relay1", {"value": True})
                done = await next_frame(ws, command_end(command_id))
                assert done["status"] == "acked", done
                frame = await next_frame(
                    ws, lambda f: telemetry_of("relay-1")(f) and f["metrics"]["relay1"] is True
                )
                assert relay.tables["coil"][0] == 1

                # A holding register with scaling: 1.5 °C → 15 in register 0x0103.
                command_id = submit_command(
                    gw, cookie, "probe-1", "temperature_correction", {"value": 1.5}
                )
                done = await next_frame(ws, command_end(command_id))
                assert done["status"] == "acked", done
                assert probe.tables["holding"][0x103] == 15

                # An exception response fails the write; an unknown point fails at once.
                relay.fault = "exception=2"
                command_id = submit_command(gw, cookie, "relay-1", "relay2", {"value": True})
                done = await next_frame(ws, command_end(command_id))
                assert done["status"] == "failed" and "exception" in done.get("error", ""), done
                relay.fault = None
                command_id = submit_command(gw, cookie, "relay-1", "relay9", {"value": True})
                done = await next_frame(ws, command_end(command_id))
                assert done["status"] == "failed" and "relay9" in done.get("error", ""), done

                # CRC garbage: counted, never stored; the unit goes offline after 3 bad polls.
                stored = len(gw.history(cookie, "probe-1", "temperature"))
                probe.fault = "crc"
                await next_frame(ws, status_of("probe-1", False), wait=10)
                offline_at = time.time()
                crc = requests_counted(gw, 1, "crc_error")
                assert crc >= OFFLINE_AFTER, crc
                await until(
                    lambda: requests_counted(gw, 1, "crc_error") >= crc + 2,
                    what="more garbled polls while offline",
                )
                garbled_until = time.time()
                probe.fault = None
                # Sentinel: the next good answer is stored and brings it online; nothing of
                # the garbled polls before it was stored.
                await next_frame(ws, status_of("probe-1", True), wait=10)
                after = gw.history(cookie, "probe-1", "temperature")
                during = [t for t, _ in after if offline_at <= t <= garbled_until]
                assert during == [], "readings stored while every answer was garbled"
                assert len(after) >= stored + 1, "the good answer after them is stored"
                assert all(15 < v < 30 and tenths(v) for _, v in after)

                # A unit that stops answering goes offline within N polls; the other keeps its
                # schedule meanwhile.
                relay.fault = "silent"
                started = time.monotonic()
                probe_frames: list[float] = []

                def watch(f: dict) -> bool:
                    if telemetry_of("probe-1")(f):
                        probe_frames.append(time.monotonic())
                    return status_of("relay-1", False)(f)

                await next_frame(ws, watch, wait=10)
                took = time.monotonic() - started
                # The documented N polls (plus the timeouts), stretched while the machine is
                # busier than its cores (tests/support/timing.py).
                assert took < allowance((OFFLINE_AFTER + 2) * POLL + OFFLINE_AFTER * 0.3), took
                timeouts = requests_counted(gw, 2, "timeout")
                assert timeouts >= OFFLINE_AFTER, timeouts
                assert len(probe_frames) >= int(took / POLL) - 1, (took, probe_frames)
                # Still polled on time afterwards: ~2 readings per second.
                window = time.monotonic()
                count = 0
                while time.monotonic() - window < 2.0:
                    with_time = await next_frame(ws, telemetry_of("probe-1"), wait=3)
                    count += bool(with_time)
                assert count >= 3, count

                # It answers again: online again.
                relay.fault = None
                await next_frame(ws, status_of("relay-1", True), wait=10)
    finally:
        bus.stop()
        os.close(master)
        os.close(slave)


async def test_adapter_unplugged_and_replugged_resumes_polling(mosquitto, tmp_path: Path):
    """A USB RS-485 adapter behind a by-id-like link goes away and comes back as a new tty."""
    link = tmp_path / "usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0"
    probe = SimUnit(read_profile("xy-md02"), 7)

    def plug() -> tuple[int, int, SimBus]:
        master, slave, _ = open_pty(str(link))
        bus = SimBus(master, {7: probe})
        bus.start()
        return master, slave, bus

    def unplug(master: int, slave: int, bus: SimBus) -> None:
        bus.stop()
        os.close(master)
        os.close(slave)
        link.unlink()

    config = tmp_path / "cfg.json"
    unit = {"unit": 7, "device": "probe-7", "profile": "xy-md02", "interval": POLL}
    config.write_text(json.dumps({"buses": [{"port": str(link), "timeout": 0.3, "units": [unit]}]}))
    plugged = plug()
    try:
        with logged_in_gateway(mosquitto.url, args=["--modbus", str(config)]) as (gw, cookie):
            async with gw.ws_connect(cookie) as ws:
                await next_frame(ws, telemetry_of("probe-7"))
                unplug(*plugged)
                plugged = None
                await next_frame(ws, status_of("probe-7", False), wait=10)
                gw.wait_for_log(r"modbus bus \S+ lost")

                plugged = plug()
                replugged = time.monotonic()
                frame = await next_frame(ws, telemetry_of("probe-7"), wait=10)
                print(
                    f"replug → first reading on the dashboard: {time.monotonic() - replugged:.2f} s"
                )
                assert 15 < frame["metrics"]["temperature"] < 30, frame
                gw.wait_for_log(r"modbus bus \S+ reopened")
    finally:
        if plugged is not None:
            unplug(*plugged)


def test_simulator_cli_prints_the_pty_first_and_stops_on_sigterm():
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "modbus",
            "--pty",
            "--profile",
            "eastron-sdm120",
            "--unit",
            "1",
            "--unit",
            "2",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/pts/"), path
        from pymodbus.client import ModbusSerialClient

        client = ModbusSerialClient(path, baudrate=9600, timeout=1, retries=0)
        assert client.connect()
        for unit in (1, 2):
            answer = client.read_input_registers(0, count=2, device_id=unit)
            assert not answer.isError(), answer
            voltage = client.convert_from_registers(answer.registers, client.DATATYPE.FLOAT32)
            assert 220 < voltage < 240, voltage
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()


async def test_runserial_with_modbus_config_env_beside_a_web_process(
    mosquitto, redis_server, tmp_path: Path
):
    """`runserial` alone, its buses from MODBUS_CONFIG: readings reach the dashboard of a
    separate web process through Redis, and a command sent there is written and acked."""
    from tests.support.gateway import GatewayProcess
    from tests.test_e2e import PASSWORD

    master, slave, path = open_pty()
    relay = SimUnit(read_profile("waveshare-relay-8ch"), 3)
    bus = SimBus(master, {3: relay})
    bus.start()
    config = tmp_path / "cfg.json"
    unit = {"unit": 3, "device": "relays-3", "profile": "waveshare-relay-8ch", "interval": POLL}
    config.write_text(json.dumps({"buses": [{"port": path, "units": [unit]}]}))
    try:
        with GatewayProcess(mosquitto.url, redis_url=redis_server.url) as web:
            web.create_user("operator", PASSWORD, staff=True)
            cookie = web.login("operator", PASSWORD)
            bridge = web.beside("runserial", env={"MODBUS_CONFIG": str(config)})
            with bridge:
                bridge.wait_for_log(r"modbus bus \S+ opened")
                async with web.ws_connect(cookie) as ws:
                    frame = await next_frame(ws, telemetry_of("relays-3"))
                    assert frame["metrics"]["relay8"] is False, frame
                    await until(lambda: web.history(cookie, "relays-3", "relay8"), what="stored")
                    command_id = submit_command(web, cookie, "relays-3", "relay8", {"value": "ON"})
                    done = await next_frame(ws, command_end(command_id))
                    assert done["status"] == "acked", done
                    assert relay.tables["coil"][7] == 1
    finally:
        bus.stop()
        os.close(master)
        os.close(slave)
