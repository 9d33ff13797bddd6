"""`rungateway`, `runmqtt` and `ensure_demo_user` as real subprocesses (docs/interface.md §1)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time

import paho.mqtt.client as paho

from tests.support.checks import first_message, retained
from tests.support.gateway import ROOT, GatewayProcess
from tests.support.servers import free_port, nothing_listens
from tests.support.timing import allowance


def status_of(port: int, topic: str) -> bytes | None:
    """The retained payload on `topic`, or None when there is none yet (a second's wait).

    A live message (published while the probe subscribed: nothing was retained yet when it
    did) is "none yet" too; the next probe reads what the broker retained of it.
    """
    with contextlib.suppress(TimeoutError):
        message = asyncio.run(first_message(port, topic, wait=1.0))
        return bytes(message.payload) if message.retain else None
    return None


def publish(port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def test_rungateway_healthz_login_and_clean_sigterm(mosquitto):
    gw = GatewayProcess(mosquitto.url)
    with gw:
        status, body = gw.http_get("/healthz")
        assert status == 200, body
        assert body["mqtt"] == "connected"
        banner = gw.wait_for_log(r"gateway running: dashboard (\S+) \| broker (\S+)")
        assert banner.group(1) == f"http://127.0.0.1:{gw.port}/"
        assert banner.group(2) == mosquitto.url
        assert "| web plain HTTP (set DJANGO_HTTPS=1" in gw.log_text(), "the mode and why"
        assert "InMemoryChannelLayer" in gw.log_text()
        assert asyncio.run(retained(mosquitto.port, gw.status_topic)) == b"online"

        # ensure_demo_user prints a fresh random password that logs in for real; run again
        # it keeps it (open sessions stay), unless --reset-password.
        first = re.search(r"demo / (\S+)", gw.manage("ensure_demo_user")).group(1)
        assert "(unchanged)" in gw.manage("ensure_demo_user")
        assert gw.login("demo", first)
        second = re.search(r"demo / (\S+)", gw.manage("ensure_demo_user", "--reset-password"))
        second = second.group(1)
        assert first != second and len(second) >= 12
        cookie = gw.login("demo", second)
        status, devices = gw.http_get("/api/devices/", cookie)
        assert (status, devices) == (200, [])  # a list, and no device has spoken yet
        assert gw.http_get("/api/devices/") == (401, {"error": "authentication required"})
    # Leaving the block sent SIGTERM and asserted exit code 0 within 5 s.
    print(f"rungateway stopped {gw.shutdown_seconds:.2f} s after SIGTERM")
    assert gw.shutdown_seconds is not None
    assert gw.shutdown_seconds < allowance(5.0)  # the documented 5 s, under load more
    assert asyncio.run(retained(mosquitto.port, gw.status_topic)) == b"offline"


def test_runmqtt_shared_group_stores_telemetry(mosquitto):
    gw = GatewayProcess(
        mosquitto.url,
        command="runmqtt",
        args=["--shared-group", "g1"],
        ready_log=r"MQTT bridge running: broker \S+ \| shared group g1",
    )
    with gw:
        assert "channel layer is in-memory" in gw.log_text()
        deadline = time.monotonic() + 10
        while status_of(mosquitto.port, gw.status_topic) != b"online":
            assert time.monotonic() < deadline, gw.tail()
        publish(mosquitto.port, "devices/shared-1/telemetry", b'{"temperature": 20.5}')
        script = (
            "from devices.models import Reading;"
            "print('count', Reading.objects.filter(device_id='shared-1').count())"
        )
        deadline = time.monotonic() + 10
        while "count 1" not in gw.manage("shell", "-c", script):
            assert time.monotonic() < deadline, gw.tail()
            time.sleep(0.2)
    assert gw.shutdown_seconds < allowance(5.0)  # the documented 5 s, under load more
    assert asyncio.run(retained(mosquitto.port, gw.status_topic)) == b"offline"


def test_rungateway_embedded_broker_starts_one():
    port = free_port()
    gw = GatewayProcess(f"mqtt://127.0.0.1:{port}", args=["--embedded-broker"])
    with gw:
        assert gw.http_get("/healthz")[1]["mqtt"] == "connected"
        gw.wait_for_log(r"embedded broker started: mosquitto")
        assert "(embedded mosquitto)" in gw.log_text()
    print(f"rungateway + embedded mosquitto stopped in {gw.shutdown_seconds:.2f} s")
    assert nothing_listens(port), "something still listens"


def test_bad_broker_url_is_a_clear_error():
    result = subprocess.run(
        [sys.executable, "manage.py", "rungateway", "--mqtt", "http://127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "unsupported broker URL scheme" in result.stderr
