"""The fleet's command line, shared by `manage.py simulate` and `python -m firmware_sim mqtt`.

    simulate [--mqtt URL] [--devices N] [--rate HZ] [--style STYLE] [--faults SPEC]
             [--prefix NAME] [--qos 0|1] [--duration SECONDS] [--seed N] [--reboot-delay S]

Runs until Ctrl-C / SIGTERM (or `--duration`), then every device leaves cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from firmware_sim.device import STYLES
from firmware_sim.faults import FaultSpec, FaultSpecError
from firmware_sim.fleet import DEFAULT_URL, Fleet, FleetConfig

Echo = Callable[[str], None]


def add_arguments(parser: argparse.ArgumentParser, default_url: str | None = None) -> None:
    """Add the fleet's options to a parser (argparse or a Django command's)."""
    url = default_url or os.environ.get("MQTT_URL", "").strip() or DEFAULT_URL
    parser.add_argument("--mqtt", default=url, metavar="URL", help=f"broker (default {url})")
    parser.add_argument("--devices", type=int, default=10, metavar="N", help="fleet size (10)")
    parser.add_argument(
        "--rate", type=float, default=1.0, metavar="HZ", help="telemetry per device per s (1)"
    )
    parser.add_argument("--style", choices=list(STYLES), default="native")
    parser.add_argument(
        "--faults",
        action="append",
        default=[],
        metavar="SPEC",
        help="KIND[=VALUE][@TARGET], comma-separated or repeated; kinds: drop=SECONDS, "
        "noack, delay=SECONDS, garbage=PROBABILITY, burst=FACTOR; target: 10%% or id+id",
    )
    parser.add_argument("--prefix", default=None, help="device ids are PREFIX-0001… (sim/<style>)")
    parser.add_argument("--qos", type=int, choices=[0, 1], default=0, help="telemetry QoS")
    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="stop after this long"
    )
    parser.add_argument("--seed", type=int, default=None, help="reproducible signals and faults")
    parser.add_argument("--reboot-delay", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument(
        "--report", type=float, default=10.0, metavar="SECONDS", help="stats every (0: never)"
    )


def config_from_options(options: Mapping[str, Any]) -> FleetConfig:
    """Build the FleetConfig from parsed options (argparse vars or Django's options)."""
    return FleetConfig(
        url=options["mqtt"],
        devices=options["devices"],
        rate=options["rate"],
        style=options["style"],
        prefix=options.get("prefix"),
        qos=options["qos"],
        faults=FaultSpec.parse_many(options.get("faults") or []),
        seed=options.get("seed"),
        reboot_delay=options.get("reboot_delay", 1.0),
    )


def _stdout(line: str) -> None:
    print(line, flush=True)


async def run_fleet(
    config: FleetConfig,
    duration: float | None = None,
    echo: Echo = _stdout,
    report_every: float = 10.0,
) -> dict[str, Any]:
    """Run a fleet until SIGINT/SIGTERM or `duration`, then stop it cleanly; returns its stats."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    if duration is not None:
        loop.call_later(duration, stop.set)
    fleet = Fleet(config)
    cpu0 = time.process_time()
    stopping = asyncio.create_task(stop.wait())
    echo(
        f"simulate: {config.devices} {config.style} devices ({config.prefix}-…) → {config.url} "
        f"at {config.rate:g} Hz"
    )
    try:
        await fleet.start()
        connected = asyncio.create_task(fleet.wait_connected())
        await asyncio.wait([connected, stopping], timeout=15, return_when=asyncio.FIRST_COMPLETED)
        stats = fleet.stats()
        if connected.done():
            echo(
                f"simulate: {stats['connected']}/{stats['devices']} connected in "
                f"{fleet.connected_after:.2f} s (CPU {time.process_time() - cpu0:.2f} s)"
            )
        else:
            connected.cancel()
            echo(
                f"simulate: only {stats['connected']}/{stats['devices']} connected after 15 s "
                f"({stats['connect_failures']} failed attempts); the rest keep retrying"
            )
        if not stop.is_set():
            for spec, devices in zip(config.faults, map(fleet.apply, config.faults), strict=True):
                names = ", ".join(d.id for d in devices[:5]) + (" …" if len(devices) > 5 else "")
                value = "" if spec.value is None else f"={spec.value:g}"
                echo(f"simulate: fault {spec.kind}{value} on {len(devices)}: {names}")
        await _report_until(stop, fleet, echo, report_every)
    finally:
        stopping.cancel()
        echo("simulate: stopping")
        await fleet.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)
    stats = fleet.stats()
    echo(
        f"simulate: stopped; {stats['sent']} telemetry ticks, {stats['acks_sent']} acks, "
        f"{stats['connects']} connects, CPU {time.process_time() - cpu0:.2f} s"
    )
    return stats


async def _report_until(stop: asyncio.Event, fleet: Fleet, echo: Echo, every: float) -> None:
    last_sent, last = fleet.stats()["sent"], time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every if every > 0 else None):
                await stop.wait()
        if stop.is_set():
            return
        stats, now = fleet.stats(), time.monotonic()
        rate = (stats["sent"] - last_sent) / (now - last)
        last_sent, last = stats["sent"], now
        echo(
            f"simulate: {stats['connected']}/{stats['devices']} online, {rate:.0f} ticks/s, "
            f"{stats['commands']} commands, {stats['drops']} drops, {stats['reboots']} reboots"
        )


def main(args: argparse.Namespace) -> int:
    """Entry point of `python -m firmware_sim mqtt`."""
    try:
        config = config_from_options(vars(args))
    except (ValueError, FaultSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run_fleet(config, args.duration, report_every=args.report))
    return 0
