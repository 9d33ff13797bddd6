"""A simulated serial sensor: telemetry lines out, JSON command lines in, acks back.

`python -m firmware_sim serial --pty` creates a pseudo-terminal (the device end is the master fd),
prints the slave's path for the gateway's `--serial`, emits telemetry lines (docs/interface.md §4:
JSON objects, `key=value` pairs with `--format kv`, or a GPS receiver's NMEA 0183 sentences with
`--format nmea`) and answers each command line `{"id", "name",
"args"}` with an ack `{"id", "ok", "result"|"error"}`. `--noise` injects what real serial links
produce: garbage bytes, invalid UTF-8, over-long lines, partial frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import random
import signal
import sys
import time
import tty
from collections.abc import Iterable

import orjson

from firmware_sim.nmea import GpsTrack

logger = logging.getLogger("firmware_sim.serial")

NOISE_KINDS = ("garbage", "utf8", "long", "partial")
LONG_LINE_BYTES = 100_000


def open_pty(link: str | None = None) -> tuple[int, int, str]:
    """A raw pty: (master fd, slave fd kept open, path the gateway should open).

    The slave is put in raw mode (no echo, no CR/LF mapping) and kept open by us so reads on
    the master do not fail with EIO before the gateway opens it. With `link`, a symlink to
    the slave is (re)created there — like a `/dev/serial/by-id/` name.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    if link:
        tmp = f"{link}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(path, tmp)
        os.replace(tmp, link)  # atomic re-point, as udev does
        path = link
    return master, slave, path


class SerialSimDevice:
    """Device firmware on one fd (pty master or a tty): telemetry at `rate` Hz, command acks."""

    def __init__(
        self,
        fd: int,
        device_id: str = "serial-sim",
        *,
        rate: float = 1.0,
        fmt: str = "json",
        noise: Iterable[str] = (),
        noise_rate: float = 0.2,
        seed: int | None = None,
    ) -> None:
        self.fd = fd
        self.device_id = device_id
        self.rate = rate
        self.fmt = fmt
        self.noise = [n for n in noise if n]
        unknown = set(self.noise) - set(NOISE_KINDS)
        if unknown:
            raise ValueError(f"unknown noise kind(s) {sorted(unknown)}: use {NOISE_KINDS}")
        self.noise_rate = noise_rate
        self.rng = random.Random(seed)
        self.temperature, self.humidity, self.relay = 21.0, 45.0, False
        self.sent = self.dropped = 0
        self.commands: list[dict] = []
        self._inbuf = bytearray()

    # --- output -----------------------------------------------------------------------
    def telemetry_line(self) -> bytes:
        """The next telemetry line (random walk around room conditions)."""
        self.temperature = round(self.temperature + self.rng.gauss(0, 0.1), 2)
        self.humidity = round(min(100.0, max(0.0, self.humidity + self.rng.gauss(0, 0.3))), 1)
        if self.fmt == "nmea":  # a GPS receiver: one fix as GGA, RMC, VTG, GSA sentences
            if not hasattr(self, "gps"):
                self.gps = GpsTrack()
            return b"".join(self.gps.sentences())
        if self.fmt == "kv":
            relay = "true" if self.relay else "false"
            return (
                f"temperature={self.temperature},humidity={self.humidity},relay={relay}\n".encode()
            )
        data = {"temperature": self.temperature, "humidity": self.humidity, "relay": self.relay}
        return orjson.dumps({**data, "ts": round(time.time(), 3)}) + b"\n"

    def noise_bytes(self, kind: str) -> bytes:
        """One burst of line noise of `kind` (see NOISE_KINDS)."""
        if kind == "garbage":
            return (
                bytes(self.rng.randrange(33, 127) for _ in range(self.rng.randrange(3, 40))) + b"\n"
            )
        if kind == "utf8":
            return b"\xff\xfe\xc3(temp=1\n"
        if kind == "long":
            return b"x" * LONG_LINE_BYTES + b"\n"
        return b'{"temperature": 2'  # partial: a reset mid-line, no newline

    def write_nowait(self, data: bytes) -> bool:
        """Write what the tty takes now; the rest is dropped (nobody drains the port)."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            return True
        except BlockingIOError:
            self.dropped += 1
            return False
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADF):
                self.dropped += 1
                return False
            raise

    async def write(self, data: bytes, patience: float = 1.0) -> bool:
        """Write like a UART with a reader: wait while the tty buffer is full, but give up
        after `patience` seconds (the gateway is absent) and drop the rest of the line."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        deadline = loop.time() + patience
        while view:
            try:
                view = view[os.write(self.fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF):
                    self.dropped += 1
                    return False
                raise
            if loop.time() >= deadline:
                self.dropped += 1
                return False
            writable = loop.create_future()
            loop.add_writer(self.fd, lambda f=writable: f.done() or f.set_result(None))
            try:
                await asyncio.wait_for(writable, max(0.0, deadline - loop.time()))
            except TimeoutError:
                pass
            finally:
                loop.remove_writer(self.fd)
        return True

    async def tick(self) -> None:
        """One period: maybe a burst of noise, then a telemetry line."""
        if self.noise and self.rng.random() < self.noise_rate:
            await self.write(self.noise_bytes(self.rng.choice(self.noise)))
        if await self.write(self.telemetry_line()):
            self.sent += 1

    # --- input ------------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: no process has the port open right now
        if not data:
            return
        self._inbuf += data
        while b"\n" in self._inbuf:
            line, _, rest = bytes(self._inbuf).partition(b"\n")
            self._inbuf = bytearray(rest)
            self.handle_line(line.strip())

    def handle_line(self, line: bytes) -> None:
        """A command line → its ack line (unknown or malformed commands are refused)."""
        if not line:
            return
        try:
            command = orjson.loads(line)
            cmd_id, name = command["id"], command["name"]
            args = command.get("args") or {}
        except (orjson.JSONDecodeError, KeyError, TypeError):
            logger.warning("ignoring malformed command line %r", line[:80])
            return
        self.commands.append(command)
        ack: dict = {"id": cmd_id}
        if (
            name == "set_interval"
            and isinstance(args.get("seconds"), int | float)
            and args["seconds"] > 0
        ):
            self.rate = 1.0 / float(args["seconds"])
            ack.update(ok=True, result={"seconds": args["seconds"]})
        elif name == "set_relay":
            self.relay = bool(args.get("on"))
            ack.update(ok=True, result={"relay": self.relay})
        elif name == "ping":
            ack.update(ok=True, result={"pong": True})
        else:
            ack.update(ok=False, error=f"unknown command {name!r}")
        self.write_nowait(orjson.dumps(ack) + b"\n")

    async def run(self, count: int | None = None) -> None:
        """Emit telemetry at `rate` Hz (forever, or `count` lines) and answer commands."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._readable)
        try:
            n = 0
            while count is None or n < count:
                await self.tick()
                n += 1
                await asyncio.sleep(1.0 / self.rate if self.rate > 0 else 3600)
        finally:
            loop.remove_reader(self.fd)


async def _run_until_signal(device: SerialSimDevice, count: int | None) -> None:
    """Run the device; SIGTERM/SIGINT stop it cleanly (the caller then "unplugs" it)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await device.run(count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serial` subcommand's options."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="create a pseudo-terminal")
    where.add_argument("--port", help="use an existing tty (e.g. one end of a null modem)")
    parser.add_argument("--link", help="with --pty: also make this symlink to it")
    parser.add_argument("--device", default="serial-sim", help="device id (informational)")
    parser.add_argument("--rate", type=float, default=1.0, help="telemetry lines per second")
    parser.add_argument("--format", choices=("json", "kv", "nmea"), default="json", dest="fmt")
    parser.add_argument(
        "--noise",
        default="",
        help=f"comma-separated kinds to inject: {','.join(NOISE_KINDS)}",
    )
    parser.add_argument("--noise-rate", type=float, default=0.2, help="chance per line")
    parser.add_argument("--count", type=int, default=None, help="stop after N lines")
    parser.add_argument("--seed", type=int, default=None)


def main(args: argparse.Namespace) -> int:
    """Run the simulated serial device until interrupted (or `--count` lines)."""
    if args.pty:
        master, slave, path = open_pty(args.link)
    else:
        master = os.open(args.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(master)
        slave, path = -1, args.port
    print(path, flush=True)
    device = SerialSimDevice(
        master,
        args.device,
        rate=args.rate,
        fmt=args.fmt,
        noise=args.noise.split(","),
        noise_rate=args.noise_rate,
        seed=args.seed,
    )
    try:
        asyncio.run(_run_until_signal(device, args.count))
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
        if args.pty and args.link:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.link)
    print(f"sent {device.sent} lines, {device.dropped} dropped", file=sys.stderr)
    return 0
