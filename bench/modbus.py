"""``python -m bench modbus``: polling 10 units × 20 registers, against the bus's capacity.

The simulated units (`python -m firmware_sim modbus --pty`) serve a bench profile of 20
contiguous input registers; `rungateway --modbus` polls each unit once a second, one read of
20 registers each (one transaction at a time on the bus). A pty has no line speed, so the row
compares what the gateway achieved with what a real 9600-baud RS-485 line could carry: the
time one poll takes on the wire, from its frame sizes (docs/serial.md), times the polls done
per second is the share of the line the schedule uses. CPU per poll is the gateway process's
CPU time over the polls it made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.report import Table, machine
from tests.support.gateway import ROOT, GatewayProcess
from tests.support.servers import Mosquitto

UNITS, REGISTERS, INTERVAL, BAUD = 10, 20, 1.0, 9600
BITS_PER_CHAR = 11  # RTU: start, 8 data bits, parity (or a second stop bit), stop
REQUEST_BYTES = 8  # unit, function, address (2), count (2), CRC (2)
RESPONSE_BYTES = 5 + 2 * REGISTERS  # unit, function, byte count, data, CRC (2)
GAP_CHARS = 3.5  # the silence that ends each RTU frame


def poll_seconds() -> float:
    """One poll on a 9600-baud line: request, response and the gap after each."""
    chars = REQUEST_BYTES + RESPONSE_BYTES + 2 * GAP_CHARS
    return chars * BITS_PER_CHAR / BAUD


def profile(path: Path) -> Path:
    """A bench profile: `REGISTERS` contiguous uint16 input registers from address 0."""
    points = [
        {"name": f"r{i:02d}", "table": "input", "address": i, "type": "uint16"}
        for i in range(REGISTERS)
    ]
    path.write_text(json.dumps({"name": "bench-20", "source": "bench", "points": points}))
    return path


def requests_ok(gw: GatewayProcess) -> float:
    """Successful Modbus transactions so far, every unit of every bus."""
    _, text = gw.http_get("/metrics")
    pattern = r'^gateway_modbus_requests_total\{[^}]*result="ok"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, str(text), re.M))


async def measure(seconds: float, faults: tuple[str, ...] = ()) -> dict[str, float]:
    """Run the units and the gateway; polls per second and CPU per poll over `seconds`."""
    with tempfile.TemporaryDirectory(prefix="bench-modbus-") as tmp:
        units = [arg for unit in range(1, UNITS + 1) for arg in ("--unit", str(unit))]
        units += [arg for fault in faults for arg in ("--fault", fault)]
        sim = subprocess.Popen(  # noqa: ASYNC220 - set-up, before anything is measured
            [sys.executable, "-m", "firmware_sim", "modbus", "--pty"]
            + ["--profile", str(profile(Path(tmp) / "bench-20.json")), *units],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert sim.stdout is not None
            pty = sim.stdout.readline().strip()
            config = Path(tmp) / "bus.json"
            bus = {"port": pty, "baudrate": BAUD, "timeout": 0.5, "units": []}
            for unit in range(1, UNITS + 1):
                bus["units"].append(
                    {
                        "unit": unit,
                        "device": f"bench-mb-{unit}",
                        "profile": str(Path(tmp) / "bench-20.json"),
                        "interval": INTERVAL,
                    }
                )
            config.write_text(json.dumps({"buses": [bus]}))
            with (
                Mosquitto() as broker,
                GatewayProcess(
                    broker.url, args=["--modbus", str(config)], log_level="WARNING"
                ) as gw,
            ):
                assert gw.proc is not None
                process = psutil.Process(gw.proc.pid)
                await asyncio.sleep(3.0)  # every unit answered once
                polls, cpu, started = (
                    requests_ok(gw),
                    sum(process.cpu_times()[:2]),
                    time.monotonic(),
                )
                await asyncio.sleep(seconds)
                polls = requests_ok(gw) - polls
                cpu = sum(process.cpu_times()[:2]) - cpu
                elapsed = time.monotonic() - started
        finally:
            sim.terminate()
            sim.wait(5)
    return {"rate": polls / elapsed, "cpu_us": cpu / max(polls, 1) * 1e6, "polls": polls}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench modbus", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time (20)")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    table = Table()
    for faults, answering in (((), UNITS), ((f"silent@{UNITS}",), UNITS - 1)):
        figures = asyncio.run(measure(args.seconds, faults))
        scheduled = answering / INTERVAL
        share = figures["rate"] * poll_seconds()
        silent = f", unit {UNITS} silent" if faults else ""
        table.add(
            f"{UNITS} units × {REGISTERS} registers every {INTERVAL:g} s{silent}",
            f"{figures['rate']:.2f} answered polls/s ({figures['polls']:.0f}), "
            f"{figures['cpu_us']:.0f} µs CPU/poll; {share:.0%} of a {BAUD}-baud line",
            f"the schedule: {scheduled:.0f} polls/s of the answering units, "
            f"{poll_seconds() * 1000:.1f} ms each on the wire",
            f"{figures['rate'] / scheduled:.2f}× schedule",
            "≥ 0.95× schedule, ≤ 80 % of the line",
            figures["rate"] >= 0.95 * scheduled and share <= 0.8,
        )
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
