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


def payload(seq: int, ts: float) -> bytes:
    """One telemetry message: two metrics (``n`` = per-device sequence) and the send time."""
    return orjson.dumps({"n": seq, "temperature": 21.5, "ts": ts})


VALUES_PER_MESSAGE = 2  # metrics stored per `payload()` (n, temperature)


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
        info = client.publish(topics[i], payload(seqs[i], ts), qos=args.qos)
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
    """Subscribe like the gateway does, parse every payload, stop after `count` messages."""
    import aiomqtt

    host, port = _host_port(args.url)
    latencies: list[float] = []
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
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
    sub_bare = sub.add_parser("bare")
    sub_bare.add_argument("--url", required=True)
    sub_bare.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    result = publish(args) if args.cmd == "publish" else asyncio.run(bare(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
