"""firmware_sim's serial device: against the real serial server and device consumer on a pty,
and its command line as a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import serial

from devices.conventions import mirror
from devices.conventions.serial import SerialDeviceConsumer
from devices.telemetry.pipeline import current_pipeline
from firmware_sim.serial_device import LONG_LINE_BYTES, SerialSimDevice, open_pty
from gateway.serial.server import SerialServer
from tests.support.checks import rejected
from tests.support.waiting import eventually
from tests.test_serial_server import Recorder, serving

ROOT = Path(__file__).resolve().parent.parent


def test_sim_lines_decode_and_commands_are_acked():
    master, slave, _ = open_pty()
    try:
        sim = SerialSimDevice(master, "s1", seed=1)
        assert set(orjson.loads(sim.telemetry_line())) == {"temperature", "humidity", "relay", "ts"}
        kv = SerialSimDevice(master, "s1", fmt="kv", seed=1).telemetry_line()
        assert kv.startswith(b"temperature=") and b",humidity=" in kv and kv.endswith(b"\n")
        assert len(sim.noise_bytes("long")) == LONG_LINE_BYTES + 1
        assert not sim.noise_bytes("partial").endswith(b"\n")
        sim.handle_line(b'{"id": "a", "name": "set_relay", "args": {"on": true}}')
        sim.handle_line(b'{"id": "b", "name": "self_destruct", "args": {}}')
        sim.handle_line(b"not json")
        data = b""
        while data.count(b"\n") < 2:
            data += os.read(slave, 4096)
        acks = data.splitlines()
        assert [orjson.loads(a) for a in acks] == [
            {"id": "a", "ok": True, "result": {"relay": True}},
            {"id": "b", "ok": False, "error": "unknown command 'self_destruct'"},
        ]
        with pytest.raises(ValueError):
            SerialSimDevice(master, noise=["lightning"])
    finally:
        os.close(master)
        os.close(slave)


async def test_sim_with_noise_through_server_every_good_line_arrives():
    master, slave, path = open_pty()
    sim = SerialSimDevice(
        master, "noisy", rate=200, noise=["garbage", "utf8", "long"], noise_rate=0.5, seed=7
    )
    app = Recorder()
    too_long = rejected("frame_too_long")
    try:
        async with serving(app, path):
            await app.next("serial.connect")
            await sim.run(count=40)
            good = []
            while len(good) < 40:
                frame = (await app.next("serial.frame", timeout=10))["bytes"]
                if frame.startswith(b'{"temperature"'):
                    good.append(orjson.loads(frame))
            assert all("humidity" in g for g in good)
    finally:
        os.close(master)
        os.close(slave)
    assert rejected("frame_too_long") > too_long  # the 100 kB lines were dropped and counted


@pytest.mark.django_db(transaction=True)
async def test_sim_answers_a_command_sent_by_the_device_consumer():
    """The consumer writes one JSON line; the sim acks it; the ack comes back as a frame."""
    saved = dict(mirror._config)
    mirror.configure(enabled=False)
    master, slave, path = open_pty()
    sim = SerialSimDevice(master, "sim-1", rate=0.01)
    unknown = rejected("unknown_command")
    server = SerialServer(SerialDeviceConsumer.as_asgi(), [f"{path}?device=sim-1"])
    task = asyncio.create_task(server.serve())
    runner = asyncio.create_task(sim.run())
    try:
        deadline = time.monotonic() + 10
        while not server.connected:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        from channels.layers import get_channel_layer

        await eventually(
            lambda: get_channel_layer().groups.get("device.sim-1"), what="device.sim-1 joined"
        )

        await get_channel_layer().group_send(
            "device.sim-1",
            {"type": "device.command", "id": "c-9", "name": "ping", "args": {}},
        )
        while not sim.commands:
            assert time.monotonic() < deadline, "command never reached the device"
            await asyncio.sleep(0.02)
        assert sim.commands == [{"id": "c-9", "name": "ping", "args": {}}]
        # "c-9" is not a stored command, so its ack is counted as unknown_command.
        while rejected("unknown_command") == unknown:
            assert time.monotonic() < deadline, "ack never came back"
            await asyncio.sleep(0.02)
    finally:
        runner.cancel()
        await server.shutdown(3)
        await task
        pipeline = current_pipeline()
        if pipeline is not None:
            await pipeline.close()
        os.close(master)
        os.close(slave)
        mirror._config.update(saved)


def test_cli_prints_pty_path_and_emits_lines(tmp_path):
    link = tmp_path / "sim-tty"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "serial", "--pty", "--link", str(link),
         "--rate", "20", "--format", "kv", "--count", "200"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        path = proc.stdout.readline().strip()
        assert path == str(link) and os.path.islink(path)
        with serial.serial_for_url(path, timeout=5) as port:
            port.reset_input_buffer()
            line = port.readline()
        assert line.startswith(b"temperature=") and line.endswith(b"\n")
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert not link.exists()  # the simulated unplug removes its by-id link
