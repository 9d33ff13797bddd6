"""The dashboard at fleet scale, in Debian's Chromium against the REAL gateway: 10,000 known
devices, a page of rows, the fleet's counts, search, live frames for visible rows only, and a
device whose messages are rejected shown among the problems.

Timings (ready, search, long tasks at 1,000 msg/s) are figures, in `python -m bench fleet`;
this test asserts the behaviour they rest on. With `GATEWAY_SCREENSHOTS=1` the overview at
10,000 devices is saved as `docs/img/fleet-overview.png`.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt
import pytest

from tests.support.browser import CHROMIUM
from tests.support.fleet import seed_fleet
from tests.support.gateway import GatewayProcess
from tests.support.servers import Mosquitto
from tests.test_dashboard_browser import PASSWORD, XSS_NAME, browser_page, screenshot_path

#: A `ts` the native convention cannot read, with markup: the row shows it as the rejection's text.
XSS_TS = "<img src=x onerror=alert('ts')>"
DEVICES = 10_000
PAGE_BYTES_MAX = 500_000
WAIT_MS = 15_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
]


@pytest.fixture(scope="module")
def fleet_stack():
    """A broker and the gateway with 10,000 known devices, every 50th offline, one hostile name."""
    with Mosquitto() as broker, GatewayProcess(broker.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        seed_fleet(gw, DEVICES, offline_every=50)
        gw.rename_device("fleet-04242", XSS_NAME)
        yield broker, gw


async def publish(client: aiomqtt.Client, device_id: str, **metrics) -> None:
    body = json.dumps({**metrics, "ts": time.time()})
    await client.publish(f"devices/{device_id}/telemetry", body, qos=1)


async def test_ten_thousand_devices_one_page_counts_search_and_visible_frames_only(fleet_stack):
    from playwright.async_api import expect

    broker, gw = fleet_stack
    cookie = await asyncio.to_thread(gw.login, "operator", PASSWORD)
    status, html = await asyncio.to_thread(gw.http_get, "/", cookie)
    assert status == 200
    assert len(html.encode()) < PAGE_BYTES_MAX  # a shell: no row of the fleet in it
    assert "fleet-0" not in html

    async with browser_page(gw, "operator") as (page, problems):
        frames: list[str] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(f)))
        await page.goto(gw.base_url + "/")
        await expect(page.locator("#conn")).to_have_text("live", timeout=WAIT_MS)
        rows = page.locator("#devices tbody tr")
        await expect(rows).to_have_count(50, timeout=WAIT_MS)  # one page, not 10,000 rows
        await expect(page.locator("#count-total")).to_have_text(f"{DEVICES:,}")
        await expect(page.locator("#count-offline")).to_have_text(f"{DEVICES // 50:,}")
        await expect(page.locator("#count-online")).to_have_text(f"{DEVICES - DEVICES // 50:,}")
        await expect(page.locator("#range")).to_have_text("1–50 of 10,000")
        # Problems first: the offline devices lead the list.
        await expect(rows.first).to_have_attribute("data-device", "fleet-00000")
        await expect(rows.first.locator(".badge").first).to_have_text("offline")
        assert len(frames[0]) < 100_000  # the snapshot is one page and the counts

        # The hostile name is found by search and shown as text.
        await page.fill("#filter", "<IMG src")
        hostile = page.locator('tr[data-device="fleet-04242"]')
        await expect(hostile.locator(".name")).to_have_text(XSS_NAME)
        assert await page.locator("#devices img").count() == 0

        # Search finds one device among 10,000.
        await page.fill("#filter", "fleet-07777")
        await expect(rows).to_have_count(1)
        target = page.locator('tr[data-device="fleet-07777"]')
        await expect(target).to_be_visible()
        await expect(page.locator("#range")).to_have_text("1–1 of 1")

        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="fleet-test") as client:
            # A live reading reaches the visible row.
            await publish(client, "fleet-07777", temperature=77.5)
            value = target.locator(".metric", has_text="temperature").locator(".metric-value")
            await expect(value).to_have_text("77.5", timeout=WAIT_MS)
            # A device off the page: its reading is sent before the sentinel's, and neither
            # its frame nor its row reaches the page.
            await publish(client, "fleet-01234", temperature=12.25)
            await publish(client, "fleet-07777", temperature=78.5)
            await expect(value).to_have_text("78.5", timeout=WAIT_MS)
            # Ten visible devices in one burst: their readings come in `batch` frames
            # (live.js asks for them), and each row shows its own device's last value.
            await page.fill("#filter", "fleet-0777")
            await expect(rows).to_have_count(10)
            burst = [f"fleet-0777{i}" for i in range(10)]
            for n in range(1, 21):
                for i, device_id in enumerate(burst):
                    body = json.dumps({"temperature": n * 10 + i, "ts": time.time()})
                    await client.publish(f"devices/{device_id}/telemetry", body, qos=0)
            for i, device_id in enumerate(burst):
                row = page.locator(f'tr[data-device="{device_id}"]')
                cell = row.locator(".metric", has_text="temperature").locator(".metric-value")
                await expect(cell).to_have_text(str(200 + i), timeout=WAIT_MS)
        assert await page.locator('tr[data-device="fleet-01234"]').count() == 0
        assert not [f for f in frames if "fleet-01234" in f]
        batches = [json.loads(f) for f in frames if f.startswith('{"type":"batch"')]
        assert any(len({f["device"] for f in b["frames"]}) > 1 for b in batches), "batched"

        # The device starts sending what the gateway rejects: its row says how many and why,
        # the device's own text shown as text; it counts as rejecting and leads the problems.
        rejection = target.locator(".rejection")
        await expect(rejection).to_be_hidden()
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="fleet-bad") as client:
            for _ in range(2):
                body = json.dumps({"temperature": 79.5, "ts": XSS_TS})
                await client.publish("devices/fleet-07777/telemetry", body, qos=1)
        await expect(rejection).to_have_text(
            f"2 rejected · bad_timestamp: ts {XSS_TS!r} is not ISO 8601", timeout=WAIT_MS
        )
        await expect(page.locator("#count-rejecting")).to_have_text("1", timeout=WAIT_MS)
        assert await page.locator("#devices img").count() == 0
        await page.fill("#filter", "")
        await expect(page.locator("#range")).to_have_text("1–50 of 10,000", timeout=WAIT_MS)
        await expect(rows.first).to_have_attribute("data-device", "fleet-07777")
        await expect(rows.nth(1)).to_have_attribute("data-device", "fleet-00000")  # offline
        await page.click('button[data-presence="rejecting"]')
        await expect(page.locator("#range")).to_have_text("1–1 of 1", timeout=WAIT_MS)

        # Paging and state filters are the server's.
        await page.click('button[data-presence="offline"]')
        await expect(page.locator("#range")).to_have_text("1–50 of 200", timeout=WAIT_MS)
        await page.click("#next")
        await expect(page.locator("#range")).to_have_text("51–100 of 200")
        await expect(rows.first).to_have_attribute("data-device", "fleet-02500")
        await page.click('button[data-presence="all"]')
        await expect(page.locator("#range")).to_have_text("1–50 of 10,000")
        assert await rows.count() == 50
        await page.screenshot(path=str(screenshot_path("fleet-overview.png")))

        # The device page has the record too (rendered by the server, escaped by Django).
        await page.goto(gw.base_url + "/devices/fleet-07777/")
        await expect(page.locator("#device-rejected")).to_have_text("2")
        last = page.locator("#device-last-rejection")
        await expect(last.locator(".rejection-reason")).to_have_text("bad_timestamp")
        await expect(last.locator(".rejection-detail")).to_have_text(
            f"ts {XSS_TS!r} is not ISO 8601"
        )
        assert await page.locator("#device-page img").count() == 0
    assert problems == []
