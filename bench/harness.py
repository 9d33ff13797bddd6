"""What every bench scenario drives: worker processes, the gateway's CPU/RSS, a dashboard client.

The gateway itself is `tests.support.gateway.GatewayProcess` (a real ``manage.py rungateway``
with a fresh SQLite database); mosquitto and redis-server are `tests.support.servers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil

from tests.support.gateway import GatewayFailed, GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("acked", "failed", "timeout")  # command states that end a round trip
POLL = 0.05  # seconds between database reads while waiting for storage


async def run_worker(*args: str, limit: float = 300.0) -> dict[str, Any]:
    """Run ``python -m bench.workers ARGS`` to completion; its JSON result."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.workers", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), limit)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.workers {args[0]} exited with {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


def publish_args(
    url: str, *, prefix: str, devices: int, count: int, qos: int = 0, rate: float = 0.0,
    seq: int = 0, topic: str | None = None, times: bool = False, metrics: int = 2,
) -> list[str]:  # fmt: skip
    """The command line of one `bench.workers publish` run (`topic`: a format with {id};
    `metrics`: values per message)."""
    return [
        "publish", "--url", url, "--prefix", prefix, "--devices", str(devices),
        "--count", str(count), "--qos", str(qos), "--rate", str(rate), "--first-seq", str(seq),
        *(["--topic", topic] if topic else []),
        *(["--times"] if times else []),
        *(["--metrics", str(metrics)] if metrics != 2 else []),
    ]  # fmt: skip


class Meter:
    """CPU seconds (all threads, user+system) and RSS of one process, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def cpu(self) -> float:
        """Total CPU seconds used so far."""
        times = self.proc.cpu_times()
        return times.user + times.system

    def main_cpu(self) -> float:
        """CPU seconds of the main thread alone (the event loop: MQTT, consumers, fan-out);
        the rest is the database writer and other worker threads."""
        pid = self.proc.pid
        for thread in self.proc.threads():
            if thread.id == pid:
                return thread.user_time + thread.system_time
        return 0.0

    def rss_mb(self) -> float:
        """Resident set size in MiB."""
        return self.proc.memory_info().rss / (1024 * 1024)

    async def cpu_over(self, seconds: float) -> float:
        """CPU use over the next `seconds`, as a percentage of one core."""
        before = self.cpu()
        await asyncio.sleep(seconds)
        return 100.0 * (self.cpu() - before) / seconds


class Dashboard:
    """A logged-in `/ws/dashboard/` client that tracks each device's last `n` and latencies."""

    def __init__(self, gateway: GatewayProcess, cookie: str) -> None:
        self.gateway = gateway
        self.cookie = cookie
        self.last_n: dict[str, float] = {}
        self.online: set[str] = set()
        #: (device, n, arrival) of each telemetry frame of `latency_prefix`, while a list: a
        #: coalesced frame delivers every reading of its device up to its `n`.
        self.latency: list[tuple[str, float, float]] | None = None
        self.latency_prefix = ""
        self.frames = 0
        self._targets: dict[str, float] = {}
        self._done: asyncio.Future[float] | None = None
        self._commands: dict[Any, asyncio.Queue[dict[str, Any]]] = {}
        self._ids: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._ws: Any = None

    async def __aenter__(self) -> Dashboard:
        # As the browser does: a loop turn's frames may come as one `batch` frame.
        connect = self.gateway.ws_connect(self.cookie, "/ws/dashboard/?batch=1", max_size=None)
        self._ws = await connect.__aenter__()
        first = orjson.loads(await self._ws.recv())
        if first.get("type") != "snapshot":
            raise RuntimeError(f"expected a snapshot first, got {first!r}")
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._ws.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for raw in self._ws:
            now = time.time()
            frame = orjson.loads(raw)
            self.frames += 1  # WebSocket messages
            for inner in frame["frames"] if frame.get("type") == "batch" else (frame,):
                self._handle(inner, now)

    def _handle(self, frame: dict[str, Any], now: float) -> None:
        """One §6.2 frame, alone or from inside a `batch` frame."""
        kind = frame.get("type")
        device = frame.get("device")
        if kind == "telemetry":
            n = frame["metrics"].get("n")
            if n is not None:
                self.last_n[device] = n
                target = self._targets.get(device)
                if target is not None and n >= target:
                    del self._targets[device]
                    if not self._targets and self._done and not self._done.done():
                        self._done.set_result(now)
            if self.latency is not None and n is not None:
                if device.startswith(self.latency_prefix):
                    self.latency.append((device, n, now))
        elif kind == "status":
            (self.online.add if frame.get("online") else self.online.discard)(device)
        elif kind in ("command", "error"):
            self._route_command(frame, now)

    def _route_command(self, frame: dict[str, Any], now: float) -> None:
        ref = frame.get("ref")
        if ref is not None and frame.get("id"):
            self._ids[frame["id"]] = ref
        ref = ref if ref is not None else self._ids.get(frame.get("id", ""))
        queue = self._commands.get(ref)
        if queue is not None:
            queue.put_nowait({**frame, "_t": now})

    def expect(self, targets: dict[str, float]) -> asyncio.Future[float]:
        """A future set to the arrival time once every device's `n` reached its target."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._targets = {d: t for d, t in targets.items() if self.last_n.get(d, -1) < t}
        if not self._targets:
            self._done.set_result(time.time())
        return self._done

    async def command(self, ref: str, device: str, name: str, args: dict[str, Any]) -> dict:
        """Send a `command` frame; the first final frame (acked/failed/timeout/error) for it."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._commands[ref] = queue
        frame = {"type": "command", "device": device, "name": name, "args": args, "ref": ref}
        sent = time.time()
        await self._ws.send(orjson.dumps(frame).decode())
        stages: dict[str, float] = {}  # status → seconds after sending
        try:
            while True:
                reply = await queue.get()
                stages.setdefault(str(reply.get("status")), reply["_t"] - sent)
                if reply["type"] == "error" or reply.get("status") in FINAL:
                    return {**reply, "_rtt": reply["_t"] - sent, "_stages": stages}
        finally:
            del self._commands[ref]


def stored_rows(gateway: GatewayProcess) -> int:
    """Readings in the gateway's SQLite database, read by this process, so waiting for storage
    costs the gateway no CPU (no /metrics poll). A count: readings have no row id to take
    the highest of; it reads the whole key b-tree (~2 ms per 100,000 readings)."""
    path = gateway.database_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        (count,) = db.execute("SELECT count(*) FROM devices_reading").fetchone()
    return count


async def wait_stored(gateway: GatewayProcess, target: int, limit: float) -> float:
    """Poll the database until `stored_rows` ≥ target; the time it was seen. Polls at most
    every POLL seconds, and at least 10 counts' time apart, so counting a large table takes
    at most a tenth of a core from the gateway beside it."""
    deadline = time.monotonic() + limit
    while True:
        began = time.monotonic()
        value = await asyncio.to_thread(stored_rows, gateway)
        if value >= target:
            return time.time()
        if time.monotonic() > deadline:
            drops = {
                reason: await asyncio.to_thread(
                    gateway.metric, "gateway_mqtt_messages_dropped_total", f'reason="{reason}"'
                )
                for reason in ("queue_full", "inbox_full")
            }
            raise TimeoutError(
                f"stored {value} of {target} values after {limit:.0f}s (drops {drops})"
            )
        await asyncio.sleep(max(POLL, 10 * (time.monotonic() - began)))


def start_gateway(
    mqtt_url: str,
    redis_url: str | None = None,
    experiments: Sequence[str] = (),
    database_url: str | None = None,
) -> GatewayProcess:
    """A started `rungateway` with its own SQLite DB (or `database_url`), WARNING logs, no
    command rate limit and no admission rate (a fleet of 10,000 new devices arrives at once);
    `experiments` are bench/experiments/sitecustomize.py patches applied inside it."""
    env = {
        "GATEWAY_COMMAND_RATE_COUNT": "1000000",
        "GATEWAY_NEW_DEVICES_PER_SECOND": "1000000",
        "PYTHONPATH": str(ROOT),
    }
    if experiments:
        env["PYTHONPATH"] = f"{ROOT / 'bench' / 'experiments'}{os.pathsep}{ROOT}"
        env["BENCH_EXPERIMENTS"] = ",".join(experiments)
    if "no-ha-discovery" in experiments:
        env["HA_DISCOVERY"] = "0"
    gateway = GatewayProcess(
        mqtt_url, redis_url=redis_url, database_url=database_url, env=env, log_level="WARNING"
    )
    gateway.__enter__()
    return gateway


async def stop_gateway(gateway) -> None:
    """Stop the gateway; a slow shutdown is reported, never costs the table of figures."""
    try:
        await asyncio.to_thread(gateway.__exit__, None, None, None)
    except GatewayFailed as exc:
        print(f"warning: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
