"""``python -m bench hostile``: an unaffected device's latency while hostile publishers attack.

One `rungateway` per attack (fresh database, in-memory layer) on its own mosquitto. A probe
device publishes one QoS 1 reading every 50 ms and a logged-in dashboard times each one; the
baseline is the same probe on the same gateway for the same time before the attack starts.
Each row: the probe's p50/p99 during the attack beside the baseline, the gateway's RSS growth,
and what the attack cost in rejections (docs/reliability.md "Hostile publishers").
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.report import Table, machine
from tests.support.gateway import GatewayProcess
from tests.support.hostile import (
    Probe,
    births,
    invalid_ids,
    invented_metrics,
    new_ids,
    publish_all,
    rejected,
    rss,
)
from tests.support.servers import Mosquitto

PASSWORD = secrets.token_urlsafe(12)
TARGET = 1.0  # seconds: the unaffected device's p99 during an attack (docs/reliability.md)


Attack = tuple[str, dict[str, str], Callable[[int], Any], str, int, int]


def attacks(scale: float) -> list[Attack]:
    """(row, gateway env, attack coroutine factory, rejection reason, messages, known devices
    first) per attack."""
    n = max(1, int(5000 * scale))
    flood = max(1, int(2000 * scale))
    metrics = max(2, int(200 * scale))
    storm = max(2, int(262 * scale))
    return [
        (
            f"{n:,} publishes to 60,000-character device ids",
            {},
            lambda port: publish_all(port, "hostile", invalid_ids(n, 60_000)),
            "bad_device_id",
            n,
            0,
        ),
        (
            f"{flood:,} new device ids at once (admission 50/s)",
            {},
            lambda port: publish_all(port, "flood", new_ids(flood, "flood")),
            "not_admitted",
            flood,
            0,
        ),
        (
            f"{metrics} messages of 256 new metric names, one device",
            {},
            lambda port: publish_all(port, "inventor", invented_metrics(metrics, 256)),
            "too_many_metrics",
            metrics,
            0,
        ),
        (
            f"{storm} Home Assistant births, 2,000 devices",
            {"GATEWAY_NEW_DEVICES_PER_SECOND": "10000"},
            lambda port: publish_all(port, "storm", births(storm)),
            "",
            storm,
            2000,  # the devices whose documents a birth republishes
        ),
    ]


async def measure(
    env: dict[str, str], attack: Callable[[int], Any], reason: str, fleet: int, seconds: float
) -> dict[str, Any]:
    """Baseline window, then the attack with the probe running; the figures of one row."""
    with Mosquitto() as broker, GatewayProcess(broker.url, env=env, log_level="WARNING") as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        if fleet:
            await publish_all(broker.port, "fleet", new_ids(fleet, "known"))
            await asyncio.sleep(3.0)
        before = rejected(gw, reason) if reason else 0.0
        async with Probe(gw, broker.port, cookie).running() as probe:
            await asyncio.sleep(seconds)
            base = (probe.quantile(50), probe.quantile(99))
            probe.reset()
            rss_before = rss(gw)
            started = time.monotonic()
            await attack(broker.port)
            await asyncio.sleep(max(1.0, seconds - (time.monotonic() - started)))
            during = (probe.quantile(50), probe.quantile(99))
            growth = rss(gw) - rss_before
        refused = rejected(gw, reason) - before if reason else 0.0
    return {"base": base, "during": during, "rss": growth, "refused": refused}


def add_row(table: Table, name: str, figures: dict[str, Any], reason: str, sent: int) -> None:
    (b50, b99), (d50, d99) = figures["base"], figures["during"]
    cost = f", {figures['refused']:,.0f}/{sent:,} {reason}" if reason else ""
    table.add(
        name,
        f"p50 {d50 * 1000:.1f} ms, p99 {d99 * 1000:.1f} ms; RSS +{figures['rss'] / 2**20:.1f} MiB"
        f"{cost}",
        f"no attack: p50 {b50 * 1000:.1f} ms, p99 {b99 * 1000:.1f} ms",
        f"{d99 / b99:.1f}× p99" if b99 else "",
        f"p99 ≤ {TARGET:g} s",
        d99 <= TARGET,
    )


async def run(scale: float, seconds: float) -> Table:
    table = Table()
    for name, env, attack, reason, sent, fleet in attacks(scale):
        figures = await measure(env, attack, reason, fleet, seconds)
        add_row(table, name, figures, reason, sent)
    return table


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench hostile", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of each attack, 2 s")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    started = time.monotonic()
    table = asyncio.run(run(0.1 if args.quick else 1.0, 2.0 if args.quick else 5.0))
    print(table.render())
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
