"""The simulated MQTT fleet (firmware_sim) against a real mosquitto and a plain subscriber.

Long on purpose: one story per simulator feature the other suites rely on (lifecycle, Last
Will, commands, every fault switch, the CLI), each against the same private broker.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from firmware_sim.faults import FaultSpec, FaultSpecError
from firmware_sim.firmware import Outgoing
from firmware_sim.fleet import Fleet, FleetConfig, parse_broker_url
from firmware_sim.signals import SensorSignals, Walk
from tests.support.checks import retained
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
Msg = tuple[str, bytes, bool, float]  # topic, payload, retain, monotonic receive time


class Recorder:
    """Subscribes to `#` and keeps every message, so a test can wait for what it expects."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[Msg] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Recorder:
        self._client = aiomqtt.Client("127.0.0.1", self.port, identifier=f"rec-{id(self)}")
        await self._client.__aenter__()
        await self._client.subscribe("#", qos=1)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    async def _run(self) -> None:
        async for m in self._client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else b""
            self.messages.append((m.topic.value, payload, m.retain, time.monotonic()))
            self._changed.set()

    async def publish(self, topic: str, payload: object, qos: int = 1) -> None:
        data = payload if isinstance(payload, bytes | str) else json.dumps(payload)
        await self._client.publish(topic, data, qos=qos)

    def on(self, topic: str) -> list[Msg]:
        return [m for m in self.messages if m[0] == topic]

    async def wait(self, predicate: Callable[[list[Msg]], object], within: float = 10.0):
        """Wait until predicate(messages) is truthy and return its value."""
        async with asyncio.timeout(within):
            while True:
                self._changed.clear()
                result = predicate(self.messages)
                if result:
                    return result
                await self._changed.wait()

    async def wait_topic(self, topic: str, payload: bytes | None = None, after: int = 0) -> Msg:
        """The first message on `topic` (with `payload`) among messages[after:]."""

        def find(messages: list[Msg]) -> Msg | None:
            for m in messages[after:]:
                if m[0] == topic and (payload is None or m[1] == payload):
                    return m
            return None

        return await self.wait(find)

    async def wait_json(self, topic: str, after: int = 0, **match: object) -> dict:
        def find(messages: list[Msg]) -> dict | None:
            for m in messages[after:]:
                if m[0] == topic:
                    body = json.loads(m[1])
                    if all(body.get(k) == v for k, v in match.items()):
                        return body
            return None

        return await self.wait(find)


@pytest.fixture
async def recorder(mosquitto):
    async with Recorder(mosquitto.port) as rec:
        yield rec


def telemetry(rec: Recorder, device_id: str) -> list[dict]:
    return [json.loads(m[1]) for m in rec.on(f"devices/{device_id}/telemetry")]


async def command(rec: Recorder, device_id: str, name: str, args: dict | None = None) -> dict:
    """Send a native command and return its ack."""
    cid = f"cmd-{random.getrandbits(32):08x}"
    mark = len(rec.messages)
    body = {"id": cid, "name": name, "args": args or {}}
    await rec.publish(f"devices/{device_id}/commands", body)
    return await rec.wait_json(f"devices/{device_id}/commands/ack", after=mark, id=cid)


# --- Native style --------------------------------------------------------------------------


async def test_online_retained_and_telemetry_shape_and_rate(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=3, rate=10.0, seed=1) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        assert fleet.ids == ["sim-0001", "sim-0002", "sim-0003"]
        for device_id in fleet.ids:
            await recorder.wait_topic(f"devices/{device_id}/status", b"online")
            assert await retained(mosquitto.port, f"devices/{device_id}/status") == b"online"
        start = time.time()
        # 10 Hz: eight readings each come in under a second; waited for (a loaded machine
        # is slower), then bounded above by the time they took (at most twice the rate).
        await eventually(
            lambda: all(len(telemetry(recorder, d.id)) >= 8 for d in fleet.devices),
            what="eight readings from each device",
        )
        for device in fleet.devices:
            readings = telemetry(recorder, device.id)
            assert len(readings) <= 2 * 10 * (time.time() - start) + 2, len(readings)
            assert abs(device.sent - len(readings)) <= 2
            assert [r["seq"] for r in readings] == list(range(1, len(readings) + 1))
            for r in readings:
                assert set(r) == {"temperature", "humidity", "pressure", "battery", "relay"} | {
                    "seq",
                    "ts",
                }
                assert -20 <= r["temperature"] <= 50 and 5 <= r["humidity"] <= 95
                assert 940 <= r["pressure"] <= 1060 and 0 < r["battery"] <= 100
                assert isinstance(r["relay"], bool)
                assert start - 5 < r["ts"] < time.time() + 1
            # A random walk, not uniform noise: successive readings stay close.
            temps = [r["temperature"] for r in readings]
            assert max(abs(a - b) for a, b in zip(temps, temps[1:], strict=False)) < 1.0
    # A clean stop leaves the retained status offline.
    assert await retained(mosquitto.port, "devices/sim-0001/status") == b"offline"


async def test_devices_do_not_publish_in_lockstep(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=20, rate=2.0, seed=2) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        await recorder.wait(lambda ms: sum("/telemetry" in m[0] for m in ms) >= 20)
    firsts = {}
    for topic, _, _, at in recorder.messages:
        if topic.endswith("/telemetry"):
            firsts.setdefault(topic, at)
    spread = max(firsts.values()) - min(firsts.values())
    assert spread > 0.1  # random phases over a 0.5 s period, not one burst


async def test_abrupt_drop_fires_last_will_and_clean_stop_does_not(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=2, rate=5.0) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        dropped, stopped = fleet.devices
        # Both devices would say "bye" on a clean leave; the Will says "offline".
        for device in fleet.devices:
            topic = f"devices/{device.id}/status"
            device.firmware.goodbye = lambda t=topic: Outgoing(t, b"bye", qos=1, retain=True)
        dropped.drop()
        await recorder.wait_topic(f"devices/{dropped.id}/status", b"offline")
        assert await retained(mosquitto.port, f"devices/{dropped.id}/status") == b"offline"
        assert not recorder.on(f"devices/{dropped.id}/status")[-1][1] == b"bye"
        assert not dropped.connected and dropped.drops == 1
        # It stays away until restored (the other one, at the same rate, publishes three more
        # readings meanwhile), then announces itself again.
        sent, others = dropped.sent, len(telemetry(recorder, stopped.id))
        await recorder.wait(lambda ms: len(telemetry(recorder, stopped.id)) >= others + 3)
        assert dropped.sent == sent
        mark = len(recorder.messages)
        dropped.restore()
        await recorder.wait_topic(f"devices/{dropped.id}/status", b"online", after=mark)
        await stopped.stop()
        await recorder.wait_topic(f"devices/{stopped.id}/status", b"bye")
        # A Will would be published as the broker handles the disconnect, before a message
        # sent after it.
        mark = len(recorder.messages)
        await recorder.publish("test/sentinel", b"after the clean stop")
        await recorder.wait_topic("test/sentinel", after=mark)
        assert b"offline" not in [m[1] for m in recorder.on(f"devices/{stopped.id}/status")]


async def test_drop_with_reconnect_after_comes_back(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=1, rate=5.0) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        device = fleet.devices[0]
        device.drop(reconnect_after=0.5)
        mark = len(recorder.messages)
        offline = await recorder.wait_topic("devices/sim-0001/status", b"offline", after=mark)
        after = recorder.messages.index(offline)
        await recorder.wait_topic("devices/sim-0001/status", b"online", after=after)
        assert device.connects == 2


async def test_reboot_acks_then_disconnects_and_comes_back(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=1, rate=10.0) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        device = fleet.devices[0]
        await recorder.wait(lambda ms: len(telemetry(recorder, device.id)) >= 3)
        mark = len(recorder.messages)
        ack = await command(recorder, device.id, "reboot", {"delay": 0.5})
        assert ack["ok"] is True and ack["result"]["rebooting"] is True
        offline = await recorder.wait_topic("devices/sim-0001/status", b"offline", after=mark)
        after = recorder.messages.index(offline)
        online = await recorder.wait_topic("devices/sim-0001/status", b"online", after=after)
        acked = recorder.on("devices/sim-0001/commands/ack")[-1]
        assert acked[3] <= offline[3] < online[3]
        assert online[3] - offline[3] >= 0.4  # stayed away for the delay
        # Fresh boot: sequence numbers start again.
        after = len(recorder.messages)
        first = await recorder.wait(
            lambda ms: [json.loads(m[1]) for m in ms[after:] if m[0].endswith("/telemetry")]
        )
        assert first[0]["seq"] == 1
        assert device.reboots == 1 and device.connects == 2


async def test_set_interval_relay_and_unknown_command(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=1, rate=0.5) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        device = fleet.devices[0]

        ack = await command(recorder, device.id, "set_interval", {"seconds": 0.05})
        assert ack == {"id": ack["id"], "ok": True, "result": {"seconds": 0.05}}
        before = device.sent
        # Was one per 2 s (eight would take 16 s); now ~20 per s (0.4 s): 4 s leaves ten
        # times the margin for a loaded machine and still tells the rates apart.
        await eventually(lambda: device.sent - before >= 8, within=4.0, what="the new rate")

        for bad in ({"seconds": -1}, {"seconds": "fast"}, {}):
            ack = await command(recorder, device.id, "set_interval", bad)
            assert ack["ok"] is False and "seconds" in ack["error"]

        ack = await command(recorder, device.id, "relay", {"state": True})
        assert ack["ok"] is True and ack["result"] == {"relay": True}
        mark = len(recorder.messages)
        reading = await recorder.wait_json("devices/sim-0001/telemetry", after=mark)
        assert reading["relay"] is True
        ack = await command(recorder, device.id, "relay")  # no state: toggle
        assert ack["result"] == {"relay": False} and device.relay is False
        ack = await command(recorder, device.id, "relay", {"state": "on"})
        assert ack["ok"] is False

        ack = await command(recorder, device.id, "self_destruct", {"now": True})
        assert ack["ok"] is False and "unknown command" in ack["error"]
        assert "result" not in ack

        # Not a command at all: ignored and counted, and the next one still works.
        await recorder.publish("devices/sim-0001/commands", b"\xff not json")
        ack = await command(recorder, device.id, "status")
        assert ack["ok"] is True and ack["result"]["interval"] == 0.05
        assert device.ignored == 1


async def test_noack_and_delayed_ack_faults(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=2, rate=5.0) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        silent, slow = fleet.devices
        silent.set_noack()
        slow.set_ack_delay(1.0)

        sent_at = time.monotonic()
        ack = await command(recorder, slow.id, "relay", {"state": True})
        assert ack["ok"] is True
        assert time.monotonic() - sent_at >= 0.9

        mark = len(recorder.messages)
        body = {"id": "cmd-silent", "name": "relay", "args": {"state": True}}
        await recorder.publish(f"devices/{silent.id}/commands", body)
        await recorder.wait(lambda ms: silent.relay is True)  # the command still took effect
        # Its next reading leaves on the same connection after the command was handled: an
        # ack would have come before it.
        handled = len(recorder.messages)
        await recorder.wait_topic(f"devices/{silent.id}/telemetry", after=handled)
        acks = [m for m in recorder.messages[mark:] if m[0] == f"devices/{silent.id}/commands/ack"]
        assert acks == []
        assert silent.acks_suppressed == 1

        silent.restore()
        ack = await command(recorder, silent.id, "relay", {"state": False})
        assert ack["result"] == {"relay": False}


async def test_garbage_mode_publishes_every_kind_and_good_telemetry_continues(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=1, rate=40.0) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        device = fleet.devices[0]
        device.set_garbage(1.0)
        await recorder.wait(lambda ms: device.garbage_sent >= 14, within=15)
    payloads = [m[1] for m in recorder.on("devices/sim-0001/telemetry")]
    good = bad = 0
    for p in payloads:
        try:
            body = json.loads(p, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError:
            bad += 1
            continue
        if isinstance(body, dict) and "seq" in body:
            good += 1
    assert good >= 14 and bad >= 3
    assert b'{"temperature": NaN, "humidity": Infinity}' in payloads
    assert any(len(p) > 64 * 1024 for p in payloads)
    topics = {m[0] for m in recorder.messages}
    assert "devices/sim-0001.bad!/telemetry" in topics
    assert f"devices/{'x' * 65}/telemetry" in topics
    acks = recorder.on("devices/sim-0001/commands/ack")
    assert b"no-such-command" in b"".join(m[1] for m in acks)


async def test_burst_mode_publishes_ten_times_faster(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=1, rate=4.0) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        device = fleet.devices[0]
        await asyncio.sleep(1.0)
        start = device.sent
        await asyncio.sleep(1.0)
        normal = device.sent - start
        assert normal <= 8, normal  # 4 per s: a loaded machine only publishes fewer
        device.set_burst(10)
        start = device.sent
        # 40 per s: twenty in 0.5 s; at the normal rate they would take 5 s. 2.5 s leaves
        # five times the margin for a loaded machine and still tells the rates apart.
        await eventually(lambda: device.sent - start >= 20, within=2.5, what="the burst rate")
        fleet.apply("burst=1@sim-0001")
        assert device.faults.burst == 1


async def test_fault_specs_select_devices(mosquitto):
    async with Fleet(mosquitto.url, devices=10, rate=1.0, seed=3) as fleet:
        hit = fleet.apply("delay=2@30%")
        assert len(hit) == 3 and all(d.faults.ack_delay == 2.0 for d in hit)
        assert sum(d.faults.ack_delay > 0 for d in fleet.devices) == 3
        hit = fleet.apply("noack@sim-0002+sim-0009")
        assert [d.id for d in hit] == ["sim-0002", "sim-0009"]
        assert len(fleet.apply("garbage=0.1")) == 10
        with pytest.raises(FaultSpecError):
            fleet.apply("noack@sim-0099")


def test_fault_spec_parsing():
    assert FaultSpec.parse("drop") == FaultSpec("drop", None)
    assert FaultSpec.parse("drop=30@10%") == FaultSpec("drop", 30.0, 0.1)
    assert FaultSpec.parse("delay@0.5") == FaultSpec("delay", 5.0, 0.5)
    assert FaultSpec.parse(" BURST=20 @a-1+b_2") == FaultSpec("burst", 20.0, None, ("a-1", "b_2"))
    assert [f.kind for f in FaultSpec.parse_many(["noack,garbage", "drop"])] == [
        "noack",
        "garbage",
        "drop",
    ]
    for bad in ("explode", "delay=soon", "drop@150%", "delay=-1"):
        with pytest.raises(FaultSpecError):
            FaultSpec.parse(bad)


def test_config_validation_and_broker_urls():
    assert FleetConfig(devices=12000).device_id(1) == "sim-00001"
    assert FleetConfig(style="tasmota").device_id(7) == "tasmota-0007"
    for bad in ({"style": "zigbee"}, {"rate": 0}, {"qos": 2}, {"prefix": "bad id"}):
        with pytest.raises(ValueError):
            FleetConfig(**bad)
    b = parse_broker_url("mqtts://user:p%40ss@broker.example")
    assert (b.host, b.port, b.username, b.password, b.tls) == (
        "broker.example",
        8883,
        "user",
        "p@ss",
        True,
    )
    assert parse_broker_url("mqtt://10.0.0.1:1884").port == 1884


def test_signals_are_bounded_mean_reverting_walks():
    rng = random.Random(5)
    walk = Walk(mean=20.0, sigma=0.05, theta=1 / 600, low=-20.0, high=50.0, value=45.0)
    values = [walk.step(60.0, rng) for _ in range(2000)]  # ~33 hours in minute steps
    assert all(-20 <= v <= 50 for v in values)
    assert abs(sum(values[500:]) / len(values[500:]) - 20.0) < 1.5  # pulled back from 45
    assert max(abs(a - b) for a, b in zip(values, values[1:], strict=False)) < 3.0  # no jumps

    sensor = SensorSignals.create(random.Random(6), now=0.0)
    battery = [sensor.sample(now=h * 3600.0)["battery"] for h in range(1, 10)]
    assert battery == sorted(battery, reverse=True) and battery[0] > battery[-1]
    extreme = Walk(mean=0.0, sigma=50.0, theta=0.001, low=-1.0, high=1.0)
    assert all(-1 <= extreme.step(1.0, rng) <= 1 for _ in range(1000))
    assert not any(math.isnan(extreme.step(1e6, rng)) for _ in range(10))


async def test_hundreds_of_devices_connect_and_publish(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=300, rate=2.0, seed=4) as fleet:
        async with asyncio.timeout(30):
            await fleet.wait_connected()
        assert fleet.stats()["connected"] == 300

        def publishers(messages: list[Msg]) -> set[str]:
            return {m[0] for m in messages if m[0].endswith("/telemetry")}

        await recorder.wait(lambda ms: len(publishers(ms)) == 300, within=30)


async def test_devices_reconnect_after_broker_restart(mosquitto):
    async with Fleet(mosquitto.url, devices=3, rate=5.0, seed=5) as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        mosquitto.stop()
        async with asyncio.timeout(10):
            for device in fleet.devices:
                await device.wait_offline()
        mosquitto.start()
        async with asyncio.timeout(20):
            await fleet.wait_connected()
        assert all(d.connects == 2 for d in fleet.devices)


# --- Tasmota style -------------------------------------------------------------------------


async def test_tasmota_topics_and_payloads(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=1, rate=10.0, style="tasmota") as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        dev = fleet.devices[0].id
        assert dev == "tasmota-0001"
        await recorder.wait_topic(f"tele/{dev}/LWT", b"Online")
        assert await retained(mosquitto.port, f"tele/{dev}/LWT") == b"Online"
        info = json.loads((await recorder.wait_topic(f"tele/{dev}/INFO1"))[1])
        assert info["Info1"]["GroupTopic"] == "cmnd/tasmotas/"
        state = json.loads((await recorder.wait_topic(f"tele/{dev}/STATE"))[1])
        assert state["POWER"] in ("ON", "OFF") and "Signal" in state["Wifi"]
        assert isinstance(state["UptimeSec"], int) and "T" in state["Uptime"]
        sensor = json.loads((await recorder.wait_topic(f"tele/{dev}/SENSOR"))[1])
        assert time.strptime(sensor["Time"], "%Y-%m-%dT%H:%M:%S")
        assert set(sensor["AM2301"]) >= {"Temperature", "Humidity"}
        assert sensor["TempUnit"] == "C" and "Pressure" in sensor["BMP280"]

        async def cmnd(name: str, payload: str) -> dict:
            mark = len(recorder.messages)
            await recorder.publish(f"cmnd/{dev}/{name}", payload)
            return json.loads((await recorder.wait_topic(f"stat/{dev}/RESULT", after=mark))[1])

        mark = len(recorder.messages)
        assert await cmnd("POWER", "ON") == {"POWER": "ON"}
        assert (await recorder.wait_topic(f"stat/{dev}/POWER", after=mark))[1] == b"ON"
        assert await cmnd("POWER", "") == {"POWER": "ON"}  # empty payload = query
        assert await cmnd("Power", "TOGGLE") == {"POWER": "OFF"}
        assert await cmnd("power1", "1") == {"POWER": "ON"}
        mark = len(recorder.messages)
        after_power = await recorder.wait_json(f"tele/{dev}/STATE", after=mark)
        assert after_power["POWER"] == "ON"
        assert await cmnd("TelePeriod", "") == {"TelePeriod": 0.1}
        assert await cmnd("TelePeriod", "60") == {"TelePeriod": 60}
        assert fleet.devices[0].interval == 60
        assert await cmnd("FlashFirmware", "now") == {"Command": "Unknown"}
        assert await cmnd("POWER", "maybe") == {"Command": "Error"}

        mark = len(recorder.messages)
        assert await cmnd("Restart", "1") == {"Restart": "Restarting"}
        offline = await recorder.wait_topic(f"tele/{dev}/LWT", b"Offline", after=mark)
        after = recorder.messages.index(offline)
        await recorder.wait_topic(f"tele/{dev}/LWT", b"Online", after=after)

        mark = len(recorder.messages)
        fleet.devices[0].drop()
        await recorder.wait_topic(f"tele/{dev}/LWT", b"Offline", after=mark)
        assert await retained(mosquitto.port, f"tele/{dev}/LWT") == b"Offline"


async def test_tasmota_faults(mosquitto, recorder):
    async with Fleet(mosquitto.url, devices=2, rate=20.0, style="tasmota") as fleet:
        async with asyncio.timeout(10):
            await fleet.wait_connected()
        quiet, noisy = fleet.devices
        quiet.set_noack()
        noisy.set_garbage(1.0)
        await recorder.publish(f"cmnd/{quiet.id}/POWER", "ON")
        await recorder.wait(lambda ms: noisy.garbage_sent >= 10)
        # Its next telemetry comes from the same connection after the command was handled: a
        # RESULT would have come before it.
        await recorder.wait(lambda ms: quiet.relay is True)
        mark = len(recorder.messages)
        await recorder.wait_topic(f"tele/{quiet.id}/SENSOR", after=mark)
        assert quiet.relay is True and not recorder.on(f"stat/{quiet.id}/RESULT")
        assert b"Maybe" in [m[1] for m in recorder.on(f"tele/{noisy.id}/LWT")]


# --- The management command ----------------------------------------------------------------


async def test_simulate_command_publishes_and_stops_cleanly_on_sigterm(mosquitto):
    async with Recorder(mosquitto.port) as rec:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "manage.py",
            "simulate",
            "--mqtt",
            mosquitto.url,
            "--devices",
            "3",
            "--rate",
            "5",
            "--style",
            "native",
            "--prefix",
            "cmd",
            "--duration",
            "60",
            "--faults",
            "delay=0.1@cmd-0002",
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            ids = ["cmd-0001", "cmd-0002", "cmd-0003"]
            await rec.wait(lambda ms: all(rec.on(f"devices/{i}/telemetry") for i in ids), within=30)
            await rec.publish("devices/cmd-0002/commands", {"id": "x1", "name": "relay"})
            await rec.wait_json("devices/cmd-0002/commands/ack", id="x1")
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert "3/3 connected" in text and "fault delay=0.1 on 1: cmd-0002" in text
        assert "stopped" in text
        for device_id in ids:
            await rec.wait_topic(f"devices/{device_id}/status", b"offline")


def test_simulate_command_rejects_bad_options(mosquitto):
    result = subprocess.run(
        [sys.executable, "manage.py", "simulate", "--mqtt", mosquitto.url, "--faults", "boom"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "unknown fault" in result.stderr


async def test_python_m_firmware_sim_mqtt_runs_the_same_fleet(mosquitto, recorder):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware_sim",
        "mqtt",
        "--mqtt",
        mosquitto.url,
        "--devices",
        "2",
        "--style",
        "tasmota",
        "--rate",
        "5",
        "--duration",
        "1",
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "2/2 connected" in out.decode()
    assert recorder.on("tele/tasmota-0002/SENSOR")
    online = await recorder.wait_topic("tele/tasmota-0001/LWT", b"Online")
    await recorder.wait_topic(
        "tele/tasmota-0001/LWT", b"Offline", after=recorder.messages.index(online)
    )
