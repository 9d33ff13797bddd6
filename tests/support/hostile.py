"""An unaffected device and its dashboard, to time readings while a hostile publisher attacks.

Shared by tests/test_hostile_publishers.py (which asserts the bounds) and bench/hostile.py
(which prints the figures beside a run without the attack).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator

import aiomqtt
import psutil

from tests.support.gateway import GatewayProcess

PERIOD = 0.05


class Probe:
    """An unaffected device publishing `{"n": i}` (QoS 1) and a dashboard timing each reading."""

    def __init__(self, gw: GatewayProcess, port: int, cookie: str, device: str = "probe") -> None:
        self.gw, self.port, self.cookie, self.device = gw, port, cookie, device
        self.sent: dict[int, float] = {}
        self.latency: dict[int, float] = {}

    async def _publish(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"{self.device}-dev") as dev:
            for n in range(1, 1_000_000):
                self.sent[n] = time.monotonic()
                await dev.publish(f"devices/{self.device}/telemetry", json.dumps({"n": n}), qos=1)
                await asyncio.sleep(PERIOD)

    async def _watch(self, ws) -> None:
        shown = 0  # frames coalesce a device's readings: a frame with n shows all up to n
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "telemetry" and frame.get("device") == self.device:
                now = time.monotonic()
                n = int(frame["metrics"]["n"])
                for m in range(shown + 1, n + 1):
                    self.latency[m] = now - self.sent[m]
                shown = max(shown, n)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Probe]:
        async with self.gw.ws_connect(self.cookie, max_size=2**24) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"
            tasks = [asyncio.create_task(self._watch(ws)), asyncio.create_task(self._publish())]
            try:
                yield self
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def p99(self) -> float:
        """The 99th percentile of the seen readings' latency; every sent one must be seen."""
        settled = [n for n in self.sent if self.sent[n] < time.monotonic() - 2.0]
        missing = [n for n in settled if n not in self.latency]
        assert not missing, f"readings never shown on the dashboard: {missing[:10]}"
        return self.quantile(99)

    def quantile(self, q: int) -> float:
        """The q-th percentile (1-99) of the latencies seen so far, in seconds."""
        return statistics.quantiles(self.latency.values(), n=100)[q - 1]

    def reset(self) -> None:
        """Forget the latencies seen so far (a new measurement window)."""
        self.latency.clear()

    async def all_stored(self) -> None:
        """Every reading the probe published is in the history API (after the last flush)."""
        last = max(self.latency)
        async with asyncio.timeout(10):
            while True:
                points = await asyncio.to_thread(self.gw.history, self.cookie, self.device, "n")
                if {int(v) for _, v in points} >= set(range(1, last + 1)):
                    return
                await asyncio.sleep(0.2)


def rss(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    return psutil.Process(gw.proc.pid).memory_info().rss


def rejected(gw: GatewayProcess, reason: str) -> float:
    return gw.metric("gateway_messages_rejected_total", f'reason="{reason}"')


# --- the attacks (each one a publisher on the broker at 127.0.0.1:<port>) --------------------


async def publish_all(port: int, name: str, messages: list[tuple[str, bytes | str]]) -> None:
    """Publish `messages` (topic, payload) at QoS 1 from one client named `name`."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=name) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def invalid_ids(count: int = 5000, length: int = 60_000) -> list[tuple[str, bytes]]:
    """Telemetry to `count` device ids of `length` characters (refused: bad_device_id)."""
    return [(f"devices/{i:05d}{'x' * length}/telemetry", b'{"t": 1}') for i in range(count)]


def new_ids(count: int = 2000, prefix: str = "flood") -> list[tuple[str, bytes]]:
    """Telemetry from `count` valid device ids never seen before."""
    return [(f"devices/{prefix}-{i:05d}/telemetry", b'{"t": 1}') for i in range(count)]


def invented_metrics(messages: int = 200, names: int = 256) -> list[tuple[str, str]]:
    """One device sending `names` new 185-character metric names in each message."""
    return [
        (
            "devices/inventor/telemetry",
            json.dumps({f"m{m:03d}_{i:03d}_" + "x" * 176: 1.0 for i in range(names)}),
        )
        for m in range(messages)
    ]


def births(count: int = 262) -> list[tuple[str, bytes]]:
    """Home Assistant's birth message, `count` times (a misconfigured or hostile publisher)."""
    return [("homeassistant/status", b"online")] * count
