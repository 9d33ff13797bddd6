"""The dashboard in Debian's Chromium against the REAL gateway, a real broker and real devices.

One mosquitto and one `rungateway` subprocess serve the whole module (each test uses its own
devices); devices are `firmware_sim` fleets or plain aiomqtt clients. Every page records
dialogs, page errors and CSP violations; each test ends by asserting there were none.

Screenshots go to `test-artifacts/` (git-ignored); with `GATEWAY_SCREENSHOTS=1` the README's
`docs/img/dashboard.png`, `docs/img/device.png` and `docs/img/dashboard-phone.png` are refreshed.
Long on purpose: the browser and gateway are started once for all of the page's stories.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from firmware_sim.fleet import Fleet
from tests.support.browser import CHROMIUM, open_when_stored, watched_page
from tests.support.gateway import ROOT, GatewayProcess, operator_and_viewer
from tests.support.servers import Mosquitto

UPLOT = ROOT / "node_modules" / "uplot" / "dist" / "uPlot.iife.min.js"
PASSWORD = secrets.token_urlsafe(12)
XSS_NAME = "<img src=x onerror=alert('name')>"
XSS_METRIC = "<img src=x onerror=alert('metric')>"
XSS_RESULT = "<script>alert('result')</script><img src=x onerror=alert('result')>"
WAIT_MS = 15_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
    pytest.mark.skipif(not UPLOT.exists(), reason="needs `npm ci` (bin/setup) for uPlot"),
]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Mosquitto, GatewayProcess]]:
    """A broker and the gateway for the module, with a staff operator and a plain viewer."""
    with operator_and_viewer(PASSWORD) as (broker, gw):
        yield broker, gw


@contextlib.asynccontextmanager
async def browser_page(
    gw: GatewayProcess,
    user: str | None,
    *,
    width: int = 1280,
    height: int = 860,
    timezone_id: str | None = None,
) -> AsyncIterator[tuple[Any, list[str]]]:
    """A Chromium page (logged in as `user` through a real login when given) and its problems."""
    cookie = await asyncio.to_thread(gw.login, user, PASSWORD) if user is not None else None
    viewport = {"width": width, "height": height}
    async with watched_page(gw.base_url, cookie, viewport=viewport, timezone_id=timezone_id) as (
        page,
        problems,
    ):
        yield page, problems


@contextlib.asynccontextmanager
async def device_client(broker: Mosquitto, device_id: str) -> AsyncIterator[aiomqtt.Client]:
    """A plain MQTT device: online (retained) with `offline` as its Last Will."""
    will = aiomqtt.Will(f"devices/{device_id}/status", b"offline", qos=1, retain=True)
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=f"test-{device_id}", will=will
    ) as client:
        await client.publish(f"devices/{device_id}/status", b"online", qos=1, retain=True)
        yield client


async def publish(client: aiomqtt.Client, device_id: str, ts: float | None = None, **metrics):
    body = {**metrics, "ts": ts if ts is not None else time.time()}
    await client.publish(f"devices/{device_id}/telemetry", json.dumps(body), qos=1)


@contextlib.asynccontextmanager
async def acking(client: aiomqtt.Client, device_id: str, result: Any) -> AsyncIterator[None]:
    """The device acks every command on its topic with `result(command)`."""
    await client.subscribe(f"devices/{device_id}/commands", qos=1)

    async def answer() -> None:
        async for message in client.messages:
            command = json.loads(message.payload)
            ack = {"id": command["id"], "ok": True, "result": result(command)}
            await client.publish(f"devices/{device_id}/commands/ack", json.dumps(ack), qos=1)

    task = asyncio.create_task(answer())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def screenshot_path(name: str) -> Path:
    if os.environ.get("GATEWAY_SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "img"
    else:
        folder = ROOT / "test-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


# --- the tests ----------------------------------------------------------------------------


async def test_login_live_values_chart_and_last_will(stack):
    """Log in; a simulated device appears online; a reading updates the list and the chart
    without a reload; the device's Last Will turns its badge offline."""
    from playwright.async_api import expect

    broker, gw = stack
    async with (
        browser_page(gw, None) as (page, problems),
        Fleet(broker.url, devices=2, rate=2.0, prefix="live", seed=1) as fleet,
    ):
        await page.goto(gw.base_url + "/")
        assert page.url.startswith(gw.base_url + "/accounts/login/")
        await page.fill("#id_username", "operator")
        await page.fill("#id_password", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(gw.base_url + "/")
        await expect(page.locator("#conn")).to_have_text("live")

        # A simulated device appears online with its values.
        row = page.locator('tr[data-device="live-0001"]')
        await expect(row.locator(".badge")).to_have_text("online", timeout=WAIT_MS)
        await expect(row.locator(".transport")).to_have_text("native")
        await expect(row.locator(".metric", has_text="temperature")).to_have_count(1)
        await expect(row.locator(".seen time")).to_contain_text("ago")

        # A published reading changes the displayed value, no reload.
        async with device_client(broker, "probe-1") as probe:
            # Readings 5 s apart: the 1 h window merges points closer than 2.4 s (device.js).
            start = time.time() - 10
            await publish(probe, "probe-1", ts=start, temperature=41.125, humidity=33)
            probe_row = page.locator('tr[data-device="probe-1"]')
            value = probe_row.locator(".metric", has_text="temperature").locator(".metric-value")
            await expect(value).to_have_text("41.125", timeout=WAIT_MS)
            await publish(probe, "probe-1", ts=start + 5, temperature=42.5, humidity=34)
            await expect(value).to_have_text("42.5", timeout=WAIT_MS)

            # The device page: a chart per numeric metric, history first, then live points.
            await probe_row.locator("a.name").click()
            await page.wait_for_url(gw.base_url + "/devices/probe-1/")
            await expect(page.locator("#conn")).to_have_text("live")
            chart = page.locator('.chart[data-metric="temperature"]')
            await expect(chart).to_have_attribute("data-loaded", "1", timeout=WAIT_MS)
            await expect(chart.locator("canvas")).to_have_count(1)
            await expect(chart).to_have_attribute("data-points", "2", timeout=WAIT_MS)
            await expect(page.locator('.chart[data-metric="humidity"]')).to_have_count(1)
            await publish(probe, "probe-1", temperature=43.75, humidity=35)
            await expect(chart).to_have_attribute("data-points", "3", timeout=WAIT_MS)
            await expect(chart.locator(".chart-latest")).to_have_text("43.75")
            tile = page.locator('.tile[data-metric="temperature"] .tile-value')
            await expect(tile).to_have_text("43.75")
            # Another window reloads the history: the same three points, not duplicated.
            await page.click('#windows button[data-window="3600"]')
            await expect(chart).to_have_attribute("data-points", "3", timeout=WAIT_MS)

        # Back on the list: the simulated device's Last Will turns it offline.
        await page.goto(gw.base_url + "/")
        await expect(row.locator(".badge")).to_have_text("online", timeout=WAIT_MS)
        fleet["live-0001"].drop()
        await expect(row.locator(".badge")).to_have_text("offline", timeout=WAIT_MS)
        await expect(page.locator('tr[data-device="live-0002"] .badge')).to_have_text("online")
    assert problems == []


async def test_command_from_the_panel_is_acked(stack):
    """A command sent from the panel goes pending → sent → acked with the device's result;
    bad JSON arguments are refused in the page before anything is sent.

    Needs the commands backend (the WebSocket `command` frame)."""
    from playwright.async_api import expect

    broker, gw = stack
    async with (
        browser_page(gw, "operator") as (page, problems),
        Fleet(broker.url, devices=1, rate=2.0, prefix="cmd", seed=2) as fleet,
    ):
        await fleet.wait_connected()
        await until_page(page, gw, "/devices/cmd-0001/")
        await expect(page.locator("#conn")).to_have_text("live")

        # Client-side validation: nothing is sent, the error says why.
        await page.fill("#command-name", "set_interval")
        await page.fill("#command-args", "{seconds: 5")
        await page.click("#command-form button[type=submit]")
        await expect(page.locator("#command-error")).to_contain_text("not valid JSON")
        await page.fill("#command-args", "[1, 2]")
        await page.click("#command-form button[type=submit]")
        await expect(page.locator("#command-error")).to_contain_text("JSON object")
        await expect(page.locator("#commands li")).to_have_count(0)

        # A typed command.
        await page.fill("#command-args", '{"seconds": 0.5}')
        await page.click("#command-form button[type=submit]")
        await expect(page.locator("#command-error")).to_be_hidden()
        item = page.locator("#commands li").first
        await expect(item.locator(".cmd-status")).to_have_text("acked", timeout=WAIT_MS)
        await expect(item.locator(".cmd-trail")).to_contain_text("pending")
        await expect(item.locator(".cmd-trail")).to_contain_text("acked")
        await expect(item.locator(".cmd-result")).to_contain_text('"seconds":0.5')
        assert await item.get_attribute("data-command")

        # A native device is offered no guessed buttons: its commands are typed.
        await expect(page.locator("#quick .quick-btn")).to_have_count(0)
        await page.fill("#command-name", "relay")
        await page.fill("#command-args", '{"state": true}')
        await page.click("#command-form button[type=submit]")
        item = page.locator("#commands li").first
        await expect(item.locator(".cmd-name")).to_have_text("relay")
        await expect(item.locator(".cmd-status")).to_have_text("acked", timeout=WAIT_MS)
        await expect(item.locator(".cmd-result")).to_contain_text('"relay":true')
        assert fleet["cmd-0001"].relay is True
        await expect(page.locator("#commands li")).to_have_count(2)
    assert problems == []


async def until_page(page: Any, gw: GatewayProcess, path: str, wait: float = 10.0) -> None:
    """Open a device page, retrying while the device is not stored yet (404)."""
    await open_when_stored(page, gw.base_url + path, wait)


async def test_hostile_names_metrics_and_results_render_as_text(stack):
    """A device name, a metric name and a command result carrying HTML are shown as text and
    run no script: no dialog, no injected element, no CSP report."""
    from playwright.async_api import expect

    broker, gw = stack
    async with (
        device_client(broker, "evil-1") as evil,
        acking(evil, "evil-1", lambda command: {XSS_RESULT: XSS_RESULT}),
    ):
        await publish(evil, "evil-1", **{XSS_METRIC: 1.5, "ok": 2})
        await asyncio.to_thread(gw.rename_device, "evil-1", XSS_NAME)
        async with browser_page(gw, "operator") as (page, problems):
            await page.goto(gw.base_url + "/")
            row = page.locator('tr[data-device="evil-1"]')
            await expect(row.locator(".name")).to_have_text(XSS_NAME, timeout=WAIT_MS)
            await expect(row.locator(".metric-name", has_text="onerror")).to_have_text(XSS_METRIC)
            await publish(evil, "evil-1", **{XSS_METRIC: 2.5})  # a live frame too
            await expect(
                row.locator(".metric", has_text="onerror").locator(".metric-value")
            ).to_have_text("2.5", timeout=WAIT_MS)

            await row.locator("a.name").click()
            await page.wait_for_url(gw.base_url + "/devices/evil-1/")
            await expect(page.locator("#device-name")).to_have_text(XSS_NAME)
            await expect(page.locator(f'.chart[data-metric="{XSS_METRIC}"]')).to_have_count(
                1, timeout=WAIT_MS
            )
            await expect(page.locator("#conn")).to_have_text("live")
            await page.fill("#command-name", "status")
            await page.fill("#command-args", json.dumps({"note": XSS_NAME}))
            await page.click("#command-form button[type=submit]")
            item = page.locator("#commands li").first
            await expect(item.locator(".cmd-status")).to_have_text("acked", timeout=WAIT_MS)
            await expect(item.locator(".cmd-result")).to_contain_text("<script>")
            await expect(item.locator(".cmd-args")).to_contain_text("<img")
            # Reloaded: the server-rendered command list is escaped as well.
            await page.reload()
            await expect(page.locator("#commands li .cmd-result").first).to_contain_text("<script>")
            await expect(page.locator("#conn")).to_have_text("live")
            assert await page.locator("main img").count() == 0
            assert await page.locator("main script").count() == 0
            assert await page.locator("body script:not([src])").count() == 0
            assert await page.title() == f"{XSS_NAME} · Gateway"
    assert problems == []


async def test_viewer_without_permission_gets_no_panel_and_a_forced_command_is_refused(stack):
    """No form, no buttons for a viewer; a command frame sent by hand gets `forbidden` and
    nothing reaches the device."""
    from playwright.async_api import expect

    broker, gw = stack
    async with device_client(broker, "guarded-1") as guarded:
        await guarded.subscribe("devices/guarded-1/commands", qos=1)
        await publish(guarded, "guarded-1", temperature=20.0)
        async with browser_page(gw, "viewer") as (page, problems):
            await until_page(page, gw, "/devices/guarded-1/")
            await expect(page.locator("#conn")).to_have_text("live")
            await expect(page.locator("#no-permission")).to_be_visible()
            assert await page.locator("#command-form").count() == 0
            assert await page.locator("#quick button").count() == 0
            assert await page.locator("#device-page").get_attribute("data-can-command") == "0"

            # Forced: a hand-made frame on the page's own origin and session.
            answer = await page.evaluate(
                """() => new Promise((resolve, reject) => {
                    const ws = new WebSocket("ws://" + location.host + "/ws/dashboard/");
                    const timer = setTimeout(() => reject(new Error("no answer")), 10000);
                    ws.onmessage = (event) => {
                        const frame = JSON.parse(event.data);
                        if (frame.type === "snapshot") {
                            ws.send(JSON.stringify({type: "command", device: "guarded-1",
                                name: "reboot", args: {}, ref: "forced-1"}));
                        } else if (frame.type === "error" || frame.type === "command") {
                            clearTimeout(timer);
                            ws.close();
                            resolve(frame);
                        }
                    };
                })"""
            )
            assert answer["type"] == "error", answer
            assert answer["code"] == "forbidden"
            assert answer.get("ref") == "forced-1"
            # Sentinel: a command the operator may send, sent after the refusal, is the first
            # thing the device gets (one device consumer, one broker session: in order).
            cookie = await asyncio.to_thread(gw.login, "operator", PASSWORD)
            status, sentinel = await asyncio.to_thread(
                gw.http_request,
                "POST",
                "/api/devices/guarded-1/commands",
                cookie=cookie,
                body={"name": "status"},
            )
            assert status == 202, sentinel
            async with asyncio.timeout(15):
                first = json.loads((await anext(guarded.messages)).payload)
            assert (first["id"], first["name"]) == (sentinel["id"], "status"), first
            # The page itself shows the sentinel and no command of its own.
            await expect(page.locator("#commands li")).to_have_count(1, timeout=WAIT_MS)
            shown = page.locator("#commands li").first
            assert await shown.get_attribute("data-command") == sentinel["id"]
    assert problems == []


def greenhouse_reading(i: int) -> dict[str, float | bool]:
    """Smooth, plausible greenhouse values for the i-th reading (for the screenshots)."""
    return {
        "temperature": round(22 + 3 * math.sin(i / 18) + 0.3 * math.sin(i * 1.7), 2),
        "humidity": round(55 + 8 * math.cos(i / 25), 1),
        "co2": round(600 + 150 * math.sin(i / 40 + 1), 0),
        "vent_open": math.sin(i / 18) > 0.5,  # an on/off metric: a step chart
    }


async def test_screenshots_of_a_live_fleet(stack):
    """Several live simulated devices and a device page with history: the README's pictures."""
    from playwright.async_api import expect

    broker, gw = stack
    async with (
        Fleet(broker.url, devices=5, rate=1.0, prefix="sensor", seed=7),
        Fleet(broker.url, devices=2, rate=1.0, style="tasmota", prefix="plug", seed=8),
        device_client(broker, "greenhouse") as greenhouse,
        acking(greenhouse, "greenhouse", lambda command: {"ok": True, "name": command["name"]}),
    ):
        now = time.time()
        for i in range(150):  # five minutes of history, every two seconds
            await publish(greenhouse, "greenhouse", ts=now - 300 + i * 2, **greenhouse_reading(i))
        await asyncio.to_thread(gw.rename_device, "greenhouse", "Greenhouse north")
        async with browser_page(gw, "operator") as (page, problems):
            await page.goto(gw.base_url + "/")
            await expect(page.locator('tr[data-device="sensor-0005"] .badge')).to_have_text(
                "online", timeout=WAIT_MS
            )
            await expect(page.locator('tr[data-device="plug-0002"] .badge')).to_have_text(
                "online", timeout=WAIT_MS
            )
            await asyncio.sleep(2.5)  # a few live readings everywhere
            await page.screenshot(path=str(screenshot_path("dashboard.png")), full_page=True)

            await page.goto(gw.base_url + "/devices/greenhouse/")
            chart = page.locator('.chart[data-metric="temperature"]')
            await expect(chart).to_have_attribute("data-loaded", "1", timeout=WAIT_MS)
            for i in range(150, 153):  # live readings continue the curves
                await publish(greenhouse, "greenhouse", **greenhouse_reading(i))
                await asyncio.sleep(0.5)
            for name, args in (("set_interval", '{"seconds": 5}'), ("status", "{}")):
                await page.fill("#command-name", name)
                await page.fill("#command-args", args)
                await page.click("#command-form button[type=submit]")
            await expect(page.locator("#commands li .cmd-status", has_text="acked")).to_have_count(
                2, timeout=WAIT_MS
            )
            await page.screenshot(path=str(screenshot_path("device.png")), full_page=True)

            await page.set_viewport_size({"width": 390, "height": 844})
            await page.goto(gw.base_url + "/")
            await expect(page.locator("#conn")).to_have_text("live")
            await asyncio.sleep(1)
            await page.screenshot(path=str(screenshot_path("dashboard-phone.png")))
    assert problems == []
