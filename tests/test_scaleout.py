"""Scale-out: several MQTT bridges (one shared subscription group) and several web workers on
one Redis and one PostgreSQL, all real processes on loopback.

The story: two `runmqtt --shared-group g` bridges split the devices' messages; each one is
stored exactly once; dashboards on either of two uvicorn workers see every device; a command
sent through one worker reaches its device whichever bridge serves it, and its ack reaches
both workers' dashboards; one bridge killed, the other takes all the traffic; a bridge with a
persistent session killed instead, its share waits for it. Before that, each part that makes
processes agree, on its own: the device row upsert, the device instances' shared online
state, and the deadline of a command whose bridge died. Long on purpose: those parts and the
whole story share one set of processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiomqtt
import orjson
import pytest
from channels.db import database_sync_to_async

from devices.commands import service as commands
from devices.commands import states
from devices.models import Command, Device
from devices.routing import mqtt_routes
from devices.telemetry.pipeline import get_pipeline
from devices.telemetry.store import DeviceUpdate, write_batch
from gateway.mqtt.routing import TopicRouter
from gateway.mqtt.testing import MqttCommunicator
from tests.support.gateway import GatewayProcess, postgres_database

TS = 1_764_214_000.0
PASSWORD = secrets.token_urlsafe(12)


# --- two writers, batches committed in either order -----------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_an_older_batch_committed_later_never_overwrites_newer_values():
    write = database_sync_to_async(write_batch)
    # Bridge B's batch (newer) commits first ...
    await write([], {"d": DeviceUpdate("mqtt", True, TS + 2, {"t": 22.0}, TS + 2)})
    # ... then bridge A's older one: it only fills in the metric the row lacks.
    await write([], {"d": DeviceUpdate("mqtt", True, TS + 1, {"t": 21.0, "h": 40.0}, TS + 1)})
    device = await Device.objects.aget(pk="d")
    assert device.metrics == {"t": 22.0, "h": 40.0}
    assert device.last_seen.timestamp() == TS + 2

    # A Last Will heard before the newest reading (another bridge was slower) is old news ...
    await write([], {"d": DeviceUpdate("mqtt", False, None, {}, TS + 1.5)})
    assert (await Device.objects.aget(pk="d")).online is True
    # ... one heard after it is not.
    await write([], {"d": DeviceUpdate("mqtt", False, None, {}, TS + 3)})
    device = await Device.objects.aget(pk="d")
    assert device.online is False and device.last_seen.timestamp() == TS + 2

    # Newer values still win as before.
    await write([], {"d": DeviceUpdate("mqtt", True, TS + 4, {"t": 23.0}, TS + 4)})
    device = await Device.objects.aget(pk="d")
    assert (device.online, device.metrics) == (True, {"t": 23.0, "h": 40.0})


async def published_next(layer, sentinel: str, *bridges: MqttCommunicator) -> None:
    """A command published as is, sent to d1's group now, is the next thing each bridge's
    instance publishes: it handled what came before and published none of it."""
    event = {"type": "device.command", "id": sentinel, "name": "sentinel"}
    await layer.group_send("device.d1", event)
    for bridge in bridges:
        published = await bridge.receive_publish(timeout=5)
        assert orjson.loads(published["payload"])["id"] == sentinel, published


@pytest.mark.django_db(transaction=True)
async def test_two_bridges_instances_of_a_device_agree_on_its_state(layer, django_user_model):
    """Bridge A heard the device's telemetry, bridge B its Last Will: A holds its commands too,
    and sends them when it hears the device come back."""
    app = TopicRouter(mqtt_routes)
    bridge_a = MqttCommunicator(app, topic="devices/d1/telemetry")
    bridge_b = MqttCommunicator(app, topic="devices/d1/telemetry")
    await bridge_a.connect()
    await bridge_b.connect()
    try:
        user = await database_sync_to_async(django_user_model.objects.create_user)(
            "ops", password=PASSWORD, is_staff=True
        )
        await bridge_a.send_message("devices/d1/telemetry", b'{"t": 20.5}')
        await bridge_b.send_message("devices/d1/status", b"offline", retain=True)
        await get_pipeline().flush()
        command = await commands.submit(user, "d1", {"name": "ping"})
        await published_next(layer, "held", bridge_a, bridge_b)  # held: the device is offline
        assert (await Command.objects.aget(pk=command.id)).status == "pending"
        assert (await Device.objects.aget(pk="d1")).online is False

        await bridge_a.send_message("devices/d1/status", b"online", retain=True)
        event = await bridge_a.receive_publish(timeout=5)
        assert orjson.loads(event["payload"])["id"] == str(command.id)
        await published_next(layer, "once", bridge_a, bridge_b)  # sent once
    finally:
        await bridge_a.retire()
        await bridge_b.retire()


@pytest.mark.django_db(transaction=True)
async def test_a_command_times_out_even_when_the_bridge_that_sent_it_is_gone(
    layer, dashboard, django_user_model
):
    """Submitted here (a web worker), claimed and sent by a bridge that then dies with its
    timers: this process's timer still ends it one ack timeout after it was sent."""
    user = await database_sync_to_async(django_user_model.objects.create_user)(
        "ops", password=PASSWORD, is_staff=True
    )
    await Device.objects.acreate(id="d1")
    command = await commands.submit(user, "d1", {"name": "ping", "timeout": 0.5})
    assert await database_sync_to_async(states.claim)(command.id) is not None  # the bridge
    async with asyncio.timeout(5):
        while True:
            events = (await layer.receive(dashboard))["events"]
            if any(e["id"] == str(command.id) and e["status"] == "timeout" for e in events):
                break
    assert (await Command.objects.aget(pk=command.id)).status == "timeout"


# --- the whole split: 2 bridges + 2 web workers + Redis + PostgreSQL + mosquitto -------------

DEVICES = [f"sx-{i}" for i in range(8)]
BEFORE_KILL = 25  # readings per device while both bridges run
AFTER_KILL = 10  # readings per device once one is killed
PARKED = 6  # readings per device while a bridge with a persistent session is down


class Dashboard:
    """A logged-in dashboard WebSocket on one web worker, recording what it is told."""

    def __init__(self, ws: Any, name: str) -> None:
        self.ws, self.name = ws, name
        self.snapshot: dict = {}
        self.telemetry: dict[str, list[float]] = {}
        self.commands: dict[str, list[dict]] = {}
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.snapshot = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        assert self.snapshot["type"] == "snapshot"
        self.task = asyncio.create_task(self._read(), name=f"dashboard[{self.name}]")

    async def _read(self) -> None:
        async for raw in self.ws:
            frame = json.loads(raw)
            if frame["type"] == "telemetry":
                self.telemetry.setdefault(frame["device"], []).append(frame["metrics"]["seq"])
            elif frame["type"] == "command":
                self.commands.setdefault(frame["id"], []).append(frame)
            self.changed.set()

    async def until(self, check: Callable[[], Any], what: str, wait: float = 15.0) -> Any:
        """Wait until `check()` is truthy, re-checked on each frame."""
        try:
            async with asyncio.timeout(wait):
                while not (result := check()):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{self.name}: timed out waiting for {what}") from None
        return result

    def status_of(self, command_id: str) -> str | None:
        frames = self.commands.get(command_id)
        return frames[-1]["status"] if frames else None


@contextlib.asynccontextmanager
async def running(*procs: GatewayProcess, meanwhile: Callable[[], Any] = lambda: None):
    """Migrate once, start every process (and run `meanwhile`) at the same time; stop them all
    (cleanly) after."""
    procs[0].manage("migrate", "--no-input", "-v", "0", timeout=120)
    try:
        starts = [asyncio.to_thread(p.start, False) for p in procs]
        await asyncio.gather(*starts, asyncio.to_thread(meanwhile))
        yield procs
    except BaseException:
        for p in procs:
            print(f"--- {p.command} {p.args} log tail ---\n{p.tail()}")
            p.kill()
        raise
    else:
        codes = await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        clean = [-signal.SIGTERM if p.command == "uvicorn" else 0 for p in procs]
        assert codes == clean, [p.tail() for p in procs]
    finally:
        for p in procs:
            p._cleanup()


def stored_readings(database_url: str) -> tuple[int, int]:
    """(rows, distinct (device, seq) pairs) of the `seq` metric in PostgreSQL."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, value)) FROM devices_reading"
            " WHERE metric = 'seq'"
        ).fetchone()


async def until_stored(database_url: str, count: int, wait: float = 20.0) -> tuple[int, int]:
    deadline = time.monotonic() + wait
    while True:
        rows = await asyncio.to_thread(stored_readings, database_url)
        if rows[0] >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


def marked_devices(database_url: str) -> set[str]:
    """The devices with a stored `mark` reading (the sentinels of `marked_by_the_survivor`)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT DISTINCT device_id FROM devices_reading WHERE metric = 'mark'")
        return {device for (device,) in rows}


async def marked_by_the_survivor(port: int, database_url: str) -> None:
    """A `mark` reading per device, again for those not stored yet, until each device has one
    stored: a bridge handles a device's messages in order, so all that a live bridge took of
    that device before its mark is stored by then (marks the broker parks in a dead bridge's
    session are not: another round goes out)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="pub-marks") as pub:
        for _ in range(30):
            missing = set(DEVICES) - await asyncio.to_thread(marked_devices, database_url)
            if not missing:
                return
            for device in sorted(missing):
                await pub.publish(f"devices/{device}/telemetry", json.dumps({"mark": 1}), qos=1)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and missing - (  # noqa: ASYNC110 - a database
                await asyncio.to_thread(marked_devices, database_url)
            ):
                await asyncio.sleep(0.05)
    raise AssertionError(f"no mark stored in 30 rounds for {sorted(missing)}")


async def publish_readings(port: int, first: int, count: int) -> None:
    """`count` numbered QoS 1 readings per device, interleaved across devices."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"pub-{first}") as pub:
        pub.pending_calls_threshold = 10_000
        # Concurrently (paho sends them in this order), each done at its PUBACK.
        await asyncio.gather(
            *(
                pub.publish(f"devices/{device}/telemetry", json.dumps({"seq": seq}), qos=1)
                for seq in range(first, first + count)
                for device in DEVICES
            )
        )


async def acking_device(
    port: int, device: str, received: list[dict], subscribed: asyncio.Event
) -> None:
    """A device that acks every command it gets (docs/interface.md §3)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"dev-{device}") as client:
        await client.subscribe(f"devices/{device}/commands", qos=1)
        subscribed.set()
        async for message in client.messages:
            command = json.loads(message.payload)
            received.append(command)
            ack = {"id": command["id"], "ok": True, "result": {"name": command["name"]}}
            await client.publish(f"devices/{device}/commands/ack", json.dumps(ack), qos=1)


@contextlib.contextmanager
def background(*coros: Any) -> Iterator[None]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()


@pytest.mark.e2e
@pytest.mark.postgres
async def test_two_bridges_and_two_web_workers_share_one_redis_and_postgresql(
    mosquitto, redis_server
):
    gateway_id = f"scaleout-{secrets.token_hex(3)}"
    common = {"GATEWAY_ID": gateway_id, "DJANGO_SECRET_KEY": secrets.token_urlsafe(40)}
    with postgres_database() as database_url:

        def process(command: str, *args: str, **env: str) -> GatewayProcess:
            return GatewayProcess(
                mosquitto.url,
                command=command,
                args=args,
                database_url=database_url,
                redis_url=redis_server.url,
                env={**common, **env},
                ready_log="MQTT bridge subscribed" if command == "runmqtt" else None,
            )

        bridges = [
            process("runmqtt", "--shared-group", "g", GATEWAY_LOG_LEVEL="DEBUG") for _ in range(2)
        ]
        webs = [process("uvicorn", "--no-access-log") for _ in range(2)]
        operator = functools.partial(webs[0].create_user, "operator", PASSWORD, staff=True)
        async with running(*bridges, *webs, meanwhile=operator):
            cookie = webs[0].login("operator", PASSWORD)  # one session, valid on both workers
            async with webs[0].ws_connect(cookie) as ws0, webs[1].ws_connect(cookie) as ws1:
                dashboards = [Dashboard(ws0, "web0"), Dashboard(ws1, "web1")]
                for dashboard in dashboards:
                    await dashboard.start()

                # Every message stored exactly once, whichever bridge took it.
                await publish_readings(mosquitto.port, 0, BEFORE_KILL)
                total = len(DEVICES) * BEFORE_KILL
                assert await until_stored(database_url, total) == (total, total)

                # Both bridges took a share: each logs the rejections it handled.
                async with aiomqtt.Client("127.0.0.1", mosquitto.port) as pub:
                    for _ in range(8):
                        await pub.publish("devices/probe/telemetry", b"not json", qos=1)
                for bridge in bridges:
                    bridge.wait_for_log(r"device probe: \S+ rejected")

                # Dashboards on either worker see every device's readings, up to the last.
                last = float(BEFORE_KILL - 1)
                for dashboard in dashboards:
                    await dashboard.until(
                        lambda d=dashboard: all(
                            last in d.telemetry.get(device, ()) for device in DEVICES
                        ),
                        f"every device's last reading on {dashboard.name}",
                    )

                # A command through either worker reaches its device and its ack both dashboards.
                got: dict[str, list[dict]] = {device: [] for device in DEVICES[:2]}
                ready = {device: asyncio.Event() for device in got}
                with background(
                    *(
                        acking_device(mosquitto.port, device, got[device], ready[device])
                        for device in got
                    )
                ):
                    async with asyncio.timeout(10):
                        for event in ready.values():
                            await event.wait()
                    status, body = await asyncio.to_thread(
                        webs[0].http_request,
                        "POST",
                        f"/api/devices/{DEVICES[0]}/commands",
                        cookie=cookie,
                        body={"name": "set_interval", "args": {"seconds": 5}},
                    )
                    assert status == 202, body
                    rest_id = body["id"]
                    await ws1.send(
                        json.dumps(
                            {"type": "command", "device": DEVICES[1], "name": "ping", "ref": "r1"}
                        )
                    )
                    ws_id = await dashboards[1].until(
                        lambda: next(
                            (i for i, f in dashboards[1].commands.items() if f[0].get("ref")),
                            None,
                        ),
                        "the pending frame of the WebSocket command",
                    )
                    for dashboard in dashboards:
                        for command_id in (rest_id, ws_id):
                            await dashboard.until(
                                lambda d=dashboard, c=command_id: d.status_of(c) == "acked",
                                f"command {command_id} acked on {dashboard.name}",
                            )
                    assert [c["id"] for c in got[DEVICES[0]]] == [rest_id]  # exactly once
                    assert [c["id"] for c in got[DEVICES[1]]] == [ws_id]

                    # One bridge killed: the other takes all the traffic.
                    bridges[0].kill()
                    killed = time.monotonic()
                    await publish_readings(mosquitto.port, BEFORE_KILL, AFTER_KILL)
                    published = time.monotonic() - killed
                    total += len(DEVICES) * AFTER_KILL
                    assert await until_stored(database_url, total) == (total, total)
                    takeover = time.monotonic() - killed
                    print(
                        f"\nafter SIGKILL of one bridge: {len(DEVICES) * AFTER_KILL} readings"
                        f" published in {published:.2f} s, all stored {takeover:.2f} s after"
                        " the kill"
                    )
                    # ... commands too.
                    status, body = await asyncio.to_thread(
                        webs[1].http_request,
                        "POST",
                        f"/api/devices/{DEVICES[0]}/commands",
                        cookie=cookie,
                        body={"name": "ping"},
                    )
                    assert status == 202, body
                    for dashboard in dashboards:
                        await dashboard.until(
                            lambda d=dashboard: d.status_of(body["id"]) == "acked",
                            f"the command after the kill acked on {dashboard.name}",
                        )

                # The device list on either worker: every device online, its newest value.
                for web in webs:
                    status, listed = await asyncio.to_thread(web.http_get, "/api/devices/", cookie)
                    assert status == 200
                    assert isinstance(listed, list), listed  # docs/interface.md §5.2
                    latest = {d["id"]: (d["online"], d["metrics"].get("seq")) for d in listed}
                    expected = (True, float(BEFORE_KILL + AFTER_KILL - 1))
                    assert {device: latest.get(device) for device in DEVICES} == dict.fromkeys(
                        DEVICES, expected
                    )

            # A bridge with a persistent session (--bridge-id) killed instead: the broker goes
            # on giving its session a share of the messages (mosquitto 2), parked there until
            # that bridge is back; then they are stored, each still once.
            def persistent() -> GatewayProcess:
                return process("runmqtt", "--shared-group", "g", "--bridge-id", "p")

            extra = [persistent()]
            try:
                await asyncio.to_thread(extra[0].start, False)
                extra[0].kill()
                before, total = total, total + len(DEVICES) * PARKED
                await publish_readings(mosquitto.port, BEFORE_KILL + AFTER_KILL, PARKED)
                await until_stored(database_url, before + len(DEVICES) * PARKED // 2)
                await marked_by_the_survivor(mosquitto.port, database_url)
                parked = total - (await asyncio.to_thread(stored_readings, database_url))[0]
                assert parked > 0, "the killed bridge's session got no share"
                extra.append(persistent())
                await asyncio.to_thread(extra[1].start, False)
                assert await until_stored(database_url, total) == (total, total)
                print(f"{parked} readings waited in the killed bridge's session until it returned")
            finally:
                for bridge in extra:
                    bridge.stop()
                    bridge._cleanup()
