"""The alerts panel in Debian's Chromium against the real gateway, broker and an MQTT device:
an alert appears live (its hostile rule name as text), badges its device's row, is acknowledged
from the page by an operator (a viewer gets no button) and leaves when it clears."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator

import aiomqtt
import pytest

from tests.support.browser import CHROMIUM
from tests.support.gateway import GatewayProcess, operator_and_viewer
from tests.support.servers import Mosquitto
from tests.test_dashboard_browser import PASSWORD, UPLOT, browser_page

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
    pytest.mark.skipif(not UPLOT.exists(), reason="needs `npm ci` (bin/setup) for uPlot"),
]

HOSTILE_RULE = "<img src=x onerror=alert('rule')>"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Mosquitto, GatewayProcess]]:
    with operator_and_viewer(PASSWORD) as (broker, gw):
        yield broker, gw


async def reading(broker: Mosquitto, device: str, **metrics: float) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=secrets.token_hex(4)) as c:
        body = {**metrics, "ts": time.time()}
        await c.publish(f"devices/{device}/telemetry", json.dumps(body), qos=1)


async def test_an_alert_appears_live_is_acked_from_the_page_and_leaves_when_cleared(stack):
    from playwright.async_api import expect

    broker, gw = stack
    await reading(broker, "fridge-1", temperature=4.0)
    cookie = await asyncio.to_thread(gw.login, "operator", PASSWORD)
    rule = {"name": HOSTILE_RULE, "device": "fridge-*", "metric": "temperature", "op": "above",
            "threshold": 8, "severity": "critical"}  # fmt: skip
    status, body = await asyncio.to_thread(
        gw.http_request, "POST", "/api/alerts/rules", cookie=cookie, body=rule
    )
    assert status == 201, body

    async with (
        browser_page(gw, "operator") as (page, problems),
        browser_page(gw, "viewer") as (viewer, viewer_problems),
    ):
        for p in (page, viewer):
            await p.goto(gw.base_url + "/")
            await expect(p.locator("#conn")).to_have_text("live")
            await expect(p.locator("#alerts-empty")).to_be_visible()
        await gw_wait_rules(gw)
        await reading(broker, "fridge-1", temperature=11.5)

        item = page.locator("#alert-list li")
        await expect(item).to_have_count(1, timeout=WAIT_MS)
        await expect(item.locator(".alert-rule")).to_have_text(HOSTILE_RULE)
        await expect(item.locator(".alert-device")).to_have_text("fridge-1")
        await expect(item.locator(".badge-severity")).to_have_text("critical")
        await expect(page.locator("#alerts-count")).to_have_text("1")
        row_badge = page.locator('#devices tr[data-device="fridge-1"] .alert-badge')
        await expect(row_badge).to_have_count(1, timeout=WAIT_MS)
        await expect(viewer.locator("#alert-list li")).to_have_count(1, timeout=WAIT_MS)
        await expect(viewer.locator("#alert-list li button")).to_have_count(0)  # cannot ack

        await item.locator("button.alert-ack-button").click()
        await expect(item.locator(".alert-ack")).to_have_text("acknowledged by operator")
        await expect(viewer.locator("#alert-list li .alert-ack")).to_have_text(
            "acknowledged by operator", timeout=WAIT_MS
        )  # the frame reached the other dashboard too

        await reading(broker, "fridge-1", temperature=3.0)
        await expect(item).to_have_count(0, timeout=WAIT_MS)
        await expect(row_badge).to_have_count(0)
        await expect(page.locator("#alerts-empty")).to_be_visible()
        assert await page.locator("img").count() == 0  # the hostile name never became markup
    assert problems == [] and viewer_problems == []


async def gw_wait_rules(gw: GatewayProcess) -> None:
    """Until the gateway's evaluator has loaded the rule just created."""
    await asyncio.to_thread(gw.wait_for_log, r"alerts: 1 rules")
