"""``python -m bench fleet``: the dashboard at 10,000 devices beside the same at 100.

For each fleet size: a fresh ``rungateway`` (SQLite, in-memory layer) with that many known
devices seeded (`tests.support.fleet.seed_fleet`: two readings of two metrics each, every 50th
offline), a logged-in Chromium, and:

- **page** `/`: bytes and server time (median of 5 GETs);
- **ready**: milliseconds from navigation start until the device list shows its rows
  (`performance.now()` in the page), and the first WebSocket frame's (snapshot's) bytes;
- **search**: milliseconds from typing a device's id into the search box until its row is the
  list's only row (measured in the page, polled per animation frame);
- **under load**: while ``bench.workers publish`` sends 1,000 msg/s round-robin over the whole
  fleet for `--seconds`, the longest main-thread task (a `longtask` PerformanceObserver) and
  the page's answer time to a trivial script call every 100 ms (median, max);
- **memory**: the page's JS heap and DOM element count after the load.

Targets: page < 0.5 MB, ready ≤ 1.5 s, search < 300 ms, no task over 250 ms, the
same at 100 devices.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from bench.harness import publish_args, run_worker, start_gateway
from bench.report import machine
from tests.support.browser import launch
from tests.support.fleet import seed_fleet
from tests.support.servers import Mosquitto

PASSWORD = "bench-pass-1234"
RATE = 1000.0
#: Collects the page's long tasks from the start (the observer must exist before they happen).
LONG_TASKS = """
window.__longTasks = [];
try {
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__longTasks.push(e.duration);
  }).observe({ type: "longtask", buffered: true });
} catch (err) {}
"""
READY = """() => {
  const rows = document.querySelectorAll('#devices tbody tr').length;
  const range = document.getElementById('range');
  return rows > 0 && range && range.textContent !== 'loading…';
}"""
SEARCH = """async (id) => {
  const input = document.getElementById('filter');
  const t0 = performance.now();
  input.value = id;
  input.dispatchEvent(new Event('input'));
  for (;;) {
    await new Promise((resolve) => requestAnimationFrame(resolve));
    const rows = document.querySelectorAll('#devices tbody tr');
    if (rows.length === 1 && rows[0].dataset.device === id) return performance.now() - t0;
  }
}"""


async def measure(size: int, seconds: float, url: str) -> dict[str, Any]:
    """Every figure of one fleet size (module docstring)."""
    from playwright.async_api import async_playwright

    gw = await asyncio.to_thread(start_gateway, url)
    try:
        await asyncio.to_thread(gw.create_user, "bench", PASSWORD)
        ids = await asyncio.to_thread(seed_fleet, gw, size, "fleet", 50)
        cookie = await asyncio.to_thread(gw.login, "bench", PASSWORD)
        out: dict[str, Any] = {}
        times, body = [], ""
        for _ in range(5):
            t0 = time.perf_counter()
            _, body = await asyncio.to_thread(gw.http_get, "/", cookie)
            times.append((time.perf_counter() - t0) * 1000)
        out["page_kb"] = len(body.encode()) / 1024
        out["page_ms"] = statistics.median(times)
        async with async_playwright() as pw:
            browser = await launch(pw)
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            await context.add_cookies(
                [
                    {"name": k, "value": v, "url": gw.base_url}
                    for k, v in (part.split("=", 1) for part in cookie.split("; "))
                ]
            )
            await context.add_init_script(LONG_TASKS)
            page = await context.new_page()
            frames: list[int] = []
            page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(len(f))))
            await page.goto(gw.base_url + "/")
            await page.wait_for_function(READY, polling="raf", timeout=30_000)
            out["ready_ms"] = await page.evaluate("performance.now()")
            out["snapshot_kb"] = frames[0] / 1024 if frames else float("nan")
            out["rows"] = await page.locator("#devices tbody tr").count()
            target = ids[len(ids) * 7 // 9]
            out["search_ms"] = await page.evaluate(SEARCH, target)
            await page.fill("#filter", "")  # back to the full list (first page)
            await page.wait_for_function(
                "() => document.querySelectorAll('#devices tbody tr').length > 1", timeout=30_000
            )
            await page.evaluate("window.__longTasks = []")
            load = asyncio.create_task(
                run_worker(
                    *publish_args(
                        url, prefix="fleet", devices=size, count=int(RATE * seconds), rate=RATE
                    )
                )
            )
            round_trips = []
            while not load.done():
                t0 = time.perf_counter()
                await page.evaluate("1")
                round_trips.append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.1)
            await load
            tasks = await page.evaluate("window.__longTasks")
            out["longtask_max_ms"] = max(tasks, default=0.0)
            out["longtasks"] = len(tasks)
            out["rt_median_ms"] = statistics.median(round_trips)
            out["rt_max_ms"] = max(round_trips)
            out["heap_mb"] = await page.evaluate(
                "performance.memory ? performance.memory.usedJSHeapSize / 1048576 : NaN"
            )
            out["dom_nodes"] = await page.evaluate("document.getElementsByTagName('*').length")
            out["rows_after"] = await page.locator("#devices tbody tr").count()
            await browser.close()
        return out
    finally:
        await asyncio.to_thread(gw.__exit__, None, None, None)


ROWS = [
    ("page `/` size", "page_kb", "{:.1f} KB", "< 500 KB"),
    ("page `/` server time (median of 5)", "page_ms", "{:.0f} ms", ""),
    ("device list ready after navigation", "ready_ms", "{:.0f} ms", "≤ 1500 ms"),
    ("first frame (snapshot)", "snapshot_kb", "{:.1f} KB", ""),
    ("table rows in the DOM", "rows", "{}", "bounded"),
    ("search: one device shown", "search_ms", "{:.0f} ms", "< 300 ms"),
    ("longest main-thread task at 1,000 msg/s", "longtask_max_ms", "{:.0f} ms", "≤ 250 ms"),
    ("long tasks (> 50 ms) at 1,000 msg/s", "longtasks", "{}", ""),
    ("script round trip at 1,000 msg/s, median", "rt_median_ms", "{:.1f} ms", ""),
    ("script round trip at 1,000 msg/s, max", "rt_max_ms", "{:.0f} ms", "≤ 250 ms"),
    ("JS heap after the load", "heap_mb", "{:.1f} MB", "bounded"),
    ("DOM elements after the load", "dom_nodes", "{}", "bounded"),
]


def render(results: dict[int, dict[str, Any]]) -> str:
    """One table: each figure at every fleet size, the smallest (the baseline) first."""
    sizes = sorted(results)
    header = ["figure", *(f"{n:,} devices" for n in sizes), "target"]
    lines = [header]
    for label, key, fmt, target in ROWS:
        lines.append([label, *(fmt.format(results[n][key]) for n in sizes), target])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = []
    for k, row in enumerate(lines):
        out.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


async def run(sizes: list[int], seconds: float) -> dict[int, dict[str, Any]]:
    with Mosquitto() as broker:
        return {n: await measure(n, seconds, broker.url) for n in sizes}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000, help="the large fleet (10,000)")
    parser.add_argument("--baseline", type=int, default=100, help="the small fleet (100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of 1,000 msg/s")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    started = time.monotonic()
    results = asyncio.run(run([args.baseline, args.devices], args.seconds))
    print(render(results))
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
