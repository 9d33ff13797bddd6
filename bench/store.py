"""``python -m bench store``: the telemetry writer's CPU per stored value, alone.

No MQTT, no event loop: `devices.telemetry.store.write_batch` stores batches shaped like the
ingest rows' (100 devices round robin, ``--metrics`` values per message, 2,000 values per
batch, each batch with its devices' updates) into a fresh, migrated database of each backend:
an SQLite file as the gateway opens it (WAL, synchronous=NORMAL) and a throwaway PostgreSQL
database (the tests' server, or ``GATEWAY_TEST_POSTGRES``). Printed per backend: CPU per
stored value in this process (``time.process_time``: what the gateway's writer thread pays)
and, on PostgreSQL, in the server's backend process (read from /proc when the server is
local). Each backend runs in its own child process. docs/performance.md, "The cost of
storing a value", has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 100
BATCH = 2000
METRIC_NAMES = (
    "n", "temperature", "humidity", "pressure", "voltage", "current", "power", "apparent_power",
    "reactive_power", "factor", "today", "yesterday", "total", "period", "frequency",
)  # fmt: skip


def _backend_cpu(pid: int | None) -> float:
    """Seconds of CPU of a local process (the PostgreSQL backend), 0 if not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child(metrics: int, batches: int) -> dict:
    """In a child process with DATABASE_URL set: migrate, store, measure."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from devices.telemetry.store import DeviceUpdate, write_batch

    call_command("migrate", verbosity=0)
    names = METRIC_NAMES[:metrics]
    t = time.time() - 86400.0
    work = []
    for _ in range(batches + 2):  # two warm-up batches
        rows, updates = [], {}
        while len(rows) < BATCH:
            for d in range(DEVICES):
                t += 0.001
                device = f"bench-{d:05d}"
                rows += [(device, name, t, 21.5) for name in names]
                updates[device] = DeviceUpdate("mqtt", True, t, {"temperature": 21.5}, t)
        work.append((rows, updates))
    pid = None
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
    for rows, updates in work[:2]:
        write_batch(rows, updates)
    stored = 0
    cpu0, server0 = time.process_time(), _backend_cpu(pid)
    for rows, updates in work[2:]:
        stored += write_batch(rows, updates)
    cpu, server = time.process_time() - cpu0, _backend_cpu(pid) - server0
    return {
        "vendor": connection.vendor,
        "values": stored,
        "us_per_value": 1e6 * cpu / stored,
        "server_us_per_value": 1e6 * server / stored if pid else None,
    }


def _run_child(database_url: str, metrics: int, batches: int) -> dict:
    env = {**os.environ, "DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": "gateway.settings"}
    argv = [sys.executable, "-m", "bench", "store", "--child", "--metrics", str(metrics)]
    argv += ["--batches", str(batches)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run each backend, print one line per run."""
    parser = argparse.ArgumentParser(prog="python -m bench store", description=__doc__)
    parser.add_argument("--metrics", type=int, default=2, help="values per message (≤ 15)")
    parser.add_argument("--batches", type=int, default=50, help="measured batches of 2,000")
    parser.add_argument("--db", default="sqlite,postgresql", help="backends, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each backend, in turn")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.metrics, args.batches)))
        return 0
    from tests.support.gateway import postgres_database

    for _ in range(args.rounds):
        for vendor in args.db.split(","):
            if vendor == "sqlite":
                with tempfile.TemporaryDirectory(prefix="bench-store-") as directory:
                    url = f"sqlite:///{directory}/db.sqlite3"
                    result = _run_child(url, args.metrics, args.batches)
            else:
                with postgres_database() as url:
                    result = _run_child(url, args.metrics, args.batches)
            server = result["server_us_per_value"]
            print(
                f"{result['vendor']:10s} {args.metrics:2d} values/msg, {result['values']:,} "
                f"stored: {result['us_per_value']:.2f} µs CPU per value in the writer"
                + (f", {server:.2f} µs in the PostgreSQL backend" if server is not None else ""),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
