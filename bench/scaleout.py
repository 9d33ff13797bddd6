"""``python -m bench scaleout [--messages N] [--devices D]``: ingest with 1 vs 2 MQTT bridges.

Starts mosquitto, redis-server and a scratch PostgreSQL database, then for 1 and for 2
``manage.py runmqtt --shared-group bench`` bridges (channels-redis, PostgreSQL) blasts N
telemetry messages from D devices with the bench's separate publisher process, at QoS 0 and
QoS 1, and times them until every value is in PostgreSQL. Prints one table: messages/s, the
bridges' CPU per 1000 messages, and what was stored against what was sent. The figures depend
on the core count (printed first): two bridges can only help when a core is free for each.
docs/scale-out.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from typing import Any

from bench.harness import Meter, publish_args, run_worker
from bench.report import machine
from bench.workers import VALUES_PER_MESSAGE
from tests.support.gateway import GatewayFailed, GatewayProcess, postgres_database
from tests.support.servers import Mosquitto, Redis

STALL_SECONDS = 15.0  # no new rows for this long: count what arrived (QoS 0 may drop)


def stored(database_url: str, prefix: str) -> int:
    """Values stored in PostgreSQL for the devices of one run."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM devices_reading WHERE device_id LIKE %s", (f"{prefix}-%",)
        ).fetchone()
    return int(row[0])


async def until_stored(database_url: str, prefix: str, target: int) -> tuple[int, float]:
    """Poll until `target` values are stored (or nothing new for STALL_SECONDS)."""
    last, last_change = -1, time.monotonic()
    while True:
        count = await asyncio.to_thread(stored, database_url, prefix)
        now = time.monotonic()
        if count != last:
            last, last_change = count, now
        if count >= target or now - last_change > STALL_SECONDS:
            return count, time.time()
        await asyncio.sleep(0.05)


async def run_bridges(
    broker: Mosquitto, redis_url: str, database_url: str, bridges: int, messages: int, devices: int
) -> list[dict[str, Any]]:
    """Start `bridges` bridges in one shared group; one ingest run per QoS; stop them."""
    procs = [
        GatewayProcess(
            broker.url,
            command="runmqtt",
            args=["--shared-group", "bench"],
            database_url=database_url,
            redis_url=redis_url,
            env={"GATEWAY_ID": "bench-scaleout"},
            ready_log="MQTT bridge subscribed",
        )
        for _ in range(bridges)
    ]
    rows = []
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start, False) for p in procs))
        meters = [Meter(p.proc.pid) for p in procs]
        for qos in (0, 1):
            prefix = f"so{bridges}q{qos}-{secrets.token_hex(2)}"
            cpu0 = sum(m.cpu() for m in meters)
            sent = await run_worker(
                *publish_args(broker.url, prefix=prefix, devices=devices, count=messages, qos=qos)
            )
            target = messages * VALUES_PER_MESSAGE
            count, done = await until_stored(database_url, prefix, target)
            seconds = done - sent["start"]
            rows.append(
                {
                    "bridges": bridges,
                    "qos": qos,
                    "messages": messages,
                    "seconds": seconds,
                    "rate": count / VALUES_PER_MESSAGE / seconds,
                    "cpu_per_1k": (sum(m.cpu() for m in meters) - cpu0) / messages * 1000,
                    "stored": count,
                    "expected": target,
                }
            )
            print(f"  {bridges} bridge(s), QoS {qos}: {rows[-1]['rate']:.0f} msg/s", flush=True)
    finally:
        for p in procs:
            try:
                await asyncio.to_thread(p.stop)
            except GatewayFailed as exc:
                print(f"warning: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
            p._cleanup()
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The table, with each 2-bridge rate against the 1-bridge rate at the same QoS."""
    one = {r["qos"]: r["rate"] for r in rows if r["bridges"] == 1}
    lines = [
        "| bridges | QoS | messages | msg/s | vs 1 bridge | bridges' CPU s / 1k msg | stored |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["rate"] / one[r["qos"]] if one.get(r["qos"]) else float("nan")
        lines.append(
            f"| {r['bridges']} | {r['qos']} | {r['messages']} | {r['rate']:.0f} | {ratio:.2f}x "
            f"| {r['cpu_per_1k']:.2f} | {r['stored']}/{r['expected']} values |"
        )
    return "\n".join(lines)


async def run(messages: int, devices: int) -> list[dict[str, Any]]:
    """1 then 2 bridges on one broker, Redis and PostgreSQL database."""
    rows: list[dict[str, Any]] = []
    with Mosquitto() as broker, Redis() as redis, postgres_database() as database_url:
        migrate = GatewayProcess(broker.url, database_url=database_url)
        try:
            await asyncio.to_thread(migrate.manage, "migrate", "--no-input", "-v", "0")
        finally:
            migrate._cleanup()
        for bridges in (1, 2):
            rows += await run_bridges(broker, redis.url, database_url, bridges, messages, devices)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench scaleout", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="per run (default 20000)")
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    started = time.monotonic()
    rows = asyncio.run(run(args.messages, args.devices))
    print(render(rows))
    print(f"(scale-out run, {time.monotonic() - started:.0f} s)")
    return 0
