"""Commands end to end: a logged-in dashboard → the gateway → a real broker → simulated device
firmware (`firmware_sim`) → its ack → every dashboard.

The gateway runs in the test's event loop (the `gateway.asgi` application behind a real
`MqttServer` on a private mosquitto, the in-memory channel layer, the test database); the
dashboard is a `WebsocketCommunicator` carrying a real session. The restart case uses the
`GatewayProcess` harness (a real `rungateway` killed and started again on the same database).
Long on purpose: one test per end of the lifecycle (acked, failed, timeout, held, restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client

from devices.commands.timers import get_timers
from devices.models import Command, Device
from devices.telemetry.pipeline import current_pipeline
from firmware_sim.fleet import Fleet
from gateway.asgi import application
from gateway.mqtt.server import MqttServer
from tests.support.checks import nothing_came_before, rejected
from tests.support.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)

HOST = "gateway.test:8000"


# --- the gateway in this loop, a fleet, a dashboard -----------------------------------------


@pytest.fixture
async def gateway(mosquitto):
    """The MQTT bridge of `rungateway` (same application) on a private broker, in this loop."""
    layer = get_channel_layer()
    await layer.flush()
    gid = f"cmd-{secrets.token_hex(3)}"
    server = MqttServer(
        application,
        url=mosquitto.url,
        client_id=f"gateway-{gid}",
        status_topic=f"gateway/{gid}/status",
    )
    task = asyncio.create_task(server.serve(), name="test.mqtt-bridge")
    await server.wait_connected(10)
    yield server
    await server.shutdown(2.0)
    await asyncio.wait_for(task, 5)
    get_timers().cancel_all()
    pipeline = current_pipeline()
    if pipeline is not None:
        await pipeline.close()
    await layer.flush()


@pytest.fixture
async def fleet(mosquitto, gateway):
    """One simulated native device; waits until the gateway has registered it."""
    async with Fleet(mosquitto.url, devices=1, prefix=f"c{secrets.token_hex(3)}", seed=7) as f:
        async with asyncio.timeout(10):
            await f.wait_connected()
        await until(lambda: Device.objects.filter(pk=f[0].id).exists(), "device registered")
        yield f


def login(username: str, *, staff: bool = False, perm: bool = False) -> str:
    """A real session for a new user: the value of the session cookie a browser would carry."""
    user = User.objects.create_user(username, password=secrets.token_urlsafe(12), is_staff=staff)
    if perm:
        user.user_permissions.add(Permission.objects.get(codename="send_command"))
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def dashboard(username: str = "ops", **kwargs: Any) -> WebsocketCommunicator:
    """A connected `/ws/dashboard/` through gateway.asgi.application, past its snapshot."""
    cookie = await database_sync_to_async(login)(username, **kwargs)
    headers = [
        (b"host", HOST.encode()),
        (b"origin", f"http://{HOST}".encode()),
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()),
    ]
    comm = WebsocketCommunicator(application, "/ws/dashboard/", headers=headers)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    assert (await comm.receive_json_from(timeout=5))["type"] == "snapshot"
    return comm


async def until(check: Callable[[], Any], what: str, wait: float = 10.0) -> Any:
    """Poll a database check (run in the ORM thread) until it is truthy."""
    async with asyncio.timeout(wait):
        while not (result := await database_sync_to_async(check)()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return result


async def frame(ws: WebsocketCommunicator, match: Callable[[dict], bool], wait: float = 10.0):
    """The next frame `match` accepts (others are skipped)."""
    async with asyncio.timeout(wait):
        while True:
            got = await ws.receive_json_from(timeout=wait)
            if match(got):
                return got


def command_frame(status: str, command_id: str | None = None) -> Callable[[dict], bool]:
    return lambda f: (
        f.get("type") == "command"
        and f.get("status") == status
        and (command_id is None or f.get("id") == command_id)
    )


def error_frame(f: dict) -> bool:
    return f.get("type") == "error"


async def send_command(ws: WebsocketCommunicator, device: str, name: str, **extra: Any) -> dict:
    """Send a `command` frame; returns its `pending` frame (which echoes our ref)."""
    ref = extra.pop("ref", secrets.token_hex(4))
    await ws.send_json_to({"type": "command", "device": device, "name": name, "ref": ref, **extra})
    pending = await frame(ws, lambda f: command_frame("pending")(f) or error_frame(f))
    assert pending["type"] == "command", pending
    assert pending["ref"] == ref and pending["device"] == device and pending["name"] == name
    return pending


async def stored(command_id: str) -> Command:
    return await Command.objects.aget(pk=command_id)


async def held(caplog: pytest.LogCaptureFixture, command_id: str) -> None:
    """Sentinel: the device's consumer has decided on `command_id` and held it (it logs
    ``command <id> held`` whether it saw the device offline or the broker down, or the
    transport refused it); call `caplog.set_level(logging.DEBUG)` first."""
    needle = f"command {command_id} held"
    await eventually(
        lambda: any(needle in record.getMessage() for record in caplog.records),
        what=f"{needle} logged",
    )


# --- the lifecycle --------------------------------------------------------------------------


async def test_acked_with_result_reaches_every_dashboard(fleet):
    device = fleet[0]
    ws, other = await dashboard("ops", staff=True), await dashboard("watcher")
    args = {"seconds": 2}
    pending = await send_command(ws, device.id, "set_interval", args=args)
    sent = await frame(ws, command_frame("sent", pending["id"]))
    acked = await frame(ws, command_frame("acked", pending["id"]))
    assert acked["result"] == {"seconds": 2.0} and "ref" not in sent
    # The other dashboard (no permission needed to watch) saw the same changes.
    for status in ("pending", "sent", "acked"):
        await frame(other, command_frame(status, pending["id"]))
    row = await stored(pending["id"])
    assert (row.status, row.result, row.args) == ("acked", {"seconds": 2.0}, args)
    assert row.created_at <= row.sent_at <= row.finished_at
    assert device.interval == 2.0 and device.commands == 1
    await ws.disconnect()
    await other.disconnect()


async def test_commands_in_a_row_each_go_pending_sent_acked_once(fleet):
    """Twenty commands one after another: each goes pending → sent → acked with the device's
    own answer, none is held or repeated. Its latency is the bench's `command round trip` row."""
    device = fleet[0]
    ws = await dashboard("ops", staff=True)
    ids = []
    for _ in range(20):
        pending = await send_command(ws, device.id, "status")
        ids.append(pending["id"])
        statuses = []
        while not statuses or statuses[-1]["status"] not in ("acked", "failed", "timeout"):
            got = await frame(ws, lambda f: f.get("type") == "command" and f["id"] == ids[-1])
            statuses.append(got)
        assert [f["status"] for f in statuses] == ["sent", "acked"]
        result = statuses[-1]["result"]
        assert result["relay"] == device.relay and result["interval"] == device.interval
    assert len(set(ids)) == 20
    assert device.commands == 20, "each delivered exactly once"
    assert [c.status async for c in Command.objects.filter(pk__in=ids)] == ["acked"] * 20
    await ws.disconnect()


async def test_failed_passes_the_device_error_through(fleet):
    ws = await dashboard("ops", staff=True)
    pending = await send_command(ws, fleet[0].id, "self_destruct")
    failed = await frame(ws, command_frame("failed", pending["id"]))
    assert failed["error"] == "unknown command: 'self_destruct'"
    assert (await stored(pending["id"])).error == "unknown command: 'self_destruct'"
    await ws.disconnect()


async def test_no_ack_times_out_at_the_per_command_timeout(fleet):
    fleet[0].set_noack(True)
    ws = await dashboard("ops", staff=True)
    pending = await send_command(ws, fleet[0].id, "relay", args={"state": True}, timeout=0.5)
    await frame(ws, command_frame("sent", pending["id"]))
    timed_out = await frame(ws, command_frame("timeout", pending["id"]))
    assert timed_out["error"] == "no acknowledgement from the device within 0.5 s"
    assert fleet[0].relay is True, "the device did get it; only the ack is missing"
    await ws.disconnect()


async def test_unknown_and_late_acks_are_counted_and_ignored(fleet, mosquitto):
    device = fleet[0]
    ws = await dashboard("ops", staff=True)
    pending = await send_command(ws, device.id, "status")
    await frame(ws, command_frame("acked", pending["id"]))
    before = rejected("unknown_command")
    topic = f"devices/{device.id}/commands/ack"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="c-forger") as forger:
        await forger.publish(topic, json.dumps({"id": str(uuid.uuid4()), "ok": True}), qos=1)
        late = {"id": pending["id"], "ok": False, "error": "too late"}
        await forger.publish(topic, json.dumps(late), qos=1)
    async with asyncio.timeout(10):
        while rejected("unknown_command") - before < 2:  # noqa: ASYNC110 - a counter, no event
            await asyncio.sleep(0.02)
    assert (await stored(pending["id"])).status == "acked"
    # No frame for either forgery: the next command frame is a new command's.
    sentinel_ref = secrets.token_hex(4)
    await ws.send_json_to(
        {"type": "command", "device": device.id, "name": "status", "ref": sentinel_ref}
    )
    following = await frame(ws, lambda f: f.get("type") in ("command", "error"))
    assert (following["status"], following.get("ref")) == ("pending", sentinel_ref), following
    await ws.disconnect()


async def test_offline_device_holds_the_command_then_gets_it_once(fleet, settings, caplog):
    caplog.set_level(logging.DEBUG, logger="devices")
    device = fleet[0]
    ws = await dashboard("ops", staff=True)
    device.drop()  # vanishes; the broker publishes its Last Will (offline)
    await frame(ws, lambda f: f.get("type") == "status" and f.get("online") is False)
    pending = await send_command(ws, device.id, "set_interval", args={"seconds": 3})
    await held(caplog, pending["id"])
    assert (await stored(pending["id"])).status == "pending"
    assert device.commands == 0

    device.restore()  # reconnects and announces online: the held command goes out
    following = await frame(ws, lambda f: f.get("type") == "command")
    assert (following["status"], following["id"]) == ("sent", pending["id"]), following
    acked = await frame(ws, command_frame("acked", pending["id"]))
    assert acked["result"] == {"seconds": 3.0}
    assert device.commands == 1, "delivered exactly once"
    await ws.disconnect()


async def test_held_while_the_broker_is_down_then_sent_once(fleet, mosquitto, gateway, caplog):
    caplog.set_level(logging.DEBUG, logger="devices")
    device = fleet[0]
    ws = await dashboard("ops", staff=True)
    mosquitto.stop()
    async with asyncio.timeout(10):
        while gateway.connected:  # noqa: ASYNC110 - the server's state, no event to await
            await asyncio.sleep(0.02)
    pending = await send_command(ws, device.id, "relay", args={"state": True})
    await held(caplog, pending["id"])
    assert (await stored(pending["id"])).status == "pending"

    mosquitto.start()
    following = await frame(ws, lambda f: f.get("type") == "command", wait=30)
    assert (following["status"], following["id"]) == ("sent", pending["id"]), following
    await frame(ws, command_frame("acked", pending["id"]), wait=10)
    assert device.commands == 1 and device.relay is True
    await ws.disconnect()


async def test_hold_ttl_ends_in_timeout_with_a_reason(fleet, settings):
    settings.GATEWAY = {**settings.GATEWAY, "COMMAND_HOLD_SECONDS": 0.5}
    device = fleet[0]
    ws = await dashboard("ops", staff=True)
    device.drop()
    await frame(ws, lambda f: f.get("type") == "status" and f.get("online") is False)
    pending = await send_command(ws, device.id, "status")
    timed_out = await frame(ws, command_frame("timeout", pending["id"]))
    assert timed_out["error"].startswith("not delivered: the device stayed offline")
    device.restore()
    await until(lambda: Device.objects.get(pk=device.id).online, "device back online")
    # Held commands go out when the device is back; one sent after it arrives after them.
    sentinel = await send_command(ws, device.id, "status")
    await frame(ws, command_frame("acked", sentinel["id"]))
    assert device.commands == 1, "an expired command is never sent"
    await ws.disconnect()


# --- refusals (no broker needed) ------------------------------------------------------------


@pytest.fixture
async def device_d1():
    """Device d1 and what its consumer would receive on group ``device.d1``."""
    layer = get_channel_layer()
    await layer.flush()
    await database_sync_to_async(Device.objects.create)(id="d1")
    channel = await layer.new_channel()
    await layer.group_add("device.d1", channel)
    yield channel
    get_timers().cancel_all()
    await layer.flush()


async def test_permission_refused_on_the_websocket(device_d1):
    ws = await dashboard("viewer")
    await ws.send_json_to({"type": "command", "device": "d1", "name": "reboot", "ref": 7})
    error = await frame(ws, error_frame)
    assert error == {
        "type": "error",
        "code": "forbidden",
        "message": "you may not send commands",
        "ref": 7,
    }
    await nothing_came_before(get_channel_layer(), device_d1)
    assert await Command.objects.acount() == 0
    await ws.disconnect()


async def test_permission_granted_to_a_non_staff_user(device_d1):
    ws = await dashboard("operator", perm=True)
    pending = await send_command(ws, "d1", "ping")
    async with asyncio.timeout(5):
        message = await get_channel_layer().receive(device_d1)
    assert message == {"type": "device.command", "id": pending["id"]}
    await ws.disconnect()


async def test_rate_limit_and_bad_requests_on_the_websocket(device_d1, settings):
    settings.GATEWAY = {**settings.GATEWAY, "COMMAND_RATE_COUNT": 2, "COMMAND_RATE_SECONDS": 60}
    ws = await dashboard("ops", staff=True)
    await send_command(ws, "d1", "a")
    await send_command(ws, "d1", "b")
    await ws.send_json_to({"type": "command", "device": "d1", "name": "c", "ref": "r3"})
    error = await frame(ws, error_frame)
    assert (error["code"], error["ref"]) == ("rate_limited", "r3")
    assert "at most 2 commands per 60 s" in error["message"]

    cases = [
        ({"type": "command", "device": "ghost", "name": "x"}, "unknown_device"),
        ({"type": "command", "name": "x"}, "bad_request"),
        ({"type": "command", "device": "d1", "name": "no spaces"}, "bad_request"),
        ({"type": "command", "device": "d1", "name": "x", "args": [1]}, "bad_request"),
    ]
    settings.GATEWAY = {**settings.GATEWAY, "COMMAND_RATE_COUNT": 100}
    for content, code in cases:
        await ws.send_json_to({**content, "ref": code})
        error = await frame(ws, error_frame)
        assert (error["code"], error["ref"]) == (code, code), error
    assert await Command.objects.acount() == 2
    await ws.disconnect()


# --- a gateway restart with open commands ---------------------------------------------------


async def poll_api(gw: Any, path: str, cookie: str, check: Callable[[Any], bool], what: str):
    """GET `path` on the gateway process until `check(body)` holds."""
    async with asyncio.timeout(20):
        while True:
            status, body = await asyncio.to_thread(gw.http_get, path, cookie)
            if status == 200 and check(body):
                return body
            await asyncio.sleep(0.1)


def device_online(device_id: str, online: bool) -> Callable[[Any], bool]:
    def check(body: Any) -> bool:
        assert isinstance(body, list), body  # docs/interface.md §5.2
        return any(d["id"] == device_id and d["online"] is online for d in body)

    return check


@pytest.mark.e2e
async def test_restart_times_out_overdue_sent_and_delivers_pending_when_device_returns(
    mosquitto,
):
    from tests.support.gateway import GatewayProcess

    password = secrets.token_urlsafe(12)
    gw = GatewayProcess(mosquitto.url)
    await asyncio.to_thread(gw.start)
    try:
        await asyncio.to_thread(gw.create_user, "ops", password, staff=True)
        cookie = await asyncio.to_thread(gw.login, "ops", password)
        async with Fleet(mosquitto.url, devices=1, prefix=f"r{secrets.token_hex(3)}") as fleet:
            device = fleet[0]
            await poll_api(gw, "/api/devices/", cookie, device_online(device.id, True), "online")

            async def post(body: dict) -> str:
                path = f"/api/devices/{device.id}/commands"
                status, answer = await asyncio.to_thread(
                    gw.http_request, "POST", path, cookie=cookie, body=body
                )
                assert status == 202, answer
                return answer["url"]

            # One command sent but never acknowledged (2 s timeout) …
            device.set_noack(True)
            unacked = await post({"name": "relay", "args": {"state": True}, "timeout": 2})
            await poll_api(gw, unacked, cookie, lambda c: c["status"] == "sent", "sent")
            async with asyncio.timeout(10):
                while device.commands < 1:  # noqa: ASYNC110 - the firmware's counter
                    await asyncio.sleep(0.02)
            # … one held for the device, which has gone away.
            device.drop()
            await poll_api(gw, "/api/devices/", cookie, device_online(device.id, False), "off")
            held = await post({"name": "set_interval", "args": {"seconds": 4}})
            assert (await asyncio.to_thread(gw.http_get, held, cookie))[1]["status"] == "pending"

            gw.kill()  # no shutdown at all
            await asyncio.sleep(2.5)  # the sent one is overdue now
            await asyncio.to_thread(gw.start)

            late = await poll_api(gw, unacked, cookie, lambda c: c["status"] != "sent", "ended")
            assert late["status"] == "timeout", late
            assert late["error"] == "no acknowledgement from the device within 2 s"
            assert (await asyncio.to_thread(gw.http_get, held, cookie))[1]["status"] == "pending"

            device.restore()  # back online: the held command goes out once, and is acked
            done = await poll_api(gw, held, cookie, lambda c: c["status"] == "acked", "acked")
            assert done["result"] == {"seconds": 4.0} and done["created_by"] == "ops"
            assert device.commands == 2, "each command reached the device exactly once"
    finally:
        await asyncio.to_thread(gw.stop)
        gw._cleanup()
