"""The bench's helper processes: a paho publisher and a bare aiomqtt subscriber (the limit).

Run as ``python -m bench.workers publish …`` or ``python -m bench.workers bare …``; each prints
one JSON line with its result on stdout (``bare`` first prints ``ready`` once subscribed).
They run as separate processes so their CPU is never charged to the process being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import orjson


def device_id(prefix: str, index: int) -> str:
    """The bench's device ids: ``<prefix>-00001`` (valid per docs/interface.md §3)."""
    return f"{prefix}-{index:05d}"


# Metrics a message carries beyond ``n`` and ``temperature`` with ``--metrics`` > 2: the
# readings of a Tasmota-like sensor STATE (up to 18 more, so 20 values per message at most).
EXTRA_METRICS = (
    ("humidity", 48.2), ("pressure", 1013.25), ("voltage", 229.8), ("current", 0.412),
    ("power", 87.0), ("apparent_power", 94.7), ("reactive_power", 37.4), ("factor", 0.92),
    ("energy_today", 1.284), ("energy_total", 413.92), ("rssi", -61), ("illuminance", 312),
    ("co2", 641), ("pm25", 7.5), ("battery", 97), ("uptime", 86_400), ("dewpoint", 10.1),
    ("heap", 24),
)  # fmt: skip


def payload(seq: int, ts: float, metrics: int = 2) -> bytes:
    """One telemetry message: `metrics` metrics (``n`` = per-device sequence, ``temperature``,
    then `EXTRA_METRICS`) and the send time."""
    body = {"n": seq, "temperature": 21.5, **dict(EXTRA_METRICS[: metrics - 2]), "ts": ts}
    return orjson.dumps(body)


VALUES_PER_MESSAGE = 2  # metrics stored per `payload()` by default (n, temperature)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def publish(args: argparse.Namespace) -> dict[str, Any]:
    """Blast (`rate` 0) or pace `count` messages round-robin over `devices` device topics."""
    import paho.mqtt.client as mqtt

    host, port = _host_port(args.url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    topics = [args.topic.format(id=device_id(args.prefix, i)) for i in range(args.devices)]
    seqs = [args.first_seq] * args.devices
    start = time.time()
    sent_at: list[float] = []  # the k-th message's `ts`, kept with --times
    info = None
    tick = 0.01
    per_tick = max(1, round(args.rate * tick)) if args.rate else 0
    next_at = time.monotonic()
    for k in range(args.count):
        i = k % args.devices
        seqs[i] += 1
        ts = time.time()
        if args.times:
            sent_at.append(ts)
        info = client.publish(topics[i], payload(seqs[i], ts, args.metrics), qos=args.qos)
        if per_tick and (k + 1) % per_tick == 0:
            next_at += tick
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    if info is not None:
        info.wait_for_publish(timeout=120)
    end = time.time()
    client.disconnect()
    client.loop_stop()
    result: dict[str, Any] = {"start": start, "end": end, "sent": args.count}
    if args.times:
        result["times"] = sent_at
    return result


async def bare(args: argparse.Namespace) -> dict[str, float]:
    """Subscribe like the gateway does, parse every payload, stop after `count` messages.

    ``--protocol v5`` pays paho's MQTT v5 property parsing on every PUBLISH, as the gateway's
    v5 connection would without its fast path (gateway/mqtt/tuning.py); ``v311`` does not."""
    import aiomqtt

    host, port = _host_port(args.url)
    latencies: list[float] = []
    protocol = aiomqtt.ProtocolVersion.V5 if args.protocol == "v5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(host, port, protocol=protocol) as client:
        await client.subscribe("devices/+/telemetry", qos=1)
        print("ready", flush=True)
        cpu0 = time.process_time()
        count = 0
        first = None
        async for message in client.messages:
            data = orjson.loads(message.payload)
            if not isinstance(data, dict):
                continue
            now = time.time()
            if first is None:
                first = now
            latencies.append(now - data["ts"])
            count += 1
            if count >= args.count:
                break
    cpu = time.process_time() - cpu0
    latencies.sort()
    return {
        "cpu": cpu,
        "first": first or 0.0,
        "done": time.time(),
        "count": count,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max": latencies[-1],
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the worker command line, run it, print its JSON result."""
    parser = argparse.ArgumentParser(prog="python -m bench.workers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--url", required=True)
    pub.add_argument("--devices", type=int, default=100)
    pub.add_argument("--prefix", default="bench")
    pub.add_argument("--count", type=int, required=True)
    pub.add_argument("--qos", type=int, default=0)
    pub.add_argument("--rate", type=float, default=0.0, help="messages/s (0: as fast as possible)")
    pub.add_argument("--first-seq", type=int, default=0)
    pub.add_argument("--topic", default="devices/{id}/telemetry", help="{id}: the device id")
    pub.add_argument("--times", action="store_true", help="report every message's send time")
    pub.add_argument("--metrics", type=int, default=2, choices=range(2, 21), metavar="2..20")
    sub_bare = sub.add_parser("bare")
    sub_bare.add_argument("--url", required=True)
    sub_bare.add_argument("--count", type=int, required=True)
    sub_bare.add_argument("--protocol", choices=("v5", "v311"), default="v5")
    args = parser.parse_args(argv)
    result = publish(args) if args.cmd == "publish" else asyncio.run(bare(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
