"""`batch` frames (docs/interface.md §6.1, §6.2): a client that opens `/ws/dashboard/?batch=1`,
as the browser does, gets a loop turn's `telemetry` and `status` frames of many devices in one
WebSocket message; every other client keeps getting one frame per device, as before."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime

import orjson
import pytest
from asgiref.sync import sync_to_async

from devices.models import Device
from tests.support.dashboard_ws import connect, session_of
from tests.support.gateway import GatewayProcess
from tests.support.hostile import publish_all

PASSWORD = secrets.token_urlsafe(12)


class Client:
    """A real WebSocket client of the gateway: every message as received, and each device's
    last `n` from the §6.2 frames in them (inside `batch` frames or alone)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self.last_n: dict[str, float] = {}

    async def read_until(self, targets: dict[str, float]) -> None:
        while any(self.last_n.get(d, -1) < n for d, n in targets.items()):
            message = orjson.loads(await asyncio.wait_for(self.ws.recv(), 20))
            self.messages.append(message)
            for frame in message["frames"] if message["type"] == "batch" else [message]:
                if frame["type"] == "telemetry" and "n" in frame["metrics"]:
                    self.last_n[frame["device"]] = frame["metrics"]["n"]


@pytest.mark.e2e
async def test_a_batch_client_gets_many_devices_per_message_and_loses_nothing(mosquitto):
    """300 devices, 3 readings each, in one burst: the batch client gets every device's last
    reading in far fewer WebSocket messages than readings, several devices in one message; a
    client that did not ask gets the per-device frames of §6.2, never a `batch` frame."""
    devices = [f"fleet-{i:03d}" for i in range(300)]
    messages = [
        (f"devices/{device}/telemetry", orjson.dumps({"n": n, "t": 20.5}))
        for n in (1, 2, 3)
        for device in devices
    ]
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        async with (
            gw.ws_connect(cookie, "/ws/dashboard/?batch=1", max_size=None) as batched_ws,
            gw.ws_connect(cookie, max_size=None) as plain_ws,
        ):
            batched, plain = Client(batched_ws), Client(plain_ws)
            for client in (batched, plain):
                assert orjson.loads(await client.ws.recv())["type"] == "snapshot"
            await publish_all(mosquitto.port, "fleet", messages)
            targets = dict.fromkeys(devices, 3)
            await asyncio.gather(batched.read_until(targets), plain.read_until(targets))

    assert batched.last_n == plain.last_n == targets, "every device's last reading, both"
    batches = [m for m in batched.messages if m["type"] == "batch"]
    assert batches, "a loop turn's readings of several devices shared a message"
    assert any(len({f["device"] for f in m["frames"]}) > 1 for m in batches)
    for message in batches:
        assert {f["type"] for f in message["frames"]} <= {"telemetry", "status"}
    assert len(batched.messages) < len(messages) / 2, "far fewer messages than readings"
    assert {m["type"] for m in plain.messages} <= {"telemetry", "status"}, "no batch frames"


@pytest.mark.django_db(transaction=True)
async def test_a_batch_keeps_the_order_and_the_views_filter(layer, django_user_model):
    """Frames of devices off the page are left out of a batch as they are of single frames;
    a frame that is not telemetry or status goes alone, between the batches, in order."""
    now = datetime.now(UTC)
    await sync_to_async(Device.objects.bulk_create)(
        Device(id=f"d-{i:04d}", online=True, last_seen=now) for i in range(30)
    )
    user = await sync_to_async(django_user_model.objects.create_user)("vera", password="pw-12345")
    cookie = await sync_to_async(session_of)(user)
    comm = await connect(cookie, query="sort=id&limit=10&batch=1")
    assert (await comm.receive_json_from(timeout=5))["type"] == "snapshot"

    def telemetry(device: str, t: int) -> dict:
        return {"type": "telemetry", "device": device, "ts": 1.0, "metrics": {"t": t}}

    status = {"type": "status", "device": "d-0002", "online": False, "ts": 1.0}
    command = {"type": "command", "id": "c1", "device": "d-0025", "name": "x", "status": "sent"}
    hidden = telemetry("d-0025", 9)
    events = [telemetry("d-0001", 1), hidden, status, command, telemetry("d-0003", 3), hidden]
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": events})

    assert await comm.receive_json_from(timeout=5) == {
        "type": "batch",
        "frames": [telemetry("d-0001", 1), status],
    }
    assert await comm.receive_json_from(timeout=5) == command
    assert await comm.receive_json_from(timeout=5) == telemetry("d-0003", 3), "one goes alone"
    # Sentinel: a later frame arrives next, so nothing of the hidden device came in between.
    await layer.group_send(
        "dashboard", {"type": "dashboard.events", "events": [telemetry("d-0004", 4)]}
    )
    assert await comm.receive_json_from(timeout=5) == telemetry("d-0004", 4)
    await comm.disconnect()
