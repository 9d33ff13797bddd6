"""The one-command demo: the gateway, a simulated fleet and a serial device, alive together.

`manage.py demo` (the README's first command, behind `bin/run`) migrates the database,
creates the demo login, then `run_demo()`:

1. opens a pseudo-terminal and runs a simulated serial device on it (`firmware_sim`);
2. starts `manage.py rungateway --embedded-broker --serial <pty>?device=<id>` as a child in
   its own session (a terminal's Ctrl-C reaches only us, so the gateway is stopped once, in
   order) that dies with us even if we are killed;
3. once the gateway's MQTT bridge is connected, runs the simulated MQTT fleets in this
   process (a dozen native devices and a few Tasmota ones) against the same broker;
4. prints the dashboard URL and the login, and waits for SIGINT/SIGTERM or the gateway's end;
5. shuts down in order: the fleets leave cleanly (retained ``offline``), the serial device
   stops, then the gateway gets SIGTERM (it publishes its ``offline`` and stops its embedded
   broker); a gateway still running after `stop_timeout` seconds is killed.

`MQTT_URL` / `--mqtt` picks the broker (an existing one is used as it is), `REDIS_URL` the
channel layer, `DATABASE_URL` the database: the child inherits the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from firmware_sim.fleet import Fleet
from firmware_sim.serial_device import SerialSimDevice, open_pty
from gateway.broker import die_with_parent
from gateway.mqtt.url import parse_broker_url

logger = logging.getLogger("gateway.demo")

ROOT = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"gateway running: dashboard (\S+)")

Echo = Callable[[str], None]


@dataclass
class DemoConfig:
    """Every setting of the demo; `manage.py demo` only builds one of these."""

    mqtt_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    native: int = 12  # native-convention devices (sim-0001…)
    tasmota: int = 4  # Tasmota-style devices (tasmota-0001…)
    esphome: int = 3  # ESPHome nodes with Home Assistant discovery (esphome-0001…)
    zigbee2mqtt: int = 1  # Zigbee2MQTT bridges, two Zigbee devices each (one per broker)
    rate: float = 1.0  # telemetry per device per second
    serial_device: str | None = "serial-1"  # None: no serial device
    login: str = ""  # the "user / password" line, shown once with the URL
    ready_timeout: float = 60.0
    stop_timeout: float = 8.0
    gateway_args: list[str] = field(default_factory=list)


@dataclass
class DemoTimes:
    """Measured moments (seconds since `run_demo` began), for the closing summary and tests."""

    gateway_ready: float | None = None
    fleet_connected: float | None = None
    shutdown: float | None = None


def _stdout(line: str) -> None:
    print(line, flush=True)


def broker_client(url: str, timeout: float) -> aiomqtt.Client:
    """A plain client of the broker at `url` (credentials and TLS as the URL says)."""
    broker = parse_broker_url(url)
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=broker.username,
        password=broker.password,
        tls_context=broker.ssl_context(),
        timeout=timeout,
    )


async def retained_topics(url: str, wait: float = 5.0) -> set[str] | None:
    """The topics holding a retained message on the broker at `url`; None when none answers."""
    sentinel = f"demo-sentinel/{secrets.token_hex(6)}"
    found: set[str] = set()
    try:
        async with broker_client(url, wait) as client:
            await client.subscribe("#")
            await client.publish(sentinel, b"", qos=1)
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    if message.topic.value == sentinel:
                        return found
                    if message.retain:
                        found.add(message.topic.value)
    except aiomqtt.MqttError:
        return None
    return found


async def clear_retained(url: str, topics: set[str]) -> None:
    """Remove the retained messages of `topics` (an empty retained publish each)."""
    async with broker_client(url, 5.0) as client:
        for topic in sorted(topics):
            await client.publish(topic, b"", qos=1, retain=True)


class Demo:
    """The running demo: the gateway child, the fleets and the serial device."""

    def __init__(self, config: DemoConfig, echo: Echo = _stdout) -> None:
        self.config = config
        self.echo = echo
        self.times = DemoTimes()
        self.started = time.monotonic()
        self.gateway: asyncio.subprocess.Process | None = None
        self.dashboard_url: str | None = None
        self.fleets: list[Fleet] = []
        self.serial: SerialSimDevice | None = None
        self.serial_path: str | None = None
        self._fds: list[int] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._banner = asyncio.Event()
        # The retained topics of a broker that was already running (None: the demo's own).
        self.existing_retained: set[str] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # --- startup --------------------------------------------------------------------------
    async def start(self) -> None:
        """Serial device, gateway, then the fleets once the gateway's bridge is connected."""
        cfg = self.config
        self.existing_retained = await retained_topics(cfg.mqtt_url, wait=2.0)
        if self.existing_retained is not None:
            self.echo(
                f"demo: a broker already answers at {cfg.mqtt_url}: the demo uses it, and "
                "removes the retained messages it leaves there when it stops"
            )
        if cfg.serial_device:
            master, slave, self.serial_path = open_pty()
            self._fds += [master, slave]
            self.serial = SerialSimDevice(master, cfg.serial_device, rate=cfg.rate)
            self._spawn(self.serial.run(), "demo.serial")
        await self._start_gateway()
        await self._wait_ready()
        self.times.gateway_ready = self.elapsed()
        styles = (
            ("native", cfg.native),
            ("tasmota", cfg.tasmota),
            ("esphome", cfg.esphome),
            ("zigbee2mqtt", cfg.zigbee2mqtt),
        )
        for style, count in styles:
            if count > 0:
                fleet = Fleet(cfg.mqtt_url, devices=count, rate=cfg.rate, style=style)
                await fleet.start()
                self.fleets.append(fleet)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                for fleet in self.fleets:
                    await fleet.wait_connected()
                self.times.fleet_connected = self.elapsed()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", task.get_name(), exc_info=task.exception())

    async def _start_gateway(self) -> None:
        cfg = self.config
        cmd = [sys.executable, "manage.py", "rungateway", "--embedded-broker"]
        cmd += ["--host", cfg.host, "--port", str(cfg.port), "--mqtt", cfg.mqtt_url]
        if self.serial_path:
            cmd += ["--serial", f"{self.serial_path}?device={cfg.serial_device}"]
        cmd += cfg.gateway_args
        self.gateway = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: Ctrl-C in a terminal signals only us; we stop it once, in order.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self._spawn(self._relay(self.gateway.stdout), "demo.gateway-log")

    async def _relay(self, stream: asyncio.StreamReader | None) -> None:
        """Show the gateway's log lines and notice its banner (the dashboard URL)."""
        if stream is None:
            return
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if self.times.gateway_ready is None and "Service Unavailable: /healthz" in text:
                continue  # our own readiness probe, before the bridge connected
            self.echo(f"gateway | {text}")
            match = BANNER.search(text)
            if match and not self._banner.is_set():
                self.dashboard_url = match.group(1)
                self._banner.set()

    async def _wait_ready(self) -> None:
        """Until the gateway printed its banner and /healthz reports the broker connected."""
        assert self.gateway is not None
        exited = asyncio.create_task(self.gateway.wait())
        banner = asyncio.create_task(self._banner.wait())
        try:
            async with asyncio.timeout(self.config.ready_timeout):
                await asyncio.wait([banner, exited], return_when=asyncio.FIRST_COMPLETED)
                # Startup only (never a hot path): poll /healthz until the bridge is connected.
                while not exited.done():
                    if await asyncio.to_thread(self._healthy):
                        return
                    await asyncio.wait([exited], timeout=0.2)
        except TimeoutError:
            raise DemoError(
                f"the gateway was not ready within {self.config.ready_timeout:g} s"
            ) from None
        finally:
            banner.cancel()
            exited.cancel()
        raise DemoError(f"the gateway exited with code {self.gateway.returncode}")

    def _healthy(self) -> bool:
        if not self.dashboard_url:
            return False
        try:
            with urllib.request.urlopen(self.dashboard_url + "healthz", timeout=2) as resp:
                return json.loads(resp.read()).get("mqtt") == "connected"
        except (OSError, ValueError):
            return False

    def describe(self) -> list[str]:
        """The lines a newcomer needs: where to look, how to log in, what is running."""
        cfg = self.config
        parts = []
        for fleet in self.fleets:
            c = fleet.config
            parts.append(f"{c.devices} {c.style} ({c.prefix}-0001…)")
        if self.serial_path:
            parts.append(f"serial {cfg.serial_device} on {self.serial_path}")
        return [
            "",
            f"demo: dashboard  {self.dashboard_url}",
            f"demo: {cfg.login}" if cfg.login else "demo: (no login created)",
            f"demo: devices    {', '.join(parts) or 'none'} at {cfg.rate:g} Hz",
            f"demo: broker     {cfg.mqtt_url}",
            f"demo: ready in {self.times.gateway_ready:.1f} s; Ctrl-C stops everything",
            "",
        ]

    # --- shutdown -------------------------------------------------------------------------
    async def stop(self) -> int:
        """Fleets leave, the serial device stops, the gateway gets SIGTERM; its exit code."""
        began = time.monotonic()
        await asyncio.gather(*(fleet.stop(grace=3.0) for fleet in self.fleets))
        code = await self._stop_gateway()
        if self.existing_retained is not None:
            await self._clean_broker(self.existing_retained)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.times.shutdown = time.monotonic() - began
        return code

    async def _clean_broker(self, before: set[str]) -> None:
        """Clear what the demo left retained on a broker it did not start (statuses, Wills,
        discovery documents), so the user's broker is as it was."""
        try:
            after = await retained_topics(self.config.mqtt_url)
            left = (after or set()) - before
            if left:
                await clear_retained(self.config.mqtt_url, left)
            self.echo(f"demo: removed {len(left)} retained messages it left on the broker")
        except Exception as exc:  # the broker went away meanwhile: nothing more to do
            self.echo(f"demo: could not clean the broker: {exc}")

    async def _stop_gateway(self) -> int:
        proc = self.gateway
        if proc is None:
            return 0
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.config.stop_timeout):
                    await proc.wait()
            except TimeoutError:
                logger.warning(
                    "gateway still running after %ss: killing it", self.config.stop_timeout
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if proc.returncode == -signal.SIGTERM:
            return 0  # ours, before the gateway installed its handlers (still starting)
        return proc.returncode or 0


class DemoError(Exception):
    """The demo could not start (the gateway failed or was not ready in time)."""


async def run_demo(config: DemoConfig, echo: Echo = _stdout) -> int:
    """Run the demo until SIGINT/SIGTERM or the gateway's exit; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    demo = Demo(config, echo)
    code = 0
    try:
        starting = asyncio.create_task(demo.start(), name="demo.start")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        elif starting.exception() is not None:
            echo(f"demo: {starting.exception()}")
            code = 1
        else:
            for line in demo.describe():
                echo(line)
            assert demo.gateway is not None
            exited = asyncio.create_task(demo.gateway.wait())
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                echo(f"demo: the gateway exited with code {exited.result()}")
                code = exited.result() or 1
            exited.cancel()
        stopping.cancel()
    finally:
        echo("demo: stopping")
        gateway_code = await demo.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    echo(f"demo: stopped in {demo.times.shutdown:.2f} s (gateway exit code {gateway_code})")
    return code or gateway_code
