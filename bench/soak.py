"""``python -m bench soak [--minutes N]``: a long steady load with a broker and a Redis restart.

Starts its own mosquitto and redis-server and ``manage.py rungateway`` (channels-redis layer,
fresh SQLite database); 1,000 simulated devices publish 500 msg/s in all, the first
``--qos1-devices`` of them at QoS 1 (a counter ``n``), the rest at QoS 0. A third of the way in
the broker is restarted, two thirds in Redis is killed and restarted (each down a few seconds).
The gateway's RSS is sampled every few seconds. At the end, every QoS 1 reading the broker
acknowledged must be stored: prints RSS start/end/max, growth after warm-up, and the lost
count; exits 1 if RSS grew more than ``--max-growth`` % after warm-up or a QoS 1 reading is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import psutil

from tests.support.gateway import GatewayProcess
from tests.support.servers import Mosquitto, Redis

CLIENTS = 10  # MQTT connections the devices are spread over (topics name the device)
OUTAGE_SECONDS = 3.0
SAMPLE_SECONDS = 5.0
#: The devices' MQTT clients: connection resets during the broker restart are expected.
DEVICE_LOG = logging.getLogger("bench.soak.devices")
DEVICE_LOG.setLevel(logging.CRITICAL)


@dataclass
class Tally:
    """QoS 1 readings the broker acknowledged, per device, and the RSS samples."""

    acked: dict[str, dict[int, float]] = field(default_factory=dict)  # device → n → when (s)
    sent: int = 0
    failed: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    events: list[str] = field(default_factory=list)


async def device_client(
    index: int, port: int, devices: list[str], qos1: set[str], rate: float, stop: asyncio.Event,
    tally: Tally, started: float,
) -> None:  # fmt: skip
    """One MQTT connection publishing for `devices` round-robin at `rate` msg/s, reconnecting."""
    counters = dict.fromkeys(devices, 0)
    period = 1.0 / rate
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    turn = 0
    while not stop.is_set():
        try:
            client = aiomqtt.Client(
                "127.0.0.1", port, identifier=f"soak-{index}", logger=DEVICE_LOG
            )
            async with client:
                while not stop.is_set():
                    device = devices[turn % len(devices)]
                    turn += 1
                    counters[device] += 1
                    n = counters[device]
                    body = json.dumps({"n": n, "value": round(random.uniform(0, 100), 2)})
                    qos = 1 if device in qos1 else 0
                    await client.publish(f"devices/{device}/telemetry", body, qos=qos)
                    tally.sent += 1
                    if qos:
                        tally.acked.setdefault(device, {})[n] = time.monotonic() - started
                    next_at += period
                    delay = next_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    else:
                        next_at = loop.time()  # behind: don't burst to catch up
        except aiomqtt.MqttError:
            tally.failed += 1  # the broker went away: that publish was not acknowledged
            await asyncio.sleep(0.5)
            next_at = loop.time()


async def sample_rss(pid: int, started: float, stop: asyncio.Event, tally: Tally) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        tally.rss.append((time.monotonic() - started, process.memory_info().rss / 1e6))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


def stored_counters(db: Path, devices: set[str]) -> dict[str, set[int]]:
    """The distinct `n` values stored per QoS 1 device (read straight from the SQLite file)."""
    out: dict[str, set[int]] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        rows = conn.execute(
            "SELECT device_id, value FROM devices_reading WHERE metric = 'n'"
        ).fetchall()
    for device, value in rows:
        if device in devices:
            out.setdefault(device, set()).add(int(value))
    return out


async def soak(minutes: float, devices: int, qos1_devices: int, rate: float) -> tuple[Tally, int]:
    """Run the soak; returns the tally and the number of QoS 1 readings lost."""
    seconds = minutes * 60
    names = [f"soak-{i:04d}" for i in range(devices)]
    qos1 = set(names[:qos1_devices])
    tally = Tally()
    # keep_state: the broker keeps sessions and queued QoS 1 messages across its restart, as
    # a deployed one does (the test fixture's default forgets them; tests/support/servers.py).
    with Mosquitto(keep_state=True) as broker, Redis() as redis:
        env = {"GATEWAY_COMMAND_RATE_COUNT": "1000000"}
        gw = GatewayProcess(broker.url, redis_url=redis.url, env=env, log_level="WARNING")
        await asyncio.to_thread(gw.__enter__)
        try:
            stop = asyncio.Event()
            started = time.monotonic()
            sampler = asyncio.create_task(sample_rss(gw.proc.pid, started, stop, tally))
            groups = [names[i::CLIENTS] for i in range(CLIENTS)]
            tasks = [
                asyncio.create_task(
                    device_client(i, broker.port, group, qos1, rate / CLIENTS, stop, tally, started)
                )
                for i, group in enumerate(groups)
            ]
            await asyncio.sleep(seconds / 3)
            tally.events.append(f"{time.monotonic() - started:.0f}s broker restart")
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(OUTAGE_SECONDS)
            await asyncio.to_thread(broker.start)
            await asyncio.sleep(seconds / 3 - OUTAGE_SECONDS)
            tally.events.append(f"{time.monotonic() - started:.0f}s Redis kill + restart")
            redis.kill()
            await asyncio.sleep(OUTAGE_SECONDS)
            await asyncio.to_thread(redis.start)
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
            stop.set()
            await asyncio.gather(*tasks, sampler)

            # Every acknowledged QoS 1 reading should reach the database; wait for it to settle.
            db = Path(gw.database_url.removeprefix("sqlite:///"))
            expected = sum(len(v) for v in tally.acked.values())
            deadline = time.monotonic() + 60
            while True:
                stored = await asyncio.to_thread(stored_counters, db, qos1)
                missing = [
                    (when, d, n)
                    for d, acked in tally.acked.items()
                    for n, when in acked.items()
                    if n not in stored.get(d, ())
                ]
                lost = len(missing)
                if lost == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(2)
            print(f"QoS 1 readings acknowledged by the broker: {expected}, lost: {lost}")
            for when, d, n in sorted(missing)[:20]:
                print(f"  lost: {d} n={n}, published at {when:.1f} s")
        finally:
            await asyncio.to_thread(gw.__exit__, None, None, None)
    return tally, lost


def rss_figures(tally: Tally, warmup: float) -> tuple[float, float, float, float]:
    """(start, end, max, growth % of the end over the first sample after warm-up)."""
    samples = [mb for t, mb in tally.rss]
    after = [mb for t, mb in tally.rss if t >= warmup] or samples
    base, end = after[0], sum(after[-3:]) / len(after[-3:])
    return samples[0], end, max(samples), (end - base) / base * 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--qos1-devices", type=int, default=100, metavar="N")
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s in all")
    parser.add_argument("--max-growth", type=float, default=10.0, metavar="PERCENT")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds (default: a fifth of the run, ≥30)"
    )
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(30.0, args.minutes * 12)
    tally, lost = asyncio.run(soak(args.minutes, args.devices, args.qos1_devices, args.rate))
    start, end, peak, growth = rss_figures(tally, warmup)
    elapsed = tally.rss[-1][0] if tally.rss else 0.0
    print(
        f"soak {args.minutes:g} min, {args.devices} devices ({args.qos1_devices} at QoS 1), "
        f"{tally.sent} published ({tally.sent / max(elapsed, 1):.0f}/s), "
        f"{tally.failed} publishes failed during the broker outage; {'; '.join(tally.events)}"
    )
    print(
        f"RSS start {start:.1f} MB, end {end:.1f} MB, max {peak:.1f} MB; growth after "
        f"{warmup:.0f} s warm-up {growth:+.1f} % (limit {args.max_growth:g} %); lost {lost}"
    )
    ok = growth <= args.max_growth and lost == 0
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
