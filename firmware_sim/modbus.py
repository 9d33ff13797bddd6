"""Simulated Modbus RTU units on one pseudo-terminal (`python -m firmware_sim modbus`).

Several units share one bus (one pty), each built from a register-map profile shipped with the
gateway (`devices/conventions/modbus_profiles/*.json`, read as data). Requests are decoded and
answered with pymodbus's RTU framer and request PDUs, run against this module's register store;
values drift over time (energy counters only grow) and writable coils/registers keep what is
written. Faults on demand, per unit: ``silent`` (no answer), ``crc`` (answer with a broken
CRC), ``exception=CODE`` (exception response), ``slow=SECONDS`` (answer late).

    python -m firmware_sim modbus --list-profiles
    python -m firmware_sim modbus --pty --profile xy-md02 --unit 1 --unit 2 [--fault silent@2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse

from firmware_sim.serial_device import open_pty

PROFILE_DIR = Path(__file__).resolve().parent.parent / "devices" / "conventions" / "modbus_profiles"
_FORMATS = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "float64": "d",
}
_WIDTH = {"int32": 2, "uint32": 2, "float32": 2, "float64": 4}
_FC_TABLE = {1: "coil", 2: "discrete", 3: "holding", 4: "input", 5: "coil", 6: "holding",
             15: "coil", 16: "holding"}  # fmt: skip
#: Typical values by engineering unit, so simulated readings look like the real device's.
_BASE = {"V": 230.0, "A": 2.5, "W": 560.0, "VA": 575.0, "var": 120.0, "Hz": 50.0,
         "kWh": 1234.5, "°C": 21.5, "%": 45.0}  # fmt: skip


def profile_names(folder: Path = PROFILE_DIR) -> list[str]:
    """The shipped profile NAMEs."""
    return sorted(p.stem for p in folder.glob("*.json"))


def read_profile(ref: str) -> dict[str, Any]:
    """A profile document by NAME or path."""
    path = Path(ref) if "/" in ref or ref.endswith(".json") else PROFILE_DIR / f"{ref}.json"
    return json.loads(path.read_bytes())


class SimUnit:
    """One unit's register store, filled from a profile and drifting with time."""

    def __init__(self, profile: dict[str, Any], unit: int) -> None:
        self.unit = unit
        self.points = profile["points"]
        self.defaults = {k: profile.get(k, "big") for k in ("word_order", "byte_order")}
        self.tables: dict[str, dict[int, int]] = {
            t: {} for t in ("coil", "discrete", "holding", "input")
        }
        self.written: set[tuple[str, int]] = set()
        self.started = time.monotonic()
        self.fault: str | None = None  # silent | crc | exception=N | slow=S
        self.refresh()

    def _words(self, point: dict[str, Any], value: float) -> list[int]:
        kind = point.get("type", "uint16")
        raw = (value - point.get("offset", 0)) / point.get("scale", 1)
        if not kind.startswith("float"):
            raw = int(round(raw))
        data = struct.pack(">" + _FORMATS[kind], raw)
        order = point.get("byte_order", self.defaults["byte_order"])
        words = [int.from_bytes(data[i : i + 2], order) for i in range(0, len(data), 2)]
        return (
            words[::-1]
            if point.get("word_order", self.defaults["word_order"]) == "little"
            else words
        )

    def value_of(self, point: dict[str, Any], elapsed: float) -> float:
        """The simulated engineering value of a register point now."""
        base = _BASE.get(point.get("unit", ""), 1.0)
        if point.get("unit") == "kWh":
            return base + self.unit + elapsed * 0.01  # counters only grow
        phase = (hash(point["name"]) % 100) / 10 + self.unit
        return base * (1 + 0.02 * math.sin(elapsed / 7 + phase))

    def refresh(self) -> None:
        """Recompute every non-written register point for the current time."""
        elapsed = time.monotonic() - self.started
        for point in self.points:
            table, address = point["table"], point["address"]
            if (table, address) in self.written:
                continue
            if table in ("coil", "discrete"):
                self.tables[table].setdefault(address, 0)
                continue
            if point.get("writable"):
                value = 0.0
            else:
                value = self.value_of(point, elapsed)
            for i, word in enumerate(self._words(point, value)):
                self.tables[table][address + i] = word

    # --- the datastore interface pymodbus's request PDUs call -------------------------
    async def async_getValues(self, device_id: int, fc: int, address: int, count: int = 1) -> Any:
        self.refresh()
        table = self.tables[_FC_TABLE[fc]]
        if any(a not in table for a in range(address, address + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        values = [table[a] for a in range(address, address + count)]
        return [bool(v) for v in values] if fc in (1, 2, 5, 15) else values

    async def async_setValues(
        self, device_id: int, fc: int, address: int, values: list[Any]
    ) -> Any:
        name = _FC_TABLE[fc]
        writable = {
            (p["table"], p["address"] + i)
            for p in self.points
            if p.get("writable")
            for i in range(_WIDTH.get(p.get("type", "bool"), 1))
        }
        if any((name, address + i) not in writable for i in range(len(values))):
            return ExcCodes.ILLEGAL_ADDRESS
        for i, value in enumerate(values):
            self.tables[name][address + i] = int(value)
            self.written.add((name, address + i))
        return None


class SimBus:
    """Answers requests for its units: RTU on one fd (a pty master or a tty) by default, or any
    framer and `write` (Modbus TCP: `FramerSocket` and a socket transport's write)."""

    def __init__(
        self,
        fd: int | None,
        units: dict[int, SimUnit],
        *,
        framer: Any = None,
        write: Any = None,
    ) -> None:
        self.fd = fd
        self.units = units
        self.framer = framer or FramerRTU(DecodePDU(True))
        self.write = write or (lambda frame: os.write(self.fd, frame))
        self.buffer = b""
        self.requests = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start answering (the running loop watches the fd)."""
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def stop(self) -> None:
        """Stop answering."""
        asyncio.get_running_loop().remove_reader(self.fd)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # nothing yet, or the pty is closing
            return
        self.feed(data)

    def feed(self, data: bytes) -> None:
        """Bytes from the master: answer every complete request."""
        self.buffer += data
        while self.buffer:
            try:
                used, pdu = self.framer.handleFrame(self.buffer, 0, 0)
            except Exception:  # an undecodable request: drop what we have, as a device would
                self.buffer = b""
                return
            if not used:
                return
            self.buffer = self.buffer[used:]
            if pdu is not None:
                task = asyncio.create_task(self._answer(pdu))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, pdu: Any) -> None:
        unit = self.units.get(pdu.dev_id)
        if unit is None:
            return  # not on this bus: nobody answers
        self.requests += 1
        fault = unit.fault or ""
        if fault == "silent":
            return
        if fault.startswith("exception="):
            response = ExceptionResponse(pdu.function_code, int(fault.split("=", 1)[1]))
        else:
            response = await pdu.datastore_update(unit, pdu.dev_id)
        response.dev_id, response.transaction_id = pdu.dev_id, pdu.transaction_id
        frame = self.framer.buildFrame(response)
        if fault == "crc":
            frame = frame[:-2] + bytes([frame[-2] ^ 0xFF, frame[-1]])
        if fault.startswith("slow="):
            await asyncio.sleep(float(fault.split("=", 1)[1]))
        try:
            self.write(frame)
        except OSError:
            pass


class _TcpConnection(asyncio.Protocol):
    """One Modbus TCP client connection to the simulated units."""

    def __init__(self, units: dict[int, SimUnit]) -> None:
        self.units = units
        self.bus: SimBus | None = None

    def connection_made(self, transport: Any) -> None:
        self.bus = SimBus(
            None, self.units, framer=FramerSocket(DecodePDU(True)), write=transport.write
        )

    def data_received(self, data: bytes) -> None:
        assert self.bus is not None
        self.bus.feed(data)


async def serve_tcp(
    units: dict[int, SimUnit], host: str = "127.0.0.1", port: int = 0
) -> asyncio.Server:
    """The units behind a Modbus TCP server (port 0: any free one)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _TcpConnection(units), host, port)


def parse_fault(text: str) -> tuple[int, str]:
    """``KIND[=VALUE]@UNIT`` → (unit, fault)."""
    fault, _, unit = text.partition("@")
    kind = fault.split("=", 1)[0]
    if kind not in ("silent", "crc", "exception", "slow") or not unit.isdigit():
        raise argparse.ArgumentTypeError(f"bad fault {text!r}: silent|crc|exception=N|slow=S @UNIT")
    return int(unit), fault


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m firmware_sim modbus`."""
    parser.add_argument(
        "--list-profiles", action="store_true", help="print the shipped profile names"
    )
    parser.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal")
    parser.add_argument(
        "--tcp", metavar="HOST:PORT", help="serve Modbus TCP instead (port 0: any free port)"
    )
    parser.add_argument("--link", metavar="PATH", help="also a symlink to the pty here (printed)")
    parser.add_argument("--profile", default="xy-md02", help="profile NAME or path")
    parser.add_argument("--unit", type=int, action="append", default=[], help="unit id, repeatable")
    parser.add_argument(
        "--fault",
        type=parse_fault,
        action="append",
        default=[],
        help="KIND[=VALUE]@UNIT: silent, crc, exception=CODE, slow=SECONDS",
    )


async def serve(args: argparse.Namespace) -> int:
    """Serve the units on a new pty (or Modbus TCP) until SIGTERM/SIGINT."""
    profile = read_profile(args.profile)
    units = {u: SimUnit(profile, u) for u in (args.unit or [1])}
    for unit, fault in args.fault:
        if unit in units:
            units[unit].fault = fault
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        server = await serve_tcp(units, host or "127.0.0.1", int(port))
        bound = server.sockets[0].getsockname()
        print(f"tcp://{bound[0]}:{bound[1]}", flush=True)
        await stop.wait()
        server.close()
        return 0
    master, slave, path = open_pty(args.link)
    print(path, flush=True)
    bus = SimBus(master, units)
    bus.start()
    await stop.wait()
    bus.stop()
    os.close(master)
    os.close(slave)
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point of `python -m firmware_sim modbus`."""
    if args.list_profiles:
        for name in profile_names():
            print(name)
        return 0
    if not args.pty and not args.tcp:
        print("give --pty or --tcp HOST:PORT (or --list-profiles)", file=sys.stderr)
        return 2
    try:
        read_profile(args.profile)
    except (OSError, ValueError) as exc:
        print(f"cannot read profile {args.profile!r}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(args))
