"""DashboardConsumer through the real auth stack, sessions, database and channel layer."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from prometheus_client import REGISTRY

from dashboard.consumers import CLOSE_SLOW_CLIENT
from devices.models import Device
from tests.support.dashboard_ws import connect, session_of, websocket_app, ws_headers
from tests.support.web import run_server

pytestmark = pytest.mark.django_db(transaction=True)


def gauge(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
def session_cookie(django_user_model) -> str:
    """A real session of a logged-in user, as the browser's cookie carries it."""
    user = django_user_model.objects.create_user("alice", password="correct horse battery")
    return session_of(user)


async def test_anonymous_handshake_is_refused(layer):
    before = gauge("gateway_ws_clients")
    comm = WebsocketCommunicator(websocket_app(), "/ws/dashboard/", headers=ws_headers(None))
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    assert gauge("gateway_ws_clients") == before
    await comm.disconnect()


async def test_invalid_session_cookie_is_refused(layer):
    comm = WebsocketCommunicator(websocket_app(), "/ws/dashboard/", headers=ws_headers("nope"))
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    await comm.disconnect()


@pytest.mark.parametrize(
    "origin", ["http://evil.test", "http://gateway.test:8001", "http://gateway.test", "null", None]
)
async def test_cross_origin_is_refused_even_with_a_session(layer, session_cookie, origin):
    comm = WebsocketCommunicator(
        websocket_app(), "/ws/dashboard/", headers=ws_headers(session_cookie, origin=origin)
    )
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    await comm.disconnect()


async def test_snapshot_comes_first_with_stored_devices(layer, session_cookie):
    await sync_to_async(Device.objects.create)(
        id="b-2", name="Boiler", transport="serial", metrics={"temperature": 61.5}
    )
    await sync_to_async(Device.objects.create)(id="a-1", online=True, metrics={"hum": 40})
    stored = await sync_to_async(list)(Device.objects.order_by("id"))
    conventions = ["native", "serial"]
    expected = [{**d.as_dict(), "convention": c} for d, c in zip(stored, conventions, strict=True)]

    comm = await connect(session_cookie)
    snapshot = await comm.receive_json_from(timeout=5)
    assert snapshot == {"type": "snapshot", "devices": expected}
    assert [d["id"] for d in snapshot["devices"]] == ["a-1", "b-2"]
    assert snapshot["devices"][0]["name"] == "a-1"  # unnamed devices show their id
    await comm.disconnect()


async def sentinel_is_next(layer, comm) -> None:
    """A frame sent to the group now is the next one the client gets: nothing else is left."""
    sentinel = {"type": "status", "device": "sentinel", "online": True, "ts": 9.0}
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": [sentinel]})
    assert await comm.receive_json_from(timeout=5) == sentinel


async def test_group_events_arrive_as_individual_frames_in_order(layer, session_cookie):
    comm = await connect(session_cookie)
    assert (await comm.receive_json_from(timeout=5))["type"] == "snapshot"
    frames = [
        {"type": "telemetry", "device": "a-1", "ts": 1764214000.5, "metrics": {"t": 21.5}},
        {"type": "status", "device": "b-2", "online": False, "ts": 1764214001.0},
        {"type": "telemetry", "device": "b-2", "ts": 1764214002.0, "metrics": {"ok": True}},
        {"type": "command", "id": "c1", "device": "a-1", "name": "reboot", "status": "sent"},
    ]
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": frames[:2]})
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": frames[2:]})
    received = [await comm.receive_json_from(timeout=5) for _ in frames]
    assert received == frames
    await sentinel_is_next(layer, comm)
    await comm.disconnect()


async def test_every_client_gets_every_frame(layer, session_cookie):
    clients = [await connect(session_cookie) for _ in range(3)]
    for comm in clients:
        assert (await comm.receive_json_from(timeout=5))["type"] == "snapshot"
    frame = {"type": "status", "device": "x", "online": True, "ts": 1.0}
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": [frame]})
    for comm in clients:
        assert await comm.receive_json_from(timeout=5) == frame
        await comm.disconnect()


async def test_frames_are_strict_json(layer, session_cookie):
    comm = await connect(session_cookie)
    await comm.receive_json_from(timeout=5)
    frame = {"type": "telemetry", "device": "n", "ts": 2.0, "metrics": {"x": float("nan")}}
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": [frame]})
    text = await comm.receive_from(timeout=5)
    assert "NaN" not in text
    assert json.loads(text)["metrics"] == {"x": None}
    await comm.disconnect()


async def test_telemetry_waiting_for_the_socket_is_merged_per_device(layer, session_cookie):
    comm = await connect(session_cookie)
    await comm.receive_json_from(timeout=5)
    # One batch is buffered before the writer runs, so same-device telemetry merges, but
    # never past a later frame of that device (the status), which would reorder them.
    batch = [
        {"type": "telemetry", "device": "a", "ts": 1.0, "metrics": {"t": 1.0, "h": 10.0}},
        {"type": "telemetry", "device": "b", "ts": 1.5, "metrics": {"t": 5.0}},
        {"type": "telemetry", "device": "a", "ts": 2.0, "metrics": {"t": 2.0}},
        {"type": "status", "device": "b", "online": False, "ts": 2.5},
        {"type": "telemetry", "device": "b", "ts": 3.0, "metrics": {"t": 6.0}},
    ]
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": batch})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "telemetry",
        "device": "a",
        "ts": 2.0,
        "metrics": {"t": 2.0, "h": 10.0},
    }
    assert await comm.receive_json_from(timeout=5) == batch[1]
    assert await comm.receive_json_from(timeout=5) == batch[3]
    assert await comm.receive_json_from(timeout=5) == batch[4]
    await sentinel_is_next(layer, comm)
    await comm.disconnect()


@pytest.mark.parametrize(
    ("sent", "code", "ref"),
    [
        ("not json", "bad_request", None),
        ("[1, 2]", "bad_request", None),
        ('{"no": "type"}', "bad_request", None),
        ('{"type": "subscribe", "ref": "r1"}', "bad_request", "r1"),
        (
            '{"type": "command", "device": "a", "name": "x", "args": {}, "ref": "r2"}',
            "forbidden",  # alice may watch, not command (tests/test_command_lifecycle.py)
            "r2",
        ),
        ('{"type": "command", "device": "a", "name": "x", "ref": 7}', "forbidden", 7),
        ('{"type": "command", "ref": {"nested": 1}}', "bad_request", None),
    ],
)
async def test_bad_client_frames_get_an_error_and_the_socket_stays_open(
    layer, session_cookie, sent, code, ref
):
    comm = await connect(session_cookie)
    await comm.receive_json_from(timeout=5)
    await comm.send_to(text_data=sent)
    error = await comm.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert error.get("ref") == ref
    assert ("ref" in error) == (ref is not None)
    # Still open and still fed.
    frame = {"type": "status", "device": "a", "online": True, "ts": 1.0}
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": [frame]})
    assert await comm.receive_json_from(timeout=5) == frame
    await comm.disconnect()


async def test_binary_and_oversized_frames_get_errors(layer, session_cookie):
    comm = await connect(session_cookie)
    await comm.receive_json_from(timeout=5)
    await comm.send_to(bytes_data=b"\x00\x01")
    assert (await comm.receive_json_from(timeout=5))["code"] == "bad_request"
    await comm.send_to(text_data='{"type": "command", "pad": "' + "x" * 70_000 + '"}')
    assert (await comm.receive_json_from(timeout=5))["code"] == "bad_request"
    await comm.send_to(text_data='{"type": "command"}')
    assert (await comm.receive_json_from(timeout=5))["code"] == "bad_request"  # no device
    await comm.disconnect()


async def test_ws_clients_gauge_counts_each_connection_once(layer, session_cookie):
    before = gauge("gateway_ws_clients")
    first = await connect(session_cookie)
    second = await connect(session_cookie)
    await first.receive_json_from(timeout=5)
    await second.receive_json_from(timeout=5)
    assert gauge("gateway_ws_clients") == before + 2
    await first.disconnect()
    assert gauge("gateway_ws_clients") == before + 1
    await second.disconnect()
    assert gauge("gateway_ws_clients") == before


async def test_disconnected_client_leaves_the_group(layer, session_cookie):
    comm = await connect(session_cookie)
    await comm.receive_json_from(timeout=5)
    assert len(layer.groups.get("dashboard", {})) == 1
    await comm.disconnect()
    assert not layer.groups.get("dashboard")


class StalledSocket:
    """An ASGI server whose client stopped reading: `websocket.send` waits until resumed.

    uvicorn behaves this way once its transport buffer passes the high-water mark.
    """

    def __init__(self, app, stall_close: bool = False) -> None:
        self.app = app
        self.draining = asyncio.Event()
        self.draining.set()
        self.stall_close = stall_close

    async def __call__(self, scope, receive, send):
        async def slow_send(message):
            if message["type"] == "websocket.send" or self.stall_close:
                await self.draining.wait()
            await send(message)

        await self.app(scope, receive, slow_send)


async def test_a_slow_client_is_closed_and_counted_without_slowing_others(layer, session_cookie):
    dropped_before = gauge("gateway_ws_frames_dropped_total")
    clients_before = gauge("gateway_ws_clients")
    stalled = StalledSocket(websocket_app(buffer_limit=5, close_timeout=5))
    slow = await connect(session_cookie, app=stalled)
    fast = await connect(session_cookie)
    assert (await slow.receive_json_from(timeout=5))["type"] == "snapshot"
    assert (await fast.receive_json_from(timeout=5))["type"] == "snapshot"

    stalled.draining.clear()  # the slow client stops reading
    frames = [{"type": "status", "device": f"d{i}", "online": True, "ts": i} for i in range(10)]
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": frames})

    # The fast client gets everything, in order, while the slow one is stuck.
    assert [await fast.receive_json_from(timeout=5) for _ in frames] == frames
    # The slow one overflowed its 5-frame buffer: all 10 frames dropped, closed with 4008.
    closing = await slow.receive_output(timeout=5)
    assert closing == {"type": "websocket.close", "code": CLOSE_SLOW_CLIENT, "reason": "too slow"}
    assert gauge("gateway_ws_frames_dropped_total") == dropped_before + 10
    assert len(layer.groups.get("dashboard", {})) == 1  # only the fast client is fed now

    await layer.group_send("dashboard", {"type": "dashboard.events", "events": frames[:1]})
    assert await fast.receive_json_from(timeout=5) == frames[0]
    await slow.disconnect()
    assert gauge("gateway_ws_clients") == clients_before + 1
    await fast.disconnect()
    assert gauge("gateway_ws_clients") == clients_before


async def test_a_slow_client_whose_close_hangs_is_abandoned(layer, session_cookie):
    clients_before = gauge("gateway_ws_clients")
    stalled = StalledSocket(websocket_app(buffer_limit=2, close_timeout=0.2), stall_close=True)
    slow = await connect(session_cookie, app=stalled)
    assert (await slow.receive_json_from(timeout=5))["type"] == "snapshot"
    stalled.draining.clear()
    frames = [{"type": "status", "device": "d", "online": True, "ts": i} for i in range(3)]
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": frames})
    # The consumer gives up on the close and returns; the server then drops the socket.
    await slow.wait(timeout=5)
    assert gauge("gateway_ws_clients") == clients_before
    assert not layer.groups.get("dashboard")


# --- a real server: uvicorn's socket backpressure drives the slow-client policy ------------


def _client_kwargs(port: int, cookie: str) -> dict:
    return {
        "origin": f"http://127.0.0.1:{port}",
        "additional_headers": {"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"},
        "open_timeout": 5,
        # permessage-deflate would squeeze these repetitive frames to a few bytes each.
        "compression": None,
    }


async def test_slow_socket_on_a_real_server_is_closed_4008_and_resyncs(layer, session_cookie):
    """A client that stops reading fills the TCP buffers; its buffer overflows, others don't."""
    dropped_before = gauge("gateway_ws_frames_dropped_total")
    clients_before = gauge("gateway_ws_clients")
    async with run_server(websocket_app(buffer_limit=50, close_timeout=10)) as port:
        uri = f"ws://127.0.0.1:{port}/ws/dashboard/"
        # A small receive buffer so the kernel stops absorbing frames early.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        slow = await websockets.connect(
            uri, sock=sock, max_queue=1, **_client_kwargs(port, session_cookie)
        )
        fast = await websockets.connect(uri, **_client_kwargs(port, session_cookie))
        assert json.loads(await fast.recv())["type"] == "snapshot"

        padding = {f"metric_{i:03d}": i + 0.5 for i in range(60)}  # ~1.5 kB per frame
        sent: list[dict] = []
        async with asyncio.timeout(60):
            while gauge("gateway_ws_frames_dropped_total") == dropped_before:
                batch = [
                    {
                        "type": "telemetry",
                        "device": f"d{len(sent) + i}",
                        "ts": 1.0,
                        "metrics": padding,
                    }
                    for i in range(50)
                ]
                sent.extend(batch)
                await layer.group_send("dashboard", {"type": "dashboard.events", "events": batch})
                for frame in batch:  # the fast client keeps up with every frame, in order
                    assert json.loads(await fast.recv()) == frame
        dropped = gauge("gateway_ws_frames_dropped_total") - dropped_before
        print(
            f"slow client overflowed after {len(sent)} frames "
            f"(~{len(sent) * 1.5:.0f} kB); {dropped:.0f} dropped"
        )
        assert 50 < dropped <= len(sent)

        # The slow client reads again: a prefix of the frames in order, then close 4008.
        received = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(30):
                while True:
                    received.append(json.loads(await slow.recv()))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_SLOW_CLIENT
        assert received[0]["type"] == "snapshot"
        assert received[1:] == sent[: len(received) - 1]
        assert len(received) - 1 + dropped == len(sent)  # every frame delivered or counted

        # It reconnects and resyncs from a snapshot; the fast client was never disturbed.
        again = await websockets.connect(uri, **_client_kwargs(port, session_cookie))
        assert json.loads(await again.recv())["type"] == "snapshot"
        await again.close()
        await fast.close()
    # uvicorn's shutdown waited for every application instance to finish.
    assert gauge("gateway_ws_clients") == clients_before


async def test_the_gateway_application_serves_the_dashboard(layer, session_cookie):
    """The same checks through gateway.asgi.application, as servers load it."""
    from gateway.asgi import application

    anonymous = WebsocketCommunicator(application, "/ws/dashboard/", headers=ws_headers(None))
    assert not (await anonymous.connect(timeout=5))[0]
    await anonymous.disconnect()
    foreign = WebsocketCommunicator(
        application, "/ws/dashboard/", headers=ws_headers(session_cookie, origin="http://x.test")
    )
    assert not (await foreign.connect(timeout=5))[0]
    await foreign.disconnect()
    comm = await connect(session_cookie, app=application)
    assert (await comm.receive_json_from(timeout=5))["type"] == "snapshot"
    await comm.disconnect()
