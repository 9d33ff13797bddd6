"""The bench's measurements, one coroutine each; every one returns plain figures.

Rates are messages over (the moment the last one was stored *and* shown on the dashboard −
the publisher's first send), both on the wall clock of this machine. CPU per message is the
gateway process's CPU time (all threads) over the same span, divided by the messages; the
bench waits for storage by reading the database file itself, so nothing it does while
measuring (no /metrics poll) runs in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import orjson

from bench.harness import (
    ROOT,
    Dashboard,
    Meter,
    publish_args,
    run_worker,
    stored_rows,
    wait_stored,
)
from bench.workers import VALUES_PER_MESSAGE, device_id
from tests.support.gateway import GatewayProcess


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# --- the limit: a bare aiomqtt subscriber ----------------------------------------------------
async def bare(
    url: str, count: int, qos: int = 0, rate: float = 0.0, devices: int = 100,
    protocol: str = "v5", metrics: int = 2,
) -> dict[str, float]:  # fmt: skip
    """A bare aiomqtt subscriber (MQTT `protocol` "v5" or "v311") parsing `count` messages of
    `metrics` values from `devices` devices: rate, CPU, latency (one sample per message)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.workers", "bare", "--url", url, "--count", str(count),
        "--protocol", protocol, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"bare subscriber did not start: {line!r}")
        pub = await run_worker(
            *publish_args(
                url,
                prefix="bare",
                devices=devices,
                count=count,
                qos=qos,
                rate=rate,
                metrics=metrics,
            )  # fmt: skip
        )
        out = await asyncio.wait_for(proc.stdout.read(), 120)
        result = orjson.loads(out.decode().strip().splitlines()[-1])
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    seconds = result["done"] - pub["start"]
    return {
        "rate": count / seconds,
        "values_rate": count * metrics / seconds,
        "cpu_us": 1e6 * result["cpu"] / count,
        "p50": result["p50"],
        "p99": result["p99"],
        "max": result["max"],
    }


# --- the gateway ---------------------------------------------------------------------------
async def ingest(
    gateway: GatewayProcess,
    dash: Dashboard,
    meter: Meter,
    *,
    prefix: str,
    devices: int,
    count: int,
    qos: int = 0,
    limit: float = 300.0,
    steady: Callable[[], Awaitable[Any]] | None = None,
    topic: str | None = None,
    metrics: int = VALUES_PER_MESSAGE,
) -> dict[str, float]:
    """After one warm-up message per device, `count` more (`metrics` values each) until
    stored and on the dashboard.

    `steady` is awaited after first contact has settled, right before the measured messages
    (the profiler starts there, so a profile shows the steady cost, not first contact)."""
    url = gateway.mqtt_url
    ids = [device_id(prefix, i) for i in range(devices)]
    stored = await asyncio.to_thread(stored_rows, gateway)
    first_cpu = meter.cpu()
    await run_worker(
        *publish_args(
            url,
            prefix=prefix,
            devices=devices,
            count=devices,
            qos=qos,
            topic=topic,
            metrics=metrics,
        )  # fmt: skip
    )
    await asyncio.wait_for(dash.expect(dict.fromkeys(ids, 1)), limit)
    await wait_stored(gateway, stored + devices * metrics, limit)
    # First contact may leave work behind (instance start-up, per-device queries): let it
    # finish, so the figure below is the steady per-message cost; first contact is its own.
    await settle(meter, limit)
    first_contact = meter.cpu() - first_cpu
    per_device = count // devices
    count = per_device * devices
    base = await asyncio.to_thread(stored_rows, gateway)
    if steady is not None:
        await steady()
    done_dash = dash.expect(dict.fromkeys(ids, 1 + per_device))
    cpu0, main0, frames0 = meter.cpu(), meter.main_cpu(), dash.frames
    pub_task = asyncio.create_task(
        run_worker(
            *publish_args(
                url,
                prefix=prefix,
                devices=devices,
                count=count,
                qos=qos,
                seq=1,
                topic=topic,
                metrics=metrics,
            )  # fmt: skip
        )
    )
    t_dash = await asyncio.wait_for(done_dash, limit)
    t_stored = await wait_stored(gateway, base + count * metrics, limit)
    cpu, main = meter.cpu() - cpu0, meter.main_cpu() - main0
    pub = await pub_task
    seconds = max(t_stored, t_dash) - pub["start"]
    return {
        "rate": count / seconds,
        "values_rate": count * metrics / seconds,
        "cpu_us": 1e6 * cpu / count,
        "loop_us": 1e6 * main / count,  # the event-loop thread's share of cpu_us
        "messages": count,
        "metrics": metrics,
        "first_contact_us": 1e6 * first_contact / devices,
        "frames_per_message": (dash.frames - frames0) / count,
    }


async def discovered_ingest(
    gateway: GatewayProcess, dash: Dashboard, meter: Meter, *, devices: int, count: int
) -> dict[str, float]:
    """`ingest` through Home Assistant discovery: each device announces itself with a
    device-level document (abbreviated keys, a `value_template` per metric, as ESPHome and
    Zigbee2MQTT documents do), then publishes the same JSON as the native runs on its own
    state topic (docs/conventions.md)."""
    prefix = "disc"
    host, port = _host_port(gateway.mqtt_url)
    async with aiomqtt.Client(host, port, identifier=f"bench-announce-{uuid.uuid4().hex[:6]}") as c:
        for i in range(devices):
            did = device_id(prefix, i)
            document = {
                "dev": {"ids": did, "name": did},
                "o": {"name": "bench"},
                "stat_t": f"bench/{did}/state",
                "cmps": {
                    "n": {"p": "sensor", "val_tpl": "{{ value_json.n }}"},
                    "temperature": {
                        "p": "sensor",
                        "dev_cla": "temperature",
                        "unit_of_meas": "°C",
                        "val_tpl": "{{ value_json.temperature | float(0) }}",
                    },
                },
            }
            await c.publish(
                f"homeassistant/device/{did}/config", orjson.dumps(document), qos=1, retain=True
            )

    def announced() -> bool:
        status, body = gateway.http_get("/api/discovery/", dash.cookie)
        return status == 200 and len(body) >= devices

    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(announced):
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not take the discovery documents")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # its subscriptions to the state topics are under way
    return await ingest(
        gateway, dash, meter, prefix=prefix, devices=devices, count=count, topic="bench/{id}/state"
    )


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


async def settle(meter: Meter, limit: float, busy: float = 15.0) -> None:
    """Wait until the process uses under `busy` % of a core over half a second."""
    deadline = time.monotonic() + limit
    while await meter.cpu_over(0.5) >= busy and time.monotonic() < deadline:
        pass


def per_reading(
    frames: list[tuple[str, float, float]], sent: list[float], ids: list[str], first_seq: int
) -> list[float]:
    """One latency per reading: the k-th message went to device k % len(ids) with
    n = first_seq + 1 + k // len(ids); it arrived with the first frame of its device whose n
    reached it (frames of one device arrive in order)."""
    arrival: dict[tuple[str, int], float] = {}
    shown = dict.fromkeys(ids, first_seq)
    for device, n, at in frames:
        for m in range(int(shown[device]) + 1, int(n) + 1):
            arrival[(device, m)] = at
        shown[device] = max(shown[device], n)
    devices = len(ids)
    return [
        arrival[(ids[k % devices], first_seq + 1 + k // devices)] - ts
        for k, ts in enumerate(sent)
        if (ids[k % devices], first_seq + 1 + k // devices) in arrival
    ]


async def start_fleet(url: str, devices: int) -> asyncio.subprocess.Process:
    """`python -m firmware_sim mqtt`: `devices` quiet devices (one reading per ~1000 s)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "firmware_sim", "mqtt", "--mqtt", url, "--devices", str(devices),
        "--rate", "0.001", "--prefix", "quiet", "--report", "0", "--seed", "1",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def idle(meter: Meter, dash: Dashboard, url: str, *, seconds: float, devices: int = 100):
    """Idle CPU (% of one core) with no devices, then with `devices` quiet ones connected.

    Returns (figures, fleet process): the fleet stays up for the command round trips.
    """
    empty = await meter.cpu_over(seconds)
    fleet = await start_fleet(url, devices)
    deadline = time.monotonic() + 60
    while sum(1 for d in dash.online if d.startswith("quiet-")) < devices:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(dash.online)} quiet devices came online")
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # let the registrations' batch reach the database
    quiet = await meter.cpu_over(seconds)
    return {"empty": empty, "quiet": quiet}, fleet


async def commands(dash: Dashboard, url: str, *, rounds: int) -> dict[str, Any]:
    """Command round trips dashboard → device → ack → dashboard, and the bare MQTT round trip."""
    device = "quiet-0001"
    rtts: list[float] = []
    sent_at: list[float] = []  # when the `sent` frame arrived (the gateway published it)
    pending_at: list[float] = []  # when the `pending` frame arrived (command stored)
    for i in range(rounds):
        reply = await asyncio.wait_for(
            dash.command(f"bench-{i}", device, "relay", {"state": bool(i % 2)}), 30
        )
        if reply["type"] == "error" or reply.get("status") != "acked":
            why = reply.get("message") or reply.get("error") or reply.get("status")
            return {"error": f"{reply.get('code') or reply.get('status')}: {why}"}
        rtts.append(reply["_rtt"])
        sent_at.append(reply["_stages"].get("sent", float("nan")))
        pending_at.append(reply["_stages"].get("pending", float("nan")))
    direct = await mqtt_round_trips(url, device, rounds)
    return {
        "p50": percentile(rtts, 0.5),
        "p99": percentile(rtts, 0.99),
        "sent_p50": percentile(sent_at, 0.5),
        "pending_p50": percentile(pending_at, 0.5),
        "base_p50": percentile(direct, 0.5),
        "base_p99": percentile(direct, 0.99),
    }


async def mqtt_round_trips(url: str, device: str, rounds: int) -> list[float]:
    """The floor: publish a command straight to the device and wait for its ack over MQTT."""
    port = int(url.rsplit(":", 1)[1])
    out = []
    nodelay = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)  # as the gateway and the sim
    async with aiomqtt.Client("127.0.0.1", port, socket_options=nodelay) as client:
        await client.subscribe(f"devices/{device}/commands/ack", qos=1)
        for i in range(rounds):
            cid = str(uuid.uuid4())
            body = {"id": cid, "name": "relay", "args": {"state": bool(i % 2)}}
            sent = time.time()
            await client.publish(f"devices/{device}/commands", orjson.dumps(body), qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    if orjson.loads(message.payload).get("id") == cid:
                        out.append(time.time() - sent)
                        break
    return out
