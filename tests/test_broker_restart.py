"""The broker restarts under a running gateway: it says so, survives, and picks up where it was.

Against the real gateway process and a real mosquitto (with persistence, as deployed). While
the broker is down `/healthz` answers 503 and the process lives on; when it returns the gateway
reconnects, its subscriptions (native and Tasmota) work, its retained `online` status is
published again and telemetry resumes. With a broker that keeps its state on disk no QoS 1
reading it acknowledged is lost; with one that comes back empty, what devices publish before
the gateway has subscribed again has no subscriber and is gone (measured, reported).
tests/test_e2e.py::test_broker_outage_is_reported_and_survived checks the dashboard side.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import aiomqtt
import orjson
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.servers import Mosquitto
from tests.support.waiting import until

pytestmark = pytest.mark.e2e


class ResilientDevice:
    """A device publishing `{"n": 1, 2, …}` at QoS 1 every `period` s, reconnecting as devices do.

    `acked` holds the numbers the broker acknowledged; a publish the broker never acknowledged
    (it went down mid-way) is retried with the same number after the reconnect.
    """

    def __init__(self, port: int, device: str, period: float = 0.01) -> None:
        self.port = port
        self.device = device
        self.period = period
        self.acked: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        topic, n = f"devices/{self.device}/telemetry", 1
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier=f"dev-{self.device}", timeout=2
                ) as dev:
                    while not self._stop.is_set():
                        await dev.publish(topic, orjson.dumps({"n": n}), qos=1)
                        self.acked.append(n)
                        n += 1
                        await asyncio.sleep(self.period)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"device[{self.device}]")

    async def stop(self) -> list[int]:
        assert self._task is not None
        self._stop.set()
        await asyncio.wait_for(self._task, 10)
        return self.acked


def stored_numbers(db: Path, device: str, metric: str = "n") -> list[int]:
    """Stored values of `metric` for `device`, read straight from the gateway's SQLite file."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        rows = conn.execute(
            "SELECT value FROM devices_reading WHERE device_id = ? AND metric = ?",
            (device, metric),
        ).fetchall()
    return [int(value) for (value,) in rows]


async def retained(port: int, topic: str) -> bytes:
    """The retained message on `topic` (a fresh subscriber's first message)."""
    async with aiomqtt.Client("127.0.0.1", port, timeout=5) as sub:
        await sub.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            message = await anext(sub.messages)
    assert message.retain
    return bytes(message.payload)


@pytest.fixture(params=["keeps its state", "loses its state"])
def broker(request):
    """mosquitto that keeps sessions and retained messages on disk across a restart (as
    deployed), or one that comes back empty (no persistence, or a replaced broker)."""
    with Mosquitto(keep_state=request.param == "keeps its state") as server:
        server.keeps_state = request.param == "keeps its state"
        yield server


async def test_broker_restart_is_reported_survived_and_resumed(broker):
    gw = GatewayProcess(broker.url, log_level="WARNING")
    db = gw.workdir / "db.sqlite3"
    with gw:
        pid = gw.proc.pid if gw.proc else None
        assert await retained(broker.port, gw.status_topic) == b"online"
        device = ResilientDevice(broker.port, "restart-1")
        device.start()
        await until(lambda: len(stored_numbers(db, "restart-1")) >= 50, what="readings stored")
        # A marker in place of the retained status: only the gateway republishing it after
        # the restart can put `online` back.
        async with aiomqtt.Client("127.0.0.1", broker.port) as marker:
            await marker.publish(gw.status_topic, b"stale", qos=1, retain=True)

        await asyncio.to_thread(broker.stop)
        await until(lambda: gw.http_get("/healthz")[0] == 503, what="/healthz 503")
        status, body = gw.http_get("/healthz")
        assert status == 503 and body["mqtt"] != "connected"
        assert gw.metric("gateway_mqtt_connected") == 0
        await asyncio.sleep(2.0)  # long enough for the reconnect backoff to reach its cap
        assert gw.proc is not None and gw.proc.poll() is None and gw.proc.pid == pid
        before = len(device.acked)

        await asyncio.to_thread(broker.start)
        back = time.monotonic()
        await until(lambda: gw.http_get("/healthz")[0] == 200, what="/healthz 200 again")
        healthy = time.monotonic() - back
        resubscribed = len(device.acked)  # everything acknowledged from here on has a route
        await until(
            lambda: any(n > before for n in stored_numbers(db, "restart-1")),
            what="telemetry stored again",
        )
        resumed = time.monotonic() - back
        assert await retained(broker.port, gw.status_topic) == b"online"
        # Every route is subscribed again: a Tasmota device nobody heard before the restart.
        async with aiomqtt.Client("127.0.0.1", broker.port) as tasmota:
            await tasmota.publish("tele/restart-2/SENSOR", b'{"AM2301": {"n": 1}}', qos=1)
        await until(lambda: stored_numbers(db, "restart-2", "AM2301.n"), what="Tasmota stored")
        await until(lambda: len(device.acked) >= before + 50, what="50 more readings published")

        acked = await device.stop()
        # With its state kept, the broker holds the gateway's session (subscriptions, queued
        # QoS 1 messages) through the restart: nothing is lost. An empty broker drops what
        # devices publish before the gateway has subscribed again (no subscriber yet).
        must = acked if broker.keeps_state else acked[resubscribed:]
        numbers = await until(
            lambda: (s := stored_numbers(db, "restart-1")) and set(must) <= set(s) and s,
            wait=15,
            what="every acknowledged reading stored",
        )
        print(
            f"\nbroker that {'keeps' if broker.keeps_state else 'loses'} its state: back → "
            f"/healthz 200 in {healthy:.2f} s, → telemetry stored again in {resumed:.2f} s; "
            f"{len(acked)} QoS 1 readings acknowledged by the broker, "
            f"{len(set(acked) - set(numbers))} lost, {len(numbers) - len(set(numbers))} duplicates"
        )
        assert gw.proc is not None and gw.proc.pid == pid  # never restarted
