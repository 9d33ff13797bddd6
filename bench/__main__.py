"""``python -m bench [--quick] [--profile] [--skip …]``: the gateway against its limit and its peer.

Starts its own mosquitto (and redis-server), the bare aiomqtt subscriber, the mqttasgi 2.0.0
peer, then ``manage.py rungateway`` with a fresh SQLite database (in-memory layer, then
channels-redis) with a logged-in dashboard WebSocket client, and prints ONE table in which
every figure has its baseline from the same run. docs/performance.md explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import os
import signal
import sys
import time
from dataclasses import dataclass

from bench import latency, scenarios, throughput
from bench.harness import Dashboard, Meter, start_gateway, stop_gateway
from bench.peer import run_peer
from bench.report import Table, machine
from tests.support.servers import Mosquitto, Redis

# Patches of the gateway process, in bench/experiments/sitecustomize.py.
EXPERIMENTS = (
    "amortized-clean", "no-deflate", "gc-thresholds", "no-ha-discovery", "right-sized-json",
    "device-rows-per-second", "tracemalloc", "stall-trace",
    "switch-interval", "per-row-adapt", "cprofile", "gc-time",
)  # fmt: skip
PARTS = (
    "bare", "peer", "memory", "discovery", "redis", "latency", "commands", "idle", "scaling",
)  # fmt: skip


#: ``python -m bench NAME …``: bench/NAME.py's own `main` (each prints its own table).
SUBCOMMANDS = {
    "history": "the history query on a large PostgreSQL table",
    "scaleout": "ingest with 1 vs 2 MQTT bridges",
    "hostile": "latency while hostile publishers attack",
    "alerts": "CPU that 1,000 alert rules add per message",
    "modbus": "polling a Modbus bus against its capacity",
    "latency": "the latency rows alone",
    "fleet": "the dashboard at 10,000 devices beside 100",
    "soak": "long steady load with broker and Redis restarts",
    "store": "the telemetry writer's CPU per stored value, SQLite and PostgreSQL",
}


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does (`--quick` is for the test that keeps it alive)."""

    ingest: int  # messages per ingest run (100 devices)
    latency_seconds: float
    latency_rows: tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]  # metrics, dbs, layers
    idle_seconds: float
    commands: int
    scale_devices: tuple[int, ...]
    scale_messages: int
    peer_cap: float  # seconds the peer may take (it gets the `ingest` workload)


QUICK_LATENCY = ((4,), ("sqlite",), ("in-memory",))
FULL_LATENCY = (latency.METRICS, latency.DBS, latency.LAYERS)
QUICK = Sizes(3000, 2.0, QUICK_LATENCY, 2.0, 5, (100, 1000), 3000, 5.0)
FULL = Sizes(50_000, 10.0, FULL_LATENCY, 10.0, 50, (100, 1000, 10_000), 40_000, 30.0)


def scale_count(sizes: Sizes, devices: int) -> int:
    """Messages of the scaling run at `devices` devices (at least two per device)."""
    return max(sizes.scale_messages, devices * 2)


async def run(
    sizes: Sizes, parts: set[str], profile: int, experiments=(), profile_metrics: int = 2
) -> Table:
    """Run the selected parts and fill the table."""
    table = Table()
    base: dict[str, dict[str, float]] = {}
    with Mosquitto() as broker:
        url = broker.url
        if "bare" in parts:
            for qos in (0, 1):  # both protocols: the cost rows are judged against 3.1.1
                both = await throughput.baselines(url, sizes.ingest, qos=qos)
                base[f"q{qos}"], base[f"q{qos}-both"] = both["v5"], both
            base["rich-both"] = await throughput.baselines(
                url, throughput.rich_count(sizes.ingest), metrics=throughput.RICH
            )
            if "scaling" in parts:  # each fleet size has its own baselines, same messages
                for devices in sizes.scale_devices:
                    count = scale_count(sizes, devices)
                    base[f"scale{devices}"] = await throughput.baselines(
                        url, count, devices=devices
                    )
        if "peer" in parts:
            # The QoS 0 in-memory row's workload: as many messages, stored, at the same QoS.
            base["peer"] = await run_peer(url, count=sizes.ingest, cap=sizes.peer_cap, qos=0)
        if profile or parts & {"memory", "discovery", "commands", "idle", "scaling"}:
            await memory_stack(
                url, sizes, parts, base, table, profile, experiments, profile_metrics
            )
        if "redis" in parts:
            with Redis() as redis:
                await redis_stack(url, redis.url, sizes, base, table, experiments)
        if "latency" in parts:  # its own gateways and baselines (bench/latency.py)
            await latency.run(url, table, sizes.latency_seconds, *sizes.latency_rows,
                              experiments=experiments)  # fmt: skip
    return table


async def memory_stack(
    url, sizes, parts, base, table: Table, profile: int, experiments, profile_metrics: int = 2
) -> None:
    """The gateway with the in-memory channel layer: every figure but the Redis rows."""
    gateway = await asyncio.to_thread(start_gateway, url, None, experiments)
    try:
        meter = Meter(gateway.proc.pid)
        rss_start = meter.rss_mb()
        await asyncio.to_thread(gateway.create_user, "bench", "bench-pass-1234")
        cookie = await asyncio.to_thread(gateway.login, "bench", "bench-pass-1234")
        async with Dashboard(gateway, cookie) as dash:
            fleet = None
            try:
                if parts & {"idle", "commands"}:
                    figures, fleet = await scenarios.idle(
                        meter, dash, url, seconds=sizes.idle_seconds
                    )
                    table.idle(figures)
                if "commands" in parts:
                    table.commands(await scenarios.commands(dash, url, rounds=sizes.commands))
            finally:
                if fleet is not None:
                    fleet.terminate()
                    await fleet.wait()
            if "memory" in parts:
                for qos in (0, 1):
                    result = await scenarios.ingest(
                        gateway, dash, meter, prefix=f"mem{qos}", devices=100,
                        count=sizes.ingest, qos=qos,
                    )  # fmt: skip
                    table.ingest("in-memory", qos, result, base.get(f"q{qos}"), 0.6)
                    throughput.cost_rows(table, f"QoS {qos}", result, base.get(f"q{qos}-both"))
                    if qos == 0:
                        table.peer(result, base.get("peer"))
                        base["native"] = result
                result = await scenarios.ingest(
                    gateway, dash, meter, prefix="rich", devices=100,
                    count=throughput.rich_count(sizes.ingest), metrics=throughput.RICH,
                )  # fmt: skip
                throughput.cost_rows(table, "QoS 0", result, base.get("rich-both"))
            if "discovery" in parts:
                result = await scenarios.discovered_ingest(
                    gateway, dash, meter, devices=100, count=sizes.ingest
                )
                table.discovered(result, base.get("native"))
            if profile:
                from bench.profile import profile_ingest

                await profile_ingest(
                    gateway, dash, meter, sizes.ingest * 2, profile, profile_metrics
                )
            if "scaling" in parts:
                if "tracemalloc" in experiments:  # trace from here on
                    os.kill(gateway.proc.pid, signal.SIGUSR1)
                steady = None
                if {"cprofile", "gc-time"} & set(experiments):  # the measured messages only

                    async def steady() -> None:
                        os.kill(gateway.proc.pid, signal.SIGUSR1)

                results = {}
                for devices in sizes.scale_devices:
                    results[devices] = await scenarios.ingest(
                        gateway, dash, meter, prefix=f"s{devices}", devices=devices,
                        count=scale_count(sizes, devices), steady=steady,
                    )  # fmt: skip
                if {"cprofile", "gc-time"} & set(experiments):  # the gateway writes its figures
                    os.kill(gateway.proc.pid, signal.SIGUSR2)
                    await asyncio.sleep(3.0)
                bare = {d: base[f"scale{d}"] for d in sizes.scale_devices if f"scale{d}" in base}
                throughput.scaling_rows(table, results, bare)
                table.rss(max(sizes.scale_devices), meter.rss_mb(), rss_start)
                if "tracemalloc" in experiments:  # the gateway writes its allocation sites
                    os.kill(gateway.proc.pid, signal.SIGUSR2)
                    await asyncio.sleep(5.0)
    finally:
        await stop_gateway(gateway)


async def redis_stack(url, redis_url, sizes, base, table: Table, experiments) -> None:
    """The gateway with channels-redis: the two Redis ingest rows."""
    gateway = await asyncio.to_thread(start_gateway, url, redis_url, experiments)
    try:
        meter = Meter(gateway.proc.pid)
        await asyncio.to_thread(gateway.create_user, "bench", "bench-pass-1234")
        cookie = await asyncio.to_thread(gateway.login, "bench", "bench-pass-1234")
        async with Dashboard(gateway, cookie) as dash:
            for qos in (0, 1):
                result = await scenarios.ingest(
                    gateway, dash, meter, prefix=f"red{qos}", devices=100,
                    count=sizes.ingest, qos=qos,
                )  # fmt: skip
                table.ingest("channels-redis", qos, result, base.get(f"q{qos}"), 0.4)
    finally:
        await stop_gateway(gateway)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(f"bench.{argv[0]}")
        return module.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="other benches: "
        + "; ".join(f"python -m bench {name} ({what})" for name, what in SUBCOMMANDS.items()),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes)")
    parser.add_argument("--profile", action="store_true", help="py-spy one ingest run")
    parser.add_argument("--messages", type=int, help="messages per 100-device ingest run")
    parser.add_argument("--profile-devices", type=int, default=100, metavar="N")
    parser.add_argument("--profile-metrics", type=int, default=2, metavar="N", help="values/msg")
    parser.add_argument(
        "--scale-devices", type=int, action="append", metavar="N",
        help="device counts of the scaling runs (repeatable; default 100, 1000, 10000)",
    )  # fmt: skip
    parser.add_argument("--skip", action="append", default=[], choices=PARTS, metavar="PART")
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        choices=EXPERIMENTS,
        help="patch the gateway process (bench/experiments/sitecustomize.py) to try a fix",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    sizes = QUICK if args.quick else FULL
    if args.messages:
        sizes = dataclasses.replace(sizes, ingest=args.messages)
    if args.scale_devices:
        sizes = dataclasses.replace(sizes, scale_devices=tuple(args.scale_devices))
    print(f"machine: {machine()}", flush=True)
    if args.experiment:
        print(f"experiments in the gateway process: {', '.join(args.experiment)}", flush=True)
    started = time.monotonic()
    profile = args.profile_devices if args.profile else 0  # devices in the profiled run
    parts = set(PARTS) - set(args.skip)
    table = asyncio.run(run(sizes, parts, profile, args.experiment, args.profile_metrics))
    print(table.render())
    print(f"({'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
