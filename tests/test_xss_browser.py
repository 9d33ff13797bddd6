"""Hostile text renders as text, and the Content-Security-Policy would stop it if it did not.

Debian's Chromium against the real gateway, a real broker and a plain MQTT device. Device
names, metric names and command results and errors carry markup whose inline handlers would
set `window.__xss`; every page (the device list, a device page live and reloaded, the admin's
lists and detail pages) must show them as text, leave `window.__xss` unset and report no CSP
violation. Then the policy itself: an inline handler injected into a page is refused by the
browser. (test_dashboard_browser.py has the `alert()` flavour of the first part.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiomqtt
import pytest

from tests.support.browser import CHROMIUM, open_when_stored, watched_page
from tests.support.gateway import ROOT, GatewayProcess
from tests.support.servers import Mosquitto

PASSWORD = secrets.token_urlsafe(12)
XSS_NAME = """"><svg onload="window.__xss='name'"><img src=x onerror="window.__xss='name2'">"""
XSS_METRIC = "<img src=x onerror=window.__xss='metric'>"
XSS_RESULT = "<script>window.__xss='result'</script>"
XSS_ERROR = "\"><svg onload=window.__xss='error'>"
WAIT_MS = 15_000
#: Runs before any page script (through the DevTools protocol, so the CSP does not apply to
#: it): records every CSP violation the page reports.
WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.effectiveDirective} ${e.blockedURI} ${e.sample}`);
});
"""

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
    pytest.mark.skipif(
        not (ROOT / "node_modules" / "uplot" / "dist").is_dir(), reason="needs `npm ci` for uPlot"
    ),
]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Mosquitto, GatewayProcess]]:
    """A broker and the gateway; `ops` may command and view the admin's device pages."""
    with Mosquitto() as broker, GatewayProcess(broker.url) as gw:
        perms = ["devices.send_command", "devices.view_device", "devices.view_command"]
        gw.create_user("ops", PASSWORD, staff=True, perms=perms)
        yield broker, gw


@contextlib.asynccontextmanager
async def hostile_device(broker: Mosquitto, device_id: str) -> AsyncIterator[aiomqtt.Client]:
    """A device whose metric name, command result and command error carry markup."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"t-{device_id}") as client:
        await client.publish(f"devices/{device_id}/status", b"online", qos=1, retain=True)
        await client.subscribe(f"devices/{device_id}/commands", qos=1)

        async def answer() -> None:
            async for message in client.messages:
                command = json.loads(message.payload)
                if command["name"] == "fail":
                    ack = {"id": command["id"], "ok": False, "error": XSS_ERROR}
                else:
                    ack = {"id": command["id"], "ok": True, "result": {XSS_RESULT: XSS_RESULT}}
                await client.publish(f"devices/{device_id}/commands/ack", json.dumps(ack), qos=1)

        task = asyncio.create_task(answer())
        try:
            yield client
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def publish(client: aiomqtt.Client, device_id: str, **metrics: float) -> None:
    body = {**metrics, "ts": time.time()}
    await client.publish(f"devices/{device_id}/telemetry", json.dumps(body), qos=1)


@contextlib.asynccontextmanager
async def logged_in_page(gw: GatewayProcess) -> AsyncIterator[tuple[Any, list[str]]]:
    """A Chromium page logged in as `ops`, watching CSP violations; with its problems."""
    cookie = await asyncio.to_thread(gw.login, "ops", PASSWORD)
    async with watched_page(gw.base_url, cookie, init_script=WATCH) as (page, errors):
        yield page, errors


async def open_page(page: Any, gw: GatewayProcess, path: str) -> Any:
    """Go to `path` (retrying while the device is not stored yet); its 200 response."""
    return await open_when_stored(page, gw.base_url + path)


async def assert_nothing_ran(page: Any, response: Any) -> None:
    """No handler ran, no violation was reported, and the page came with the policy."""
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy, policy
    assert await page.evaluate("window.__xss") is None
    assert await page.evaluate("window.__csp") == []


async def test_hostile_text_renders_as_text_everywhere(stack):
    from playwright.async_api import expect

    broker, gw = stack
    async with hostile_device(broker, "xss-1") as dev:
        await publish(dev, "xss-1", **{XSS_METRIC: 1.5, "ok": 2})
        await asyncio.to_thread(gw.rename_device, "xss-1", XSS_NAME)
        async with logged_in_page(gw) as (page, errors):
            # The device list, then a live frame for the hostile metric.
            response = await open_page(page, gw, "/")
            row = page.locator('tr[data-device="xss-1"]')
            await expect(row.locator(".name")).to_have_text(XSS_NAME, timeout=WAIT_MS)
            await expect(row.locator(".metric-name", has_text="onerror")).to_have_text(XSS_METRIC)
            await publish(dev, "xss-1", **{XSS_METRIC: 2.5})
            await expect(
                row.locator(".metric", has_text="onerror").locator(".metric-value")
            ).to_have_text("2.5", timeout=WAIT_MS)
            await assert_nothing_ran(page, response)

            # The device page: name, chart and tile of the metric, a result and an error.
            response = await open_page(page, gw, "/devices/xss-1/")
            await expect(page.locator("#device-name")).to_have_text(XSS_NAME)
            await expect(page.locator("#conn")).to_have_text("live")
            await expect(page.locator(".tile-name", has_text="onerror")).to_have_text(XSS_METRIC)
            for name, shown in (("status", ".cmd-result"), ("fail", ".cmd-error")):
                await page.fill("#command-name", name)
                await page.fill("#command-args", json.dumps({"note": XSS_NAME}))
                await page.click("#command-form button[type=submit]")
                item = page.locator("#commands li").first
                await expect(item.locator(".cmd-name")).to_have_text(name)
                await expect(item.locator(shown)).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator("#commands .cmd-error").first).to_have_text(XSS_ERROR)
            await expect(page.locator("#commands .cmd-result").first).to_contain_text(XSS_RESULT)
            await assert_nothing_ran(page, response)

            # Reloaded: the server renders the same text into the template.
            response = await open_page(page, gw, "/devices/xss-1/")
            await expect(page.locator("#commands .cmd-error").first).to_have_text(XSS_ERROR)
            await expect(page.locator("#commands .cmd-result").first).to_contain_text(XSS_RESULT)
            args = page.locator("#commands .cmd-args").first
            await expect(args).to_have_text(json.dumps({"note": XSS_NAME}))
            assert await page.title() == f"{XSS_NAME} · Gateway"
            await expect(page.locator("#conn")).to_have_text("live")
            await assert_nothing_ran(page, response)

            # The admin's lists and detail pages, under the same policy.
            response = await open_page(page, gw, "/admin/devices/device/")
            await expect(page.locator("#result_list")).to_contain_text(XSS_NAME)
            await assert_nothing_ran(page, response)
            response = await open_page(page, gw, "/admin/devices/command/")
            in_args = json.dumps(XSS_NAME)[1:-1]  # the args column shows JSON
            await expect(page.locator("#result_list")).to_contain_text(in_args)
            await expect(page.locator("#changelist-filter")).to_contain_text("By created by")
            await assert_nothing_ran(page, response)
            await page.locator("#result_list tbody th a").first.click()
            await expect(page.locator("#content h1")).to_be_visible()
            assert await page.evaluate("window.__xss") is None
            assert await page.evaluate("window.__csp") == []
            response = await open_page(page, gw, "/admin/devices/device/xss-1/change/")
            await expect(page.locator(".field-name .readonly")).to_have_text(XSS_NAME)
            await assert_nothing_ran(page, response)
            assert errors == []


async def test_the_policy_stops_an_inline_handler_that_got_through(stack):
    """Were escaping ever missed, the browser would still refuse to run an injected handler."""
    _, gw = stack
    async with logged_in_page(gw) as (page, errors):
        response = await open_page(page, gw, "/")
        await assert_nothing_ran(page, response)
        injected = """<img src="/no-such-image" onerror="window.__xss='csp'">"""
        await page.evaluate(
            "(html) => document.querySelector('main').insertAdjacentHTML('beforeend', html)",
            injected,
        )
        await page.wait_for_function("window.__csp.length > 0", timeout=WAIT_MS)
        violations = await page.evaluate("window.__csp")
        assert any(v.startswith("script-src") for v in violations), violations
        assert await page.evaluate("window.__xss") is None
        # What the injection itself causes (the refusal reported, its image missing), no more.
        missing_image = f"HTTP 404 GET {gw.base_url}/no-such-image"
        assert [e for e in errors if "Content Security Policy" not in e] == [missing_image]


async def test_every_html_page_carries_the_policy(stack):
    """Login, dashboard and admin answer with the policy header (no meta tag needed)."""
    _, gw = stack
    cookie = await asyncio.to_thread(gw.login, "ops", PASSWORD)
    for path, who in [
        ("/accounts/login/", None),
        ("/admin/login/", None),
        ("/", cookie),
        ("/admin/", cookie),
        ("/admin/devices/command/", cookie),
    ]:
        policy = await asyncio.to_thread(policy_of, gw, path, who)
        assert "default-src 'self'" in policy and "script-src 'self'" in policy, (path, policy)
        assert "frame-ancestors 'none'" in policy and "unsafe" not in policy, (path, policy)


def policy_of(gw: GatewayProcess, path: str, cookie: str | None) -> str:
    import urllib.request

    request = urllib.request.Request(gw.base_url + path, headers={"Cookie": cookie or ""})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and response.url.endswith(path), (path, response.url)
        return response.headers.get("Content-Security-Policy", "")
