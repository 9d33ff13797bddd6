"""Fault: Redis (the channels-redis pub/sub layer) dies under load and comes back.

The real gateway runs with ``REDIS_URL`` set; a device publishes a counter at QoS 1 all along;
a logged-in dashboard WebSocket stays connected the whole time. redis-server is killed, kept
down for a few seconds and restarted on the same port. Storage never depends on the layer, so
every reading is stored exactly once; the frames the layer could not carry are counted; the same
dashboard connection gets telemetry again once Redis is back, and a fresh snapshot that covers
what it missed meanwhile, without reconnecting.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import aiomqtt
import pytest

from tests.support.browser import CHROMIUM
from tests.support.gateway import GatewayProcess
from tests.support.publishers import NumberedPublisher
from tests.support.waiting import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = secrets.token_urlsafe(12)
DEVICE = "redis-fault-1"
NEWCOMER = "redis-fault-new"
NEWCOMER_READINGS = 5
OUTAGE_SECONDS = 3.0
EVERY = 0.05  # 20 readings/s


class Frames:
    """Every frame one WebSocket receives, with its arrival time, read in the background."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.items: list[tuple[float, dict]] = []
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._read(), name="test.frames")

    async def _read(self) -> None:
        async for text in self.ws:
            self.items.append((time.monotonic(), json.loads(text)))
            self.arrived.set()

    async def wait_for(self, match: Any, after: float = 0.0, wait: float = 20.0) -> dict:
        """The first frame received after `after` (monotonic) for which `match` holds."""
        async with asyncio.timeout(wait):
            while True:
                for at, frame in self.items:
                    if at > after and match(frame):
                        return frame
                self.arrived.clear()
                await self.arrived.wait()

    def counters_seen(self) -> set[int]:
        return {
            int(f["metrics"]["n"])
            for _, f in self.items
            if f.get("type") == "telemetry" and f.get("device") == DEVICE and "n" in f["metrics"]
        }


def history_values(gw: GatewayProcess, cookie: str, device: str) -> list[int]:
    """The stored values of metric `n` of `device` (none while it is not stored yet)."""
    return [int(v) for _, v in gw.history(cookie, device, "n")]


def is_telemetry(frame: dict) -> bool:
    return frame.get("type") == "telemetry" and frame.get("device") == DEVICE


async def test_redis_restart_under_load_loses_no_reading_and_the_dashboard_recovers(
    mosquitto, redis_server
):
    with GatewayProcess(mosquitto.url, redis_url=redis_server.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        async with gw.ws_connect(cookie) as ws:
            frames = Frames(ws)
            await frames.wait_for(lambda f: f.get("type") == "snapshot")
            device = NumberedPublisher(
                mosquitto.port, DEVICE, every=EVERY, identifier="redis-fault-dev", stamp=True
            )
            published = device.start().acked
            try:
                await frames.wait_for(is_telemetry)
                dropped_before = gw.metric(
                    "gateway_dashboard_events_dropped_total", 'reason="layer_error"'
                )

                # Redis dies under load and stays down for a while.
                redis_server.kill()
                killed = time.monotonic()
                # A device heard for the first time while Redis is down is stored too.
                async with aiomqtt.Client(
                    "127.0.0.1", mosquitto.port, identifier="redis-fault-newcomer"
                ) as newcomer:
                    for n in range(1, NEWCOMER_READINGS + 1):
                        body = json.dumps({"n": n})
                        await newcomer.publish(f"devices/{NEWCOMER}/telemetry", body, qos=1)
                        await asyncio.sleep(OUTAGE_SECONDS / NEWCOMER_READINGS)
                during = list(published)
                # A page opened (and closed) during the outage still gets its snapshot.
                async with gw.ws_connect(cookie) as late:
                    first = json.loads(await asyncio.wait_for(late.recv(), 10))
                    assert first["type"] == "snapshot"

                # Stored while Redis is still down: the old device's and the newcomer's.
                def stored_meanwhile() -> bool:
                    ours = history_values(gw, cookie, DEVICE)
                    theirs = history_values(gw, cookie, NEWCOMER)
                    return len(ours) >= len(during) and len(theirs) == NEWCOMER_READINGS

                await until(stored_meanwhile, wait=10, what="readings stored during the outage")
                # /healthz reports broker and database, not Redis: still 200 (docs/reliability.md).
                status, health = gw.http_get("/healthz")
                assert status == 200, health
                assert health["mqtt"] == "connected" and health["database"] == "ok", health
                assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
                await asyncio.to_thread(redis_server.start)
                restarted = time.monotonic()

                # The same connection: telemetry again, and a snapshot that resyncs it.
                frame = await frames.wait_for(is_telemetry, after=restarted)
                recovered = time.monotonic() - restarted
                resync = await frames.wait_for(lambda f: f.get("type") == "snapshot", after=killed)
                await asyncio.sleep(1.0)
            finally:
                await device.stop()
            frames.task.cancel()

        assert frame["metrics"]["n"] > during[-1] - 5
        listed = {d["id"]: d for d in resync["devices"]}
        assert listed[DEVICE]["online"] is True
        # Frames that could not reach Redis were counted, not raised into the ingest path.
        dropped = gw.metric("gateway_dashboard_events_dropped_total", 'reason="layer_error"')
        assert dropped > dropped_before

        # Every reading, including those published while Redis was down, stored exactly once.
        def all_stored() -> list | None:
            values = history_values(gw, cookie, DEVICE)
            return values if len(values) >= len(published) else None

        values = await until(all_stored, wait=20, what="every reading stored")
        assert sorted(values) == list(range(1, len(published) + 1))
        assert sorted(history_values(gw, cookie, NEWCOMER)) == list(range(1, NEWCOMER_READINGS + 1))
        assert "raised; replacing it" not in gw.log_text(), "a consumer died of the outage"
        assert listed[NEWCOMER]["online"] is True
        missed = set(published) - frames.counters_seen()
        print(
            f"\nRedis down {restarted - killed:.1f} s at {1 / EVERY:.0f} msg/s: {len(published)} "
            f"published, all stored; /healthz during outage {status} {health}; "
            f"{len(missed)} counters never shown as frames, "
            f"{dropped - dropped_before:.0f} frames counted as layer_error; "
            f"telemetry again {recovered:.2f} s after Redis restart"
        )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
async def test_the_open_page_shows_what_happened_during_the_outage_without_a_reload(
    mosquitto, redis_server
):
    """Chromium on the dashboard: a device first heard while Redis was down appears, and live
    values flow again, on the same page and the same WebSocket."""
    from playwright.async_api import expect

    from tests.test_dashboard_browser import PASSWORD as BROWSER_PASSWORD
    from tests.test_dashboard_browser import browser_page

    with GatewayProcess(mosquitto.url, redis_url=redis_server.url) as gw:
        gw.create_user("operator", BROWSER_PASSWORD, staff=True)
        async with (
            browser_page(gw, "operator") as (page, problems),
            aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="redis-browser-dev") as device,
        ):
            sockets: list[Any] = []
            page.on("websocket", lambda ws: sockets.append(ws))
            await page.goto(gw.base_url + "/")
            await expect(page.locator("#conn")).to_have_text("live")
            await page.evaluate("window.__sameDocument = true")

            async def reading(device_id: str, value: float) -> None:
                body = json.dumps({"temperature": value})
                await device.publish(f"devices/{device_id}/telemetry", body, qos=1)

            await reading(DEVICE, 20.5)
            row = page.locator(f'tr[data-device="{DEVICE}"]')
            value = row.locator(".metric", has_text="temperature").locator(".metric-value")
            await expect(value).to_have_text("20.5", timeout=15_000)

            redis_server.kill()
            await reading(NEWCOMER, 7.25)
            await reading(DEVICE, 21.5)
            await asyncio.sleep(OUTAGE_SECONDS)
            await asyncio.to_thread(redis_server.start)

            newcomer = page.locator(f'tr[data-device="{NEWCOMER}"]')
            await expect(newcomer).to_have_count(1, timeout=20_000)  # from the resync snapshot
            await expect(value).to_have_text("21.5")
            await reading(DEVICE, 22.5)  # and live frames again
            await expect(value).to_have_text("22.5", timeout=15_000)
            assert await page.evaluate("window.__sameDocument === true"), "the page reloaded"
            assert len(sockets) == 1, "the page opened another WebSocket"
            assert problems == []
