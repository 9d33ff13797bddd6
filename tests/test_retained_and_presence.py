"""Retained messages are state, not new readings; presence comes only from presence evidence.

A real mosquitto, real `mosquitto_pub` clients (the way users set and clear retained topics,
mosquitto_pub(1): ``-r`` retain, ``-n`` empty message) and the gateway as a child process,
restarted for real (docs/retained-and-presence.md). Tasmota payloads are as Tasmota ships them:
Tasmota docs "MQTT" (``tele/<topic>/LWT`` ``Online``/``Offline``, SensorRetain, PowerRetain) and
tasmota/tasmota_support/support_tasmota.ino (``stat/<topic>/POWER`` ``ON``/``OFF``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.servers import Mosquitto, require_binary
from tests.support.waiting import until

pytestmark = pytest.mark.e2e

PASSWORD = "retained-pw-5813"
T = 1_764_214_000.0


def pub(
    broker: Mosquitto, topic: str, payload: str | None, *, retain: bool = True, qos: int = 1
) -> None:
    """One `mosquitto_pub`; `payload` None sends the empty message (``-n``)."""
    cmd = [require_binary("mosquitto_pub", "mosquitto-clients"), "-h", "127.0.0.1"]
    cmd += ["-p", str(broker.port), "-q", str(qos), "-t", topic]
    cmd += ["-n"] if payload is None else ["-m", payload]
    if retain:
        cmd.append("-r")
    subprocess.run(cmd, check=True, timeout=10)


def device(gw: GatewayProcess, cookie: str, device_id: str) -> dict[str, Any] | None:
    """The device as `/api/devices/` lists it (None while unknown)."""
    status, body = gw.http_get("/api/devices/", cookie)
    assert status == 200, body
    devices = body if isinstance(body, list) else body.get("devices", [])
    return next((d for d in devices if d["id"] == device_id), None)


async def sentinel(gw: GatewayProcess, broker: Mosquitto, cookie: str, n: int) -> None:
    """A live reading published now, waited for in the history: the broker sent every replay
    before it (on subscribe), and the writer stores in order, so they are handled too."""
    pub(broker, "devices/sentinel/telemetry", json.dumps({"n": n, "ts": T + n}), retain=False)
    await until(
        lambda: [T + n, n] in gw.history(cookie, "sentinel", "n"), what=f"sentinel {n} stored"
    )


async def restart(gw: GatewayProcess) -> None:
    """Stop the gateway (SIGTERM) and start it again on the same database and client id."""
    await asyncio.to_thread(gw.stop)
    await asyncio.to_thread(gw.start, False)


async def test_retained_readings_are_stored_once_across_restarts(mosquitto):
    # The case: a retained reading with its own ts, two restarts.
    pub(mosquitto, "devices/ret-1/telemetry", json.dumps({"temperature": 19, "ts": T}))
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("ops", PASSWORD, staff=True)
        cookie = gw.login("ops", PASSWORD)
        # A retained reading without ts, set while the gateway listens: a live reading then.
        pub(mosquitto, "devices/ret-2/telemetry", json.dumps({"temperature": 21}))
        await until(lambda: gw.history(cookie, "ret-2", "temperature"), what="ret-2 stored")
        await sentinel(gw, mosquitto, cookie, 1)
        assert gw.history(cookie, "ret-1", "temperature") == [[T, 19.0]]
        ret2 = device(gw, cookie, "ret-2")
        assert ret2["online"] is True and ret2["metrics"] == {"temperature": 21.0}

        for n in (2, 3):
            await restart(gw)
            # The replay is heard again and stores nothing new.
            await until(
                lambda: gw.metric("gateway_telemetry_duplicates_total") >= 1,
                what="the replayed reading found already stored",
            )
            await sentinel(gw, mosquitto, cookie, n)
            assert gw.history(cookie, "ret-1", "temperature") == [[T, 19.0]]
            assert len(gw.history(cookie, "ret-2", "temperature")) == 1
            again = device(gw, cookie, "ret-2")
            assert again["last_seen"] == ret2["last_seen"]  # a replay is no sign of life
            assert again["metrics"] == {"temperature": 21.0}


async def test_a_retained_reading_without_ts_seeds_the_latest_value_only(mosquitto):
    # Published retained while no gateway runs: the first gateway only ever hears replays.
    pub(mosquitto, "devices/seed-1/telemetry", json.dumps({"temperature": 17.5}))
    pub(mosquitto, "devices/seed-1/telemetry/humidity", "40")
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("ops", PASSWORD, staff=True)
        cookie = gw.login("ops", PASSWORD)
        for n in (1, 2):
            await sentinel(gw, mosquitto, cookie, n)
            seeded = await until(
                lambda: (d := device(gw, cookie, "seed-1")) and len(d["metrics"]) == 2 and d,
                what="seed-1's latest values",
            )
            assert seeded["metrics"] == {"temperature": 17.5, "humidity": 40.0}
            assert (seeded["online"], seeded["last_seen"]) == (False, None)
            assert gw.history(cookie, "seed-1", "temperature") == []
            if n == 1:
                await restart(gw)


async def test_replayed_tasmota_state_is_no_sign_of_life_and_commands_stay_held(mosquitto):
    # The sequence: the device came, switched its relay (PowerRetain), and died.
    pub(mosquitto, "tele/tas-b/LWT", "Online")
    pub(mosquitto, "stat/tas-b/POWER", "ON")
    pub(mosquitto, "tele/tas-b/LWT", "Offline")
    # SensorRetain with Time 2 (Tasmota docs "Commands": Time 2 adds "Epoch"): a reading at
    # its own time, stored once however often it is replayed.
    sensor = {"Time": "2026-11-27T04:46:40", "Epoch": int(T), "DS18B20": {"Temperature": 20.1}}
    pub(mosquitto, "tele/tas-b/SENSOR", json.dumps(sensor))
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("ops", PASSWORD, staff=True)
        cookie = gw.login("ops", PASSWORD)
        for n in (1, 2):
            await sentinel(gw, mosquitto, cookie, n)
            await until(
                lambda: gw.history(cookie, "tas-b", "DS18B20.Temperature"), what="SENSOR stored"
            )
            tas = await until(
                lambda: (d := device(gw, cookie, "tas-b")) and "POWER" in d["metrics"] and d,
                what="tas-b's relay state",
            )
            assert tas["online"] is False
            assert tas["metrics"]["POWER"] is True  # the relay's last known state
            assert gw.history(cookie, "tas-b", "POWER") == []  # not a new reading
            assert gw.history(cookie, "tas-b", "DS18B20.Temperature") == [[T, 20.1]]
            if n == 1:
                await restart(gw)

        # A command to the dead device is held, not sent.
        status, body = gw.http_request(
            "POST", "/api/devices/tas-b/commands", cookie=cookie, body={"name": "Power"}
        )
        assert status == 202, body
        command = body["id"]
        await sentinel(gw, mosquitto, cookie, 3)
        assert gw.http_get(f"/api/commands/{command}", cookie)[1]["status"] == "pending"
        # The device comes back (its LWT, set retained by Tasmota on connect): it goes out.
        pub(mosquitto, "tele/tas-b/LWT", "Online")
        await until(
            lambda: gw.http_get(f"/api/commands/{command}", cookie)[1]["status"] == "sent",
            what="held command sent once the device is online",
        )


async def test_clearing_retained_topics_is_not_an_error(mosquitto):
    pub(mosquitto, "devices/clr-1/telemetry", json.dumps({"temperature": 19, "ts": T}))
    pub(mosquitto, "devices/clr-1/status", "online")
    pub(mosquitto, "tele/clr-t/LWT", "Online")
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("ops", PASSWORD, staff=True)
        cookie = gw.login("ops", PASSWORD)
        await sentinel(gw, mosquitto, cookie, 1)
        reasons = ("bad_json", "bad_status", "bad_value", "no_metrics", "consumer_error")

        def rejected() -> dict[str, float]:
            return {
                r: gw.metric("gateway_messages_rejected_total", f'reason="{r}"') for r in reasons
            }

        before = rejected()
        for topic in (
            "devices/clr-1/telemetry",
            "devices/clr-1/telemetry/humidity",
            "devices/clr-1/status",
            "devices/clr-1/commands/ack",
            "tele/clr-t/LWT",
            "tele/clr-t/SENSOR",
            "stat/clr-t/POWER",
            "stat/clr-t/RESULT",
        ):
            pub(mosquitto, topic, None)  # mosquitto_pub -r -n: clears the retained message
        await sentinel(gw, mosquitto, cookie, 2)
        assert rejected() == before
        assert device(gw, cookie, "clr-1")["online"] is True  # nothing said otherwise
        await restart(gw)
        await sentinel(gw, mosquitto, cookie, 3)
        assert rejected() == {r: 0.0 for r in reasons}  # a fresh process: nothing replayed


async def test_a_replayed_online_status_is_presence_and_releases_held_commands(mosquitto):
    # docs/interface.md §3.1: a device's status is retained and its Last Will. The replayed
    # `online` is what the broker holds while the device's session is up, so it counts.
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("ops", PASSWORD, staff=True)
        cookie = gw.login("ops", PASSWORD)
        pub(mosquitto, "devices/lw-1/status", "offline")
        await until(lambda: device(gw, cookie, "lw-1"), what="lw-1 registered")
        status, body = gw.http_request(
            "POST", "/api/devices/lw-1/commands", cookie=cookie, body={"name": "ping"}
        )
        assert status == 202, body
        await sentinel(gw, mosquitto, cookie, 1)
        assert gw.http_get(f"/api/commands/{body['id']}", cookie)[1]["status"] == "pending"
        await asyncio.to_thread(gw.stop)
        # The device comes back while the gateway is down. QoS 0: not queued in the gateway's
        # session, so the replay on subscribe is the only way the gateway hears it.
        pub(mosquitto, "devices/lw-1/status", "online", qos=0)
        await asyncio.to_thread(gw.start, False)
        await until(
            lambda: gw.http_get(f"/api/commands/{body['id']}", cookie)[1]["status"] == "sent",
            what="the held command sent on the replayed online",
        )
        assert device(gw, cookie, "lw-1")["online"] is True
