"""Device → dashboard latency at 1,000 msg/s (50 devices × 20 Hz, QoS 0), per reading.

Each row is one gateway (SQLite or PostgreSQL, in-memory layer or channels-redis) with one
logged-in dashboard WebSocket, fed by a paced publisher process sending one message every
millisecond round-robin over the devices with `metrics` values each (``n``, the per-device
sequence, and ``v1`` …); beside it, the same publisher to a bare aiomqtt subscriber at the same
payload and rate, in the same run. A reading's latency is the arrival of the first dashboard
frame carrying its ``n`` (or a later one: frames coalesce) minus its send time. The gateway's
``gateway_event_loop_lag_seconds`` histogram is read before and after, so a row also says how
late the loop ran (bucket bounds: a histogram keeps no exact values), and the loop thread's
run-queue wait (Linux schedstat) says how much of a core the rest of the machine took from it.

Run with the rest (``python -m bench``, part ``latency``) or alone:
``python -m bench latency [--seconds 10] [--metrics 4 …] [--db sqlite] [--layer in-memory]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.harness import ROOT, Dashboard, start_gateway, stop_gateway
from bench.report import Table, machine
from bench.scenarios import per_reading, percentile
from bench.workers import device_id
from tests.support.gateway import GatewayProcess, postgres_database
from tests.support.servers import Mosquitto, Postgres, Redis

RATE = 1000.0  # messages per second
DEVICES = 50  # × 20 Hz each
METRICS = (4, 10, 15)
DBS = ("sqlite", "postgresql")
LAYERS = ("in-memory", "channels-redis")
TARGET_P99, TARGET_MAX = 0.010, 0.025  # docs/performance.md "The latency tail"
LAG = "gateway_event_loop_lag_seconds"


# --- the publisher and the bare subscriber (separate processes) ------------------------------
def message(seq: int, metrics: int, ts: float) -> bytes:
    """One telemetry payload: ``n`` = seq, then ``v1`` … up to `metrics` values, and ``ts``."""
    body: dict[str, float] = {"n": seq}
    for i in range(1, metrics):
        body[f"v{i}"] = round(20.0 + i + (seq % 97) / 10.0, 2)
    body["ts"] = ts
    return orjson.dumps(body)


def paced_publish(url: str, prefix: str, devices: int, count: int, metrics: int, rate: float,
                  first_seq: int) -> dict[str, Any]:  # fmt: skip
    """Send `count` messages evenly spaced at `rate`/s, round-robin over the devices, on one
    paho connection; every message's send time (a late message is sent at once, never bunched
    up behind a tick)."""
    import paho.mqtt.client as mqtt

    parts = urlsplit(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    # Nagle off, as the gateway, the broker's other clients and the simulator have it: else
    # each message waits for the broker's (delayed) ACK of the one before.
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=60)
    client.loop_start()
    if not connected.wait(30):  # messages sent before CONNACK would wait for it
        raise RuntimeError("the publisher did not connect")
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    topics = [f"devices/{device_id(prefix, i)}/telemetry" for i in range(devices)]
    seqs = [first_seq] * devices
    sent: list[float] = []
    start = time.monotonic()
    info = None
    for k in range(count):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        i = k % devices
        seqs[i] += 1
        ts = time.time()
        sent.append(ts)
        info = client.publish(topics[i], message(seqs[i], metrics, ts), qos=0)
    if info is not None:
        info.wait_for_publish(timeout=60)
    client.disconnect()
    client.loop_stop()
    return {"times": sent}


async def bare_subscriber(url: str, count: int) -> list[float]:
    """Subscribe as the gateway does, parse each payload; the latency of each of `count`."""
    import aiomqtt

    parts = urlsplit(url)
    out: list[float] = []
    async with aiomqtt.Client(
        parts.hostname or "127.0.0.1", parts.port or 1883, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.subscribe("devices/+/telemetry", qos=1)
        print("ready", flush=True)
        async for msg in client.messages:
            body = orjson.loads(msg.payload)
            out.append(time.time() - body["ts"])
            if len(out) >= count:
                return out
    return out


async def _worker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.latency", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )


async def _result(proc: asyncio.subprocess.Process, limit: float) -> Any:
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.read(), limit)
    await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.latency worker exited with {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def publish(url: str, prefix: str, count: int, metrics: int, first_seq: int = 0) -> list:
    """Run the paced publisher to completion; every message's send time."""
    proc = await _worker(
        "publish", url, prefix, str(DEVICES), str(count), str(metrics), str(RATE), str(first_seq)
    )
    return (await _result(proc, 60 + count / RATE))["times"]


async def bare(url: str, seconds: float, metrics: int) -> dict[str, float]:
    """The baseline: the paced publisher to a bare aiomqtt subscriber."""
    count = int(RATE * seconds)
    proc = await _worker("bare", url, str(count))
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"bare subscriber did not start: {line!r}")
        await publish(url, "bare", count, metrics)
        samples = await _result(proc, 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return summary(samples)


# --- the gateway -----------------------------------------------------------------------------
def summary(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of latencies (seconds) and their count."""
    return {
        "p50": percentile(list(samples), 0.5),
        "p90": percentile(list(samples), 0.9),
        "p99": percentile(list(samples), 0.99),
        "max": max(samples),
        "readings": len(samples),
    }


def lag_buckets(gateway: GatewayProcess) -> dict[float, float]:
    """The gateway's loop-lag histogram now: cumulative count per bucket bound (`le`)."""
    status, text = gateway.http_get("/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = {}
    for line in str(text).splitlines():
        if line.startswith(f"{LAG}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def queued(pid: int) -> float:
    """Seconds the process's main thread (the event loop's) has waited on a run queue for a
    core (Linux schedstat): what the rest of the machine took from the gateway."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def lag_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The bucket bound under which the fraction `q` of the samples taken in between fell;
    q = 1: the bound of the largest (inf when it is past the last bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if not total:
        return 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * total:
            return bound
    return math.inf


async def gateway_row(gateway: GatewayProcess, dash: Dashboard, prefix: str, seconds: float,
                      metrics: int) -> dict[str, float]:  # fmt: skip
    """Latency of every reading over `seconds` at RATE, after one warm-up message a device."""
    url = gateway.mqtt_url
    ids = [device_id(prefix, i) for i in range(DEVICES)]
    await publish(url, prefix, DEVICES, metrics)
    await asyncio.wait_for(dash.expect(dict.fromkeys(ids, 1)), 60)
    await asyncio.sleep(0.5)  # first contact's database work is done
    count = int(RATE * seconds) // DEVICES * DEVICES
    before = await asyncio.to_thread(lag_buckets, gateway)
    assert gateway.proc is not None
    queued0, started = queued(gateway.proc.pid), time.monotonic()
    dash.latency, dash.latency_prefix = [], prefix
    done = dash.expect(dict.fromkeys(ids, 1 + count // DEVICES))
    sent = await publish(url, prefix, count, metrics, first_seq=1)
    await asyncio.wait_for(done, 60)
    frames, dash.latency = dash.latency, None
    waited = (queued(gateway.proc.pid) - queued0) / (time.monotonic() - started)
    after = await asyncio.to_thread(lag_buckets, gateway)
    samples = per_reading(frames, sent, ids, first_seq=1)
    figures = summary(samples)
    figures.update(
        frames=len(frames),
        lag_p99=lag_quantile(before, after, 0.99),
        lag_max=lag_quantile(before, after, 1.0),
        runq_ms_per_s=1e3 * waited,
    )
    return figures


@contextlib.contextmanager
def database(db: str, postgres: Postgres | None) -> Iterator[str | None]:
    """A fresh database URL for one gateway (None: the harness's SQLite file)."""
    if db == "sqlite":
        yield None
        return
    assert postgres is not None
    with postgres_database(postgres.url) as url:
        yield url


async def measure(mqtt_url: str, db: str, layer: str, redis_url: str | None,
                  postgres: Postgres | None, seconds: float, metrics: Sequence[int],
                  experiments: Sequence[str] = ()) -> dict[int, dict[str, float]]:  # fmt: skip
    """One gateway (`db`, `layer`), one row per metrics count."""
    results = {}
    with database(db, postgres) as db_url:
        gateway = await asyncio.to_thread(
            start_gateway, mqtt_url, redis_url if layer == "channels-redis" else None,
            experiments, db_url,
        )  # fmt: skip
        try:
            await asyncio.to_thread(gateway.create_user, "bench", "bench-pass-1234")
            cookie = await asyncio.to_thread(gateway.login, "bench", "bench-pass-1234")
            async with Dashboard(gateway, cookie) as dash:
                for m in metrics:
                    results[m] = await gateway_row(gateway, dash, f"lat{m}", seconds, m)
        finally:
            await stop_gateway(gateway)
    return results


def _ms(seconds: float) -> str:
    return "∞" if math.isinf(seconds) else f"{seconds * 1000:.1f}"


def add_rows(table: Table, db: str, layer: str, results: dict[int, dict[str, float]],
             bare_results: dict[int, dict[str, float]]) -> None:  # fmt: skip
    """One table row per metrics count: gateway figures, the bare baseline beside them."""
    for m, res in results.items():
        base = bare_results.get(m)
        ok = res["p99"] <= TARGET_P99 and res["max"] <= TARGET_MAX
        table.add(
            f"latency 1,000 msg/s, {m} metrics/msg, {db}, {layer} (p50/p90/p99/max ms)",
            f"{_ms(res['p50'])} / {_ms(res['p90'])} / {_ms(res['p99'])} / {_ms(res['max'])}"
            f" ({res['readings']:,} readings, {res['frames']:,} frames); loop lag p99 ≤ "
            f"{_ms(res['lag_p99'])}, max ≤ {_ms(res['lag_max'])}; the loop's thread waited "
            f"{res['runq_ms_per_s']:.0f} ms/s for a core",
            f"bare aiomqtt {_ms(base['p50'])} / {_ms(base['p90'])} / {_ms(base['p99'])} / "
            f"{_ms(base['max'])}"
            if base
            else "n/a",
            "",
            "p99 ≤ 10 ms, max ≤ 25 ms",
            ok,
        )


async def run(mqtt_url: str, table: Table, seconds: float, metrics: Sequence[int] = METRICS,
              dbs: Sequence[str] = DBS, layers: Sequence[str] = LAYERS,
              experiments: Sequence[str] = ()) -> None:  # fmt: skip
    """Every (db, layer) gateway with a row per metrics count, each gateway's bare baselines
    measured right before it (no gateway running), so a row and its baseline share the
    machine's load of that minute."""
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(Redis()) if "channels-redis" in layers else None
        postgres = stack.enter_context(Postgres()) if "postgresql" in dbs else None
        for db in dbs:
            for layer in layers:
                bare_results = {m: await bare(mqtt_url, seconds, m) for m in metrics}
                results = await measure(
                    mqtt_url, db, layer, redis.url if redis else None, postgres, seconds,
                    metrics, experiments,
                )  # fmt: skip
                add_rows(table, db, layer, results, bare_results)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench latency …``: only the latency rows, on their own broker."""
    parser = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--metrics", type=int, action="append", help="values per message")
    parser.add_argument("--db", action="append", choices=DBS)
    parser.add_argument("--layer", action="append", choices=LAYERS)
    parser.add_argument("--experiment", action="append", default=[])
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    table = Table()
    started = time.monotonic()

    async def go() -> None:
        with Mosquitto() as broker:
            await run(broker.url, table, args.seconds, args.metrics or METRICS,
                      args.db or DBS, args.layer or LAYERS, args.experiment)  # fmt: skip

    asyncio.run(go())
    print(table.render())
    print(f"(latency run, {time.monotonic() - started:.0f} s)")
    return 0


def _worker_main(argv: list[str]) -> int:
    """The child processes: ``publish URL PREFIX DEVICES COUNT METRICS RATE FIRST_SEQ`` and
    ``bare URL COUNT``; each prints one JSON line."""
    if argv[0] == "publish":
        url, prefix, devices, count, metrics, rate, first = argv[1:8]
        result: Any = paced_publish(
            url, prefix, int(devices), int(count), int(metrics), float(rate), int(first)
        )
    else:
        result = asyncio.run(bare_subscriber(argv[1], int(argv[2])))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
