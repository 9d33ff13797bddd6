"""A fleet of simulated devices in one asyncio process, each an independent MQTT client.

    async with Fleet("mqtt://127.0.0.1:1883", devices=10, rate=1.0, style="native") as fleet:
        await fleet.wait_connected()
        fleet.devices[0].drop()             # the broker fires its Last Will
        fleet.apply("delay=3@25%")          # a quarter of the fleet acks 3 s late

The same class backs `manage.py simulate`, `python -m firmware_sim mqtt`, tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from firmware_sim.device import STYLES, Broker, SimDevice
from firmware_sim.faults import FaultSpec

logger = logging.getLogger("firmware_sim")

DEFAULT_URL = "mqtt://127.0.0.1:1883"
DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_broker_url(url: str) -> Broker:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://…` (TLS, default port 8883)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"no host in broker URL {url!r}")
    return Broker(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


@dataclass
class FleetConfig:
    """Every setting of a fleet; the command line only builds one of these."""

    url: str = DEFAULT_URL
    devices: int = 10
    rate: float = 1.0  # telemetry ticks per second per device
    style: str = "native"  # "native", "tasmota", "esphome" or "zigbee2mqtt"
    prefix: str | None = None  # device ids are <prefix>-0001…; default "sim" / "tasmota"
    qos: int = 0  # telemetry QoS (status, acks and subscriptions always use QoS 1)
    faults: list[FaultSpec] = field(default_factory=list)
    seed: int | None = None  # makes signals, jitter and fault targets reproducible
    reboot_delay: float = 1.0  # seconds a rebooting device stays away
    keepalive: int = 30
    connect_concurrency: int = 64  # MQTT handshakes in flight at once
    first_index: int = 1

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, not {self.style!r}")
        if self.devices < 0:
            raise ValueError("devices must not be negative")
        if not 0 < self.rate <= 100:
            raise ValueError("rate must be above 0 and at most 100 Hz")
        if self.qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if self.prefix is None:
            self.prefix = "sim" if self.style == "native" else self.style
        if not DEVICE_ID.match(self.device_id(self.first_index + max(self.devices, 1) - 1)):
            raise ValueError(f"prefix {self.prefix!r} does not make valid device ids")
        if isinstance(self.faults, str):
            self.faults = FaultSpec.parse_many(self.faults)
        self.faults = [f if isinstance(f, FaultSpec) else FaultSpec.parse(f) for f in self.faults]
        parse_broker_url(self.url)

    def device_id(self, index: int) -> str:
        """The id of the index-th device: `<prefix>-0001` (wider for fleets past 9999)."""
        width = max(4, len(str(self.first_index + self.devices - 1)))
        return f"{self.prefix}-{index:0{width}d}"


class Fleet:
    """Simulated devices sharing one event loop; see the module docstring."""

    def __init__(self, url: str | FleetConfig | None = None, /, **options: Any) -> None:
        if isinstance(url, FleetConfig):
            self.config = dataclasses.replace(url, **options) if options else url
        else:
            self.config = FleetConfig(url=url or DEFAULT_URL, **options)
        cfg = self.config
        self.rng = random.Random(cfg.seed)
        self.broker = parse_broker_url(cfg.url)
        self._gate: asyncio.Semaphore | None = None
        self.devices: list[SimDevice] = []
        self._by_id: dict[str, SimDevice] = {}
        self.started_at: float | None = None
        self.connected_after: float | None = None

    def _build(self) -> None:
        cfg = self.config
        self._gate = asyncio.Semaphore(cfg.connect_concurrency)
        for index in range(cfg.first_index, cfg.first_index + cfg.devices):
            device_id = cfg.device_id(index)
            device = SimDevice(
                device_id,
                self.broker,
                style=cfg.style,
                interval=1.0 / cfg.rate,
                qos=cfg.qos,
                rng=random.Random(self.rng.getrandbits(64)),
                reboot_delay=cfg.reboot_delay,
                keepalive=cfg.keepalive,
                connect_gate=self._gate,
            )
            self.devices.append(device)
            self._by_id[device_id] = device

    def __getitem__(self, key: int | str) -> SimDevice:
        """A device by position or by id."""
        return self.devices[key] if isinstance(key, int) else self._by_id[key]

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.devices]

    async def start(self) -> None:
        """Create every device and start connecting (at most `connect_concurrency` at once)."""
        if self.devices:
            return
        self._build()
        self.started_at = time.monotonic()
        for device in self.devices:
            device.start().add_done_callback(self._device_done)

    def _device_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s crashed", task.get_name(), exc_info=task.exception())

    async def stop(self, grace: float = 10.0) -> None:
        """Stop every device cleanly (offline message, then DISCONNECT)."""
        await asyncio.gather(*(d.stop(grace) for d in self.devices))

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_connected(self, devices: list[SimDevice] | None = None) -> float:
        """Wait until every device (or those given) is online; returns seconds since start.

        Wrap it in `asyncio.timeout(...)` to bound the wait.
        """
        targets = self.devices if devices is None else devices
        for device in targets:
            await device.wait_connected()
        elapsed = time.monotonic() - (self.started_at or time.monotonic())
        if devices is None and self.connected_after is None:
            self.connected_after = elapsed
        return elapsed

    def select(
        self, ids: list[str] | None = None, fraction: float | None = None
    ) -> list[SimDevice]:
        """Devices by id, or a random share of the fleet (seeded), or all of them."""
        return FaultSpec("noack", None, fraction, tuple(ids or ())).select(
            self.devices, self.ids, self.rng
        )

    def apply(self, spec: FaultSpec | str) -> list[SimDevice]:
        """Apply one fault spec (`"delay=3@25%"`, see faults.py); returns the devices hit."""
        spec = FaultSpec.parse(spec) if isinstance(spec, str) else spec
        targets = spec.select(self.devices, self.ids, self.rng)
        for device in targets:
            if spec.kind == "drop":
                device.drop(spec.value or None)
            elif spec.kind == "noack":
                device.set_noack(True)
            elif spec.kind == "delay":
                device.set_ack_delay(spec.value or 0.0)
            elif spec.kind == "garbage":
                device.set_garbage(1.0 if spec.value is None else spec.value)
            elif spec.kind == "burst":
                device.set_burst(10.0 if spec.value is None else spec.value)
        return targets

    def apply_configured_faults(self) -> dict[str, list[SimDevice]]:
        """Apply the faults of the config (`--faults`); keyed by spec kind."""
        return {spec.kind: self.apply(spec) for spec in self.config.faults}

    def restore(self) -> None:
        """Clear every fault and bring dropped devices back."""
        for device in self.devices:
            device.restore()

    def stats(self) -> dict[str, Any]:
        """Fleet-wide counters."""
        names = ("sent", "garbage_sent", "commands", "acks_sent", "acks_suppressed")
        totals: dict[str, Any] = {n: sum(getattr(d, n) for d in self.devices) for n in names}
        more = ("connects", "connect_failures", "drops", "reboots")
        totals.update({n: sum(getattr(d, n) for d in self.devices) for n in more})
        totals["devices"] = len(self.devices)
        totals["connected"] = sum(d.connected for d in self.devices)
        return totals
