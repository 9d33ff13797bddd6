"""The dashboard details people notice, in Chromium against the real gateway and broker:
readable chart axes, one time convention (the browser's zone, named in the header), on/off
metrics charted as steps, each device's convention and the buttons it makes safe, diagnostic
values collapsed, and a chart's window downloaded as CSV.

Reuses the harness of tests/test_dashboard_browser.py (its own broker and gateway here). With
`GATEWAY_SCREENSHOTS=1` the README's `docs/img/device-tasmota.png` is refreshed.
"""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import datetime
from zoneinfo import ZoneInfo

from firmware_sim.fleet import Fleet
from tests import test_dashboard_browser as harness
from tests.test_dashboard_browser import (
    WAIT_MS,
    browser_page,
    device_client,
    publish,
    screenshot_path,
    until_page,
)

stack = harness.stack  # the module's broker and gateway (a fixture)

ZONE = "Europe/Berlin"
CLOCK = re.compile(r"^(\d\d-\d\d )?\d\d:\d\d(:\d\d)?$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def local(ts: float) -> str:
    return datetime.fromtimestamp(ts, ZoneInfo(ZONE)).strftime("%Y-%m-%d %H:%M:%S")


async def test_axes_times_and_on_off_steps_in_the_browsers_zone(stack):
    """A barometer's 1006.5 hPa keeps all its digits, a few seconds of data get minute ticks,
    times are the browser's (Berlin) ISO-like, and a relay is a 0/1 step chart."""
    from playwright.async_api import expect

    broker, gw = stack
    async with (
        device_client(broker, "baro-1") as baro,
        browser_page(gw, "operator", timezone_id=ZONE) as (page, problems),
    ):
        now = time.time()
        readings = [(1006.5, False), (1006.25, True), (1007.0, True), (1006.75, False)]
        for i, (pressure, relay) in enumerate(readings):
            await publish(baro, "baro-1", ts=now - 4 + i, pressure=pressure, relay=relay)
        await until_page(page, gw, "/devices/baro-1/")
        await expect(page.locator("#conn")).to_have_text("live")
        await expect(page.locator("#tz")).to_have_text(f"Times in {ZONE} (UTC+01:00)")

        pressure = page.locator('.chart[data-metric="pressure"]')
        await expect(pressure).to_have_attribute("data-points", "4", timeout=WAIT_MS)
        y_ticks = (await pressure.get_attribute("data-y-ticks")).split("|")
        assert y_ticks and all(NUMBER.match(t) for t in y_ticks if t), y_ticks
        assert any(t.startswith("100") for t in y_ticks), y_ticks  # all digits, no "..,006.5"
        x_ticks = (await pressure.get_attribute("data-x-ticks")).split("|")
        assert x_ticks and all(CLOCK.match(t) for t in x_ticks), x_ticks  # never ":19.500"

        relay = page.locator('.chart[data-metric="relay"]')
        await expect(relay).to_have_attribute("data-kind", "boolean")
        await expect(relay).to_have_attribute("data-points", "4", timeout=WAIT_MS)
        await expect(relay).to_have_attribute("data-y-ticks", "off|on")
        await expect(relay.locator(".chart-latest")).to_have_text("off")
        await publish(baro, "baro-1", pressure=1006.0, relay=True)
        await expect(relay.locator(".chart-latest")).to_have_text("on", timeout=WAIT_MS)

        # The name is shown once when it is the id; "last seen" is the reading's local time.
        await expect(page.locator("#device-name")).to_have_text("baro-1")
        await expect(page.locator("#device-id")).to_be_hidden()
        await page.goto(gw.base_url + "/")
        row = page.locator('tr[data-device="baro-1"]')
        await expect(row.locator(".badge")).to_have_text("online", timeout=WAIT_MS)
        await expect(row.locator(".id")).to_be_hidden()
        title = await row.locator(".seen time").get_attribute("title")
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", title), title
        # Berlin's wall clock, not UTC's (an hour apart in December).
        seen = datetime.strptime(title, "%Y-%m-%d %H:%M:%S")
        berlin_now = datetime.strptime(local(time.time()), "%Y-%m-%d %H:%M:%S")
        assert abs((seen - berlin_now).total_seconds()) < 60, (title, berlin_now)
    assert problems == []


async def test_tasmota_convention_diagnostics_collapsed_and_its_own_buttons(stack):
    """A Tasmota plug (firmware_sim's STATE/SENSOR payloads) shows as Tasmota, its Wi-Fi,
    heap and load average collapsed, and is offered Power buttons that it acks."""
    from playwright.async_api import expect

    broker, gw = stack
    async with (
        Fleet(broker.url, devices=1, rate=2.0, style="tasmota", prefix="plug", seed=8) as fleet,
        browser_page(gw, "operator") as (page, problems),
    ):
        await fleet.wait_connected()
        await page.goto(gw.base_url + "/")
        row = page.locator('tr[data-device="plug-0001"]')
        await expect(row.locator(".badge")).to_have_text("online", timeout=WAIT_MS)
        await expect(row.locator(".transport")).to_have_text("Tasmota", timeout=WAIT_MS)
        await expect(row.locator(".transport")).to_have_attribute("title", "transport: mqtt")
        diag = row.locator("details.diag")
        await expect(diag.locator(".metric-name", has_text="Wifi.RSSI")).to_have_count(
            1, timeout=WAIT_MS
        )
        assert await diag.get_attribute("open") is None  # collapsed
        await expect(diag.locator(".metric-name", has_text="UptimeSec")).to_be_hidden()
        for name in ("Heap", "LoadAvg", "MqttCount", "Wifi.Channel"):
            await expect(diag.locator(".metric-name", has_text=name)).to_have_count(1)
        visible = row.locator("td.metrics > .metric .metric-name")
        await expect(visible.filter(has_text="AM2301.Temperature")).to_have_count(1)
        assert not any(n.startswith(("Wifi.", "Heap")) for n in await visible.all_inner_texts())
        await diag.locator("summary").click()
        await expect(diag.locator(".metric-name", has_text="UptimeSec")).to_be_visible()

        await page.goto(gw.base_url + "/devices/plug-0001/")
        await expect(page.locator("#conn")).to_have_text("live")
        await expect(page.locator("#device-transport")).to_have_text("Tasmota")
        labels = await page.locator("#quick .quick-btn").all_inner_texts()
        assert labels == ["Power ON", "Power OFF", "Power TOGGLE"], labels
        await expect(page.locator("#diagnostics")).to_be_visible()
        assert await page.locator("#diagnostics").get_attribute("open") is None
        await expect(page.locator('.chart[data-metric="Wifi.RSSI"]')).to_have_count(0)
        power = page.locator('.chart[data-metric="POWER"]')
        await expect(power).to_have_attribute("data-kind", "boolean", timeout=WAIT_MS)

        before = fleet["plug-0001"].relay
        await page.click('#quick .quick-btn >> text="Power TOGGLE"')
        item = page.locator("#commands li").first
        await expect(item.locator(".cmd-status")).to_have_text("acked", timeout=WAIT_MS)
        assert fleet["plug-0001"].relay is (not before)
        await page.screenshot(path=str(screenshot_path("device-tasmota.png")), full_page=True)
    assert problems == []


async def test_a_charts_window_downloads_as_csv(stack):
    """The CSV link of a chart downloads its window: the same points, ISO UTC times."""
    from playwright.async_api import expect

    broker, gw = stack
    async with (
        device_client(broker, "csv-1") as client,
        browser_page(gw, "operator") as (page, problems),
    ):
        now = time.time()
        for i in range(5):
            await publish(client, "csv-1", ts=now - 10 + i, temperature=20 + i / 4)
        await until_page(page, gw, "/devices/csv-1/")
        chart = page.locator('.chart[data-metric="temperature"]')
        await expect(chart).to_have_attribute("data-points", "5", timeout=WAIT_MS)
        async with page.expect_download() as info:
            await chart.locator(".chart-csv").click()
        download = await info.value
        assert download.suggested_filename == "csv-1_temperature.csv"
        text = (await download.path()).read_text()
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == ["time_utc", "epoch_seconds", "value"]
        assert [float(r[2]) for r in rows[1:]] == [20.0, 20.25, 20.5, 20.75, 21.0]
        assert all(r[0].endswith("Z") for r in rows[1:])
    assert problems == []
