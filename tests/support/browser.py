"""Debian's Chromium for the browser tests (Playwright cannot download browsers here)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def launch(playwright: Any) -> Any:
    """A headless Debian Chromium with the flags this sandbox needs."""
    return await playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
    )


#: Not-found answers a page may meet and retries: a device (its page, its history) that the
#: gateway has not stored yet. Any other answer of 400 or more, and every 5xx, is a problem.
NOT_STORED_YET = re.compile(r"/devices/[^/]+/$|/api/devices/[^/]+/telemetry\?")


def watch(page: Any, problems: list[str]) -> None:
    """Record on `problems` what must never happen on a page: a script error, a dialog, a
    CSP report, a console error, an HTTP answer of 400 or more (404 `NOT_STORED_YET` aside)."""
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    page.on("console", lambda msg: _console(msg, problems))
    page.on("response", lambda response: _response(response, problems))


def _console(msg: Any, problems: list[str]) -> None:
    # Chromium also logs every 4xx/5xx load as a console error: `_response` judges those.
    if "Content Security" in msg.text:
        problems.append(msg.text)
    elif msg.type == "error" and "the server responded with a status of" not in msg.text:
        problems.append(f"{msg.text} ({(msg.location or {}).get('url')})")


def _response(response: Any, problems: list[str]) -> None:
    if response.status < 400:
        return
    if response.status == 404 and NOT_STORED_YET.search(response.url):
        return
    problems.append(f"HTTP {response.status} {response.request.method} {response.url}")


@contextlib.asynccontextmanager
async def watched_page(
    base_url: str,
    cookie: str | None,
    *,
    viewport: dict[str, int] | None = None,
    init_script: str | None = None,
    timezone_id: str | None = None,
) -> AsyncIterator[tuple[Any, list[str]]]:
    """A Chromium page carrying `cookie` (a `Cookie` header of a logged-in session, or None)
    for `base_url`, watched (`watch`), and the list its problems go to."""
    from playwright.async_api import async_playwright

    problems: list[str] = []
    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            options: dict[str, Any] = {"viewport": viewport} if viewport else {}
            if timezone_id:
                options["timezone_id"] = timezone_id  # the browser's zone, as a user's
            context = await browser.new_context(**options)
            if cookie:
                await context.add_cookies(
                    [
                        {"name": k, "value": v, "url": base_url}
                        for k, v in (part.split("=", 1) for part in cookie.split("; "))
                    ]
                )
            if init_script:
                await context.add_init_script(init_script)
            page = await context.new_page()
            watch(page, problems)
            yield page, problems
        finally:
            await browser.close()


async def open_when_stored(page: Any, url: str, wait: float = 10.0) -> Any:
    """Go to `url`, again while it does not answer 200 (a device page before the device is
    stored answers 404); the 200 response."""
    deadline = time.monotonic() + wait
    while True:
        response = await page.goto(url)
        if response is not None and response.status == 200:
            return response
        assert time.monotonic() < deadline, f"{url} answered {response and response.status}"
        await asyncio.sleep(0.2)
