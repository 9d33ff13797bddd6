"""Rejected messages become a device's problem end to end, in a split deployment: a real
mosquitto, two `runmqtt --shared-group` bridges and a `uvicorn` web tier sharing Redis and
PostgreSQL, a device publishing what the native convention rejects, and a logged-in fleet
view over a real WebSocket that lists it among the problems."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from typing import Any

import aiomqtt
import pytest

from tests.support.gateway import GatewayProcess, postgres_database, split_deployment
from tests.test_device_rejections import ESPHOME_STATE, TASMOTA_LWT
from tests.test_scaleout import running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PASSWORD = secrets.token_urlsafe(12)
BURST = 20


async def frame_where(ws: Any, check, wait: float = 20.0) -> dict:
    """The first frame for which `check(frame)` is true."""
    async with asyncio.timeout(wait):
        while True:
            frame = json.loads(await ws.recv())
            if check(frame):
                return frame


def devices_of(web: GatewayProcess, cookie: str) -> dict[str, dict]:
    status, body = web.http_get("/api/devices/", cookie)
    assert status == 200, body
    return {d["id"]: d for d in body}


async def test_garbage_from_a_known_device_makes_it_a_problem_in_the_fleet_view(
    mosquitto, redis_server
):
    common = {"GATEWAY_ID": f"rej-{secrets.token_hex(3)}"}
    with postgres_database() as database_url:
        process = split_deployment(mosquitto.url, database_url, redis_server.url, common)
        bridges = [process("runmqtt", "--shared-group", "g") for _ in range(2)]
        web = process("uvicorn", "--no-access-log")
        operator = functools.partial(web.create_user, "operator", PASSWORD, staff=True)
        async with running(*bridges, web, meanwhile=operator):
            cookie = await asyncio.to_thread(web.login, "operator", PASSWORD)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="rej-e2e") as mq:
                for device in ("valve-7", "ok-1", "ok-2"):
                    await mq.publish(f"devices/{device}/telemetry", b'{"open": 0}', qos=1)
                async with web.ws_connect(cookie, "/ws/dashboard/?view=1&limit=10") as ws:
                    # The three devices registered and online: no problem yet.
                    await frame_where(
                        ws, lambda f: (f.get("fleet") or {}).get("presence", {}).get("online") == 3
                    )
                    # A made-up id sends garbage first: refused a record, never a device row.
                    await mq.publish("devices/ghost-e2e/telemetry", TASMOTA_LWT, qos=1)
                    for _ in range(BURST):  # split between the two bridges
                        await mq.publish("devices/valve-7/telemetry/open", ESPHOME_STATE, qos=1)
                    # The record's frames come as each bridge's batch commits; the view's page
                    # at its next refresh.
                    seen: dict[str, Any] = {"rejected": 0, "page": None}

                    def both(frame: dict) -> bool:
                        if frame["type"] == "rejection" and frame["device"] == "valve-7":
                            seen["rejected"] = max(seen["rejected"], frame["rejected"])
                        if frame["type"] == "view" and frame["fleet"]["rejecting"] == 1:
                            seen["page"] = frame
                        return seen["rejected"] == BURST and seen["page"] is not None

                    await frame_where(ws, both)  # both bridges' batches add up in one record
                    page = seen["page"]
                    assert [d["id"] for d in page["devices"]] == ["valve-7", "ok-1", "ok-2"]
                    assert page["fleet"]["problems"] == 1
                    assert page["devices"][0]["last_rejection"] == {
                        "reason": "bad_value",
                        "detail": "expected a bare number, true or false",
                    }
            devices = await asyncio.to_thread(devices_of, web, cookie)
            assert devices["valve-7"]["rejected"] == BURST
            assert devices["valve-7"]["online"] is True  # rejected messages say nothing of that
            assert devices["ok-1"]["rejected"] == 0
            assert "ghost-e2e" not in devices
            for bridge in bridges:  # each bridge took a share of the burst
                assert "valve-7: devices/valve-7/telemetry/open rejected" in bridge.log_text()
