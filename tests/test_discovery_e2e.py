"""Self-describing devices end to end: the simulator's ESPHome node and Zigbee2MQTT bridge
(firmware_sim/selfdescribing.py, real-format discovery, state and availability) on a real
mosquitto, the real `rungateway` process, a logged-in dashboard WebSocket and the REST API.

The formats are ESPHome's (esphome/components/mqtt/mqtt_component.cpp) and Zigbee2MQTT's
(Koenkk/zigbee2mqtt.io docs/guide/usage/mqtt_topics_and_messages.md); see the simulator.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

import aiomqtt
import pytest

from firmware_sim.fleet import Fleet
from firmware_sim.selfdescribing import fake_mac
from tests.support.gateway import GatewayProcess
from tests.support.waiting import until

pytestmark = pytest.mark.e2e

PASSWORD = secrets.token_urlsafe(12)


async def command_frames(ws: Any, command_id: str, wait: float = 15.0) -> list[str]:
    """The statuses of one command's frames, until it ends."""
    seen: list[str] = []
    async with asyncio.timeout(wait):
        while not seen or seen[-1] not in ("acked", "failed", "timeout"):
            frame = json.loads(await ws.recv())
            if frame.get("type") == "command" and frame.get("id") == command_id:
                seen.append(frame["status"])
    return seen


def listed(gw: GatewayProcess, cookie: str, device: str, metric: str) -> Callable[[], Any]:
    def check() -> dict | None:
        status, body = gw.http_get("/api/devices/", cookie)
        assert status == 200, body
        found = [d for d in body if d["id"] == device and metric in d["metrics"]]
        return found[0] if found and found[0]["online"] else None

    return check


async def switch_lifecycle(
    gw: GatewayProcess, cookie: str, ws: Any, device: str, name: str, state: str
) -> dict:
    """POST a switch command, follow its frames to the end; the final command."""
    status, body = gw.http_request(
        "POST",
        f"/api/devices/{device}/commands",
        cookie=cookie,
        body={"name": name, "args": {"value": state == "ON"}, "timeout": 10},
    )
    assert status == 202, body
    frames = await command_frames(ws, body["id"])
    assert frames == ["pending", "sent", "acked"], frames
    status, final = gw.http_get(f"/api/commands/{body['id']}", cookie)
    assert status == 200
    return final


async def test_esphome_node_and_zigbee2mqtt_devices_appear_chart_and_obey(mosquitto):
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        async with (
            Fleet(mosquitto.url, devices=1, rate=5, style="esphome") as esphome,
            Fleet(mosquitto.url, devices=1, rate=5, style="zigbee2mqtt") as z2m,
            gw.ws_connect(cookie) as ws,
        ):
            await asyncio.wait_for(esphome.wait_connected(), 10)
            await asyncio.wait_for(z2m.wait_connected(), 10)
            node = fake_mac("esphome-0001")  # the node's dev.ids (its MAC)
            plug = "0x" + fake_mac("zigbee2mqtt-0001/plug").rjust(16, "0")
            climate = "0x" + fake_mac("zigbee2mqtt-0001/climate").rjust(16, "0")

            # Each appears with its friendly name and charts live (telemetry frames).
            esp = await until(listed(gw, cookie, node, "temperature"), 20, "ESPHome node listed")
            assert esp["name"] == "esphome-0001"
            zig = await until(listed(gw, cookie, climate, "humidity"), 20, "Zigbee sensor listed")
            assert zig["name"] == "zigbee2mqtt-0001/climate"
            async with asyncio.timeout(10):
                charted: set[str] = set()
                while charted != {node, climate}:
                    frame = json.loads(await ws.recv())
                    if frame.get("type") == "telemetry" and frame["device"] in (node, climate):
                        # An ESPHome node sends each sensor on its own topic: a frame may
                        # carry humidity alone; it is charted once a temperature comes.
                        values = frame["metrics"]
                        assert values and all(type(v) in (float, bool) for v in values.values())
                        if "temperature" in values:
                            charted.add(frame["device"])

            # Units and device classes are in the API.
            status, discovered = gw.http_get("/api/discovery/", cookie)
            assert status == 200
            units = {
                (d["device"], e["metric"]): e["unit"] for d in discovered for e in d["entities"]
            }
            assert units[(node, "temperature")] == "°C"
            assert units[(node, "humidity")] == "%"
            assert units[(plug, "power")] == "W"
            assert units[(climate, "humidity")] == "%"

            # A switch command on each, through the full lifecycle, acked by the device's state.
            final = await switch_lifecycle(gw, cookie, ws, node, "relay", "ON")
            assert final["result"] == {"state": "ON"}
            assert esphome[0].relay is True
            final = await switch_lifecycle(gw, cookie, ws, plug, "state", "ON")
            assert final["result"] == {"state": "ON"}
            assert z2m[0].relay is True
            final = await switch_lifecycle(gw, cookie, ws, plug, "state", "OFF")
            assert z2m[0].relay is False

            # Stored history of a discovered sensor.
            def history() -> list | None:
                status, body = gw.http_get(
                    f"/api/devices/{node}/telemetry?metric=temperature", cookie
                )
                return body["points"] if status == 200 and body["points"] else None

            assert await until(history, 10, "history of the ESPHome temperature")


async def test_device_pages_show_friendly_names_and_units_in_chromium(mosquitto):
    from playwright.async_api import async_playwright, expect

    from tests.support.browser import launch

    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        async with (
            Fleet(mosquitto.url, devices=1, rate=5, style="esphome") as esphome,
            Fleet(mosquitto.url, devices=1, rate=5, style="zigbee2mqtt") as z2m,
        ):
            await asyncio.wait_for(esphome.wait_connected(), 10)
            await asyncio.wait_for(z2m.wait_connected(), 10)
            node = fake_mac("esphome-0001")
            climate = "0x" + fake_mac("zigbee2mqtt-0001/climate").rjust(16, "0")
            await until(listed(gw, cookie, node, "temperature"), 20, "ESPHome node listed")
            await until(listed(gw, cookie, climate, "humidity"), 20, "Zigbee sensor listed")
            problems: list[str] = []
            async with async_playwright() as pw:
                browser = await launch(pw)
                try:
                    context = await browser.new_context()
                    await context.add_cookies(
                        [
                            {"name": k, "value": v, "url": gw.base_url}
                            for k, v in (part.split("=", 1) for part in cookie.split("; "))
                        ]
                    )
                    page = await context.new_page()
                    page.on("pageerror", lambda exc: problems.append(str(exc)))
                    page.on(
                        "console",
                        lambda m: problems.append(m.text) if "Content Security" in m.text else None,
                    )
                    await page.goto(f"{gw.base_url}/devices/{node}/")
                    await expect(page.locator("#device-name")).to_have_text("esphome-0001")
                    chart = page.locator('.chart[data-metric="temperature"]')
                    await expect(chart.locator(".chart-unit")).to_have_text("Temperature (°C)")
                    await expect(chart.locator("canvas")).to_have_count(1)
                    tile = page.locator('.tile[data-metric="humidity"] .tile-unit')
                    await expect(tile).to_have_text("Humidity (%)")
                    # The Zigbee2MQTT sensor: its friendly name (with a "/") and units.
                    await page.goto(f"{gw.base_url}/devices/{climate}/")
                    await expect(page.locator("#device-name")).to_have_text(
                        "zigbee2mqtt-0001/climate"
                    )
                    chart = page.locator('.chart[data-metric="humidity"]')
                    await expect(chart.locator(".chart-unit")).to_have_text("(%)")
                    await expect(chart.locator("canvas")).to_have_count(1)
                finally:
                    await browser.close()
            assert problems == []


async def test_a_restart_rereads_retained_configs_and_stores_no_duplicates(mosquitto):
    """ESPHome retains its configs, states and status; a restarted gateway gets them all
    replayed: the device is known again, offline, and no reading is stored twice."""
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        node = fake_mac("esphome-0001")
        path = f"/api/devices/{node}/telemetry?metric=temperature&max_points=10000"

        def points() -> list:
            status, body = gw.http_get(path, cookie)
            return body["points"] if status == 200 else []

        async with Fleet(mosquitto.url, devices=1, rate=10, style="esphome") as esphome:
            await asyncio.wait_for(esphome.wait_connected(), 10)
            await until(lambda: len(points()) >= 5, 20, "readings stored")
        # The node left (retained offline); its last temperature stays retained on the broker.
        await until(lambda: not listed(gw, cookie, node, "temperature")(), 10, "node offline")
        before = await asyncio.to_thread(points)

        gw.stop()
        gw.start(migrate=False)
        cookie = gw.login("operator", PASSWORD)

        def rediscovered() -> bool:
            status, body = gw.http_get("/api/discovery/", cookie)
            return status == 200 and any(d["device"] == node for d in body)

        await until(rediscovered, 20, "configs replayed")
        status, devices = gw.http_get("/api/devices/", cookie)
        device = next(d for d in devices if d["id"] == node)
        assert (device["name"], device["online"]) == ("esphome-0001", False)
        # Sentinel: a live state published after the replay is stored; the retained one, which
        # the broker delivers first on subscribe, was not stored again before it.
        topic = "esphome-0001/sensor/temperature/state"
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="live-state") as live:
            async with asyncio.timeout(20):
                while len(after := await asyncio.to_thread(points)) == len(before):
                    await live.publish(topic, b"99.5", qos=1)  # until subscribed and stored
                    await asyncio.sleep(0.5)
        assert after[: len(before)] == before
        assert {value for _, value in after[len(before) :]} == {99.5}, after[len(before) :]
