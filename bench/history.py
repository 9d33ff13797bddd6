"""``python -m bench history [--rows N]``: the history API's query on a large PostgreSQL table.

Creates a scratch database (``gateway_bench_history``), migrates it, fills ``devices_reading``
with ``INSERT … SELECT generate_series`` (time-major, every series interleaved, as ingestion
writes them), then times ``devices.views.history`` — the function behind
``/api/devices/<id>/telemetry`` — for one device's metric (last hour, last day, all time;
max_points 1000) under several index layouts, with ``EXPLAIN (ANALYZE, BUFFERS)`` of each SQL
statement; finally ``prune_telemetry`` on the same table. The database is dropped afterwards
unless ``--keep``. docs/performance.md ("History at 10 million rows") has the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

DATABASE = "gateway_bench_history"
METRICS = ("temperature", "humidity", "pressure", "battery", "rssi", "co2", "voc", "lux")
#: The index layouts compared: name → (description, CREATE INDEX statements).
TABLE = "devices_reading"
LAYOUTS: dict[str, tuple[str, list[str]]] = {
    "fk": (
        "FK index only (device_id), Django's default",
        [f"CREATE INDEX bench_fk ON {TABLE} (device_id)"],
    ),
    "composite": (
        "(device, metric, ts)",
        [f"CREATE INDEX bench_dmt ON {TABLE} (device_id, metric, ts)"],
    ),
    "include": (
        "(device, metric, ts) INCLUDE (value)",
        [f"CREATE INDEX bench_dmt_cov ON {TABLE} (device_id, metric, ts) INCLUDE (value)"],
    ),
    "series": (
        "(device, metric, ts, value), the covering index before migration 0006",
        [f"CREATE INDEX reading_series_covering ON {TABLE} (device_id, metric, ts, value)"],
    ),
    "key": (
        "primary key (device, metric, ts) INCLUDE (value), the migrations' own (0006)",
        [
            f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey "
            "PRIMARY KEY (device_id, metric, ts) INCLUDE (value)"
        ],
    ),
}


@dataclass(frozen=True)
class Shape:
    """The generated table: `devices` × `metrics` series, one reading every `interval` s."""

    rows: int
    devices: int
    metrics: int
    interval: float

    @property
    def series(self) -> int:
        return self.devices * self.metrics

    @property
    def ticks(self) -> int:
        return max(1, self.rows // self.series)

    @property
    def span(self) -> timedelta:
        return timedelta(seconds=self.ticks * self.interval)


def say(text: str) -> None:
    print(text, flush=True)


def admin(sql: str) -> None:
    """One statement on the server's `postgres` database (CREATE/DROP DATABASE)."""
    import psycopg

    with psycopg.connect(dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def dsn(database: str) -> str:
    """`database` on the tests' PostgreSQL (a throwaway cluster, or GATEWAY_TEST_POSTGRES)."""
    from tests.support.gateway import _dsn, postgres_admin_url

    return _dsn(postgres_admin_url(), database)


def setup_django(database: str) -> None:
    """Point Django at the scratch database (before anything imports the settings)."""
    os.environ["DATABASE_URL"] = dsn(database)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    import django

    django.setup()


def sql(statement: str, params: tuple = ()) -> list[tuple]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def generate(shape: Shape, end: datetime) -> float:
    """Fill the table without indexes (time-major order); returns seconds taken."""
    from devices.models import Device

    Device.objects.bulk_create(
        [Device(id=f"bench-{d:03d}", online=True) for d in range(shape.devices)]
    )
    start = end - shape.span
    metrics = list(METRICS[: shape.metrics])
    began = time.perf_counter()
    sql(
        f"INSERT INTO {TABLE} (device_id, metric, ts, value) "
        "SELECT 'bench-' || lpad(d::text, 3, '0'), m, %s + make_interval(secs => t * %s), "
        "20 + 5 * sin(t / 360.0) + random() "
        "FROM generate_series(0, %s - 1) AS t, generate_series(0, %s - 1) AS d, "
        "unnest(%s::text[]) AS m",
        (start, shape.interval, shape.ticks, shape.devices, metrics),
    )
    took = time.perf_counter() - began
    sql(f"VACUUM (ANALYZE) {TABLE}")  # what autovacuum does to an append-only table
    return took


def drop_reading_indexes() -> None:
    """Every index on the readings table, its primary key too."""
    sql(f'ALTER TABLE {TABLE} DROP CONSTRAINT IF EXISTS "{TABLE}_pkey"')
    rows = sql("SELECT indexname FROM pg_indexes WHERE tablename = %s", (TABLE,))
    for (name,) in rows:
        sql(f'DROP INDEX "{name}"')


def index_sizes() -> dict[str, int]:
    rows = sql(
        "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
        "WHERE relname = %s",
        (TABLE,),
    )
    return dict(rows)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(first, median of the rest) in seconds, and the last result."""
    times = []
    result = None
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    rest = times[1:] or times
    return times[0], statistics.median(rest), result


def explain(statements: list[str]) -> list[str]:
    """One line per SQL statement: plan shape, buffers and execution time from EXPLAIN."""
    import json

    lines = []
    for statement in statements:
        (plan_json,) = sql(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}")[0]
        plan = (json.loads(plan_json) if isinstance(plan_json, str) else plan_json)[0]
        nodes = plan_nodes(plan["Plan"])
        top = plan["Plan"]
        upper = statement.upper()
        kind = "buckets" if "GROUP BY" in upper else "last" if " DESC" in upper else "first N+1"
        lines.append(
            f"{kind}: {' → '.join(nodes)}; rows {top.get('Actual Rows')}, "
            f"buffers hit {top.get('Shared Hit Blocks', 0)} read {top.get('Shared Read Blocks', 0)}"
            f", {plan['Execution Time']:.1f} ms"
        )
    return lines


def plan_nodes(node: dict) -> list[str]:
    """The plan's nodes, depth first: type, index and heap fetches."""
    label = node["Node Type"]
    if "Index Name" in node:
        label += f" on {node['Index Name']}"
    if node.get("Heap Fetches") is not None:
        label += f" (heap fetches {node['Heap Fetches']})"
    return [label] + [line for child in node.get("Plans", []) for line in plan_nodes(child)]


def measure(shape: Shape, end: datetime, repeat: int) -> list[tuple[str, float, float, int]]:
    """Time the history query for the last hour, the last day and all time of one series."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from devices.views import history

    windows = {
        "last hour": end - timedelta(hours=1),
        "last day": end - timedelta(days=1),
        "all time": None,
    }
    results = []
    for label, since in windows.items():
        first, median, points = timed(
            lambda since=since: history("bench-001", "humidity", since, None, 1000), repeat
        )
        with CaptureQueriesContext(connection) as captured:
            history("bench-001", "humidity", since, None, 1000)
        results.append((label, first, median, len(points)))
        say(
            f"    {label:<9} {len(points):>5} points: first {first * 1000:8.1f} ms, "
            f"median of {repeat - 1} {median * 1000:8.1f} ms"
        )
        for line in explain([q["sql"] for q in captured.captured_queries]):
            say(f"      {line}")
    return results


def prune(days_kept_raw: float, downsample_days: float) -> None:
    """Run prune_telemetry on the table and report its throughput."""
    from django.core.management import call_command

    from devices.models import Reading

    def timed_prune() -> float:
        began = time.perf_counter()
        call_command(
            "prune_telemetry",
            retention_days=days_kept_raw,
            downsample_days=downsample_days,
            verbosity=1,
        )
        return time.perf_counter() - began

    before = Reading.objects.count()
    took = timed_prune()
    after = Reading.objects.count()
    say(
        f"  prune_telemetry: {before:,} → {after:,} rows in {took:.1f} s "
        f"({(before - after) / took:,.0f} rows removed/s)"
    )
    say(f"  again (nothing left to do): {timed_prune():.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench history", description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--metrics", type=int, default=4, choices=range(1, len(METRICS) + 1))
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between readings")
    parser.add_argument("--repeat", type=int, default=6, help="runs per query (first is cold)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--no-prune", action="store_true", help="skip the prune_telemetry run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument(
        "--reuse", action="store_true", help="use the table a --keep run left (same shape)"
    )
    args = parser.parse_args(argv)
    shape = Shape(args.rows, args.devices, args.metrics, args.interval)
    end = datetime.now(UTC).replace(microsecond=0)
    reuse = args.reuse and database_exists()
    if not reuse:
        admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        admin(f'CREATE DATABASE "{DATABASE}"')
    try:
        setup_django(DATABASE)
        from django.core.management import call_command

        if not reuse:
            call_command("migrate", verbosity=0)
        (version,) = sql("SHOW server_version")[0]
        (shared,) = sql("SHOW shared_buffers")[0]
        say(
            f"PostgreSQL {version} (shared_buffers {shared}), {os.cpu_count()} cores; "
            f"{shape.ticks * shape.series:,} rows: {shape.devices} devices × {shape.metrics} "
            f"metrics, one reading per {shape.interval:g} s = {shape.span.days} days"
        )
        if reuse:
            (last,) = sql(f"SELECT max(ts) FROM {TABLE}")[0]
            end = last + timedelta(seconds=shape.interval)
        else:
            drop_reading_indexes()
            took = generate(shape, end)
            say(f"  generated in {took:.0f} s")
        (size, count) = sql(
            f"SELECT pg_size_pretty(pg_table_size('{TABLE}')), count(*) FROM {TABLE}"
        )[0]
        say(f"  table {size}, {count:,} rows")
        for name in args.layouts.split(","):
            description, statements = LAYOUTS[name]
            drop_reading_indexes()
            began = time.perf_counter()
            for statement in statements:
                sql(statement)
            sql(f"VACUUM (ANALYZE) {TABLE}")
            built = time.perf_counter() - began
            sizes = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in index_sizes().items())
            say(f"  layout {name}: {description}; built in {built:.0f} s; {sizes}")
            measure(shape, end, args.repeat)
        if not args.no_prune:
            # The migrations' own key, then keep 7 days raw, hourly averages beyond.
            if args.layouts.split(",")[-1] != "key":
                drop_reading_indexes()
                sql(LAYOUTS["key"][1][0])
                sql(f"VACUUM (ANALYZE) {TABLE}")
            prune(7, 365)
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            say(f"  dropped {DATABASE}")
    return 0


def database_exists() -> bool:
    import psycopg

    with psycopg.connect(dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
            is not None
        )


if __name__ == "__main__":
    sys.exit(main())
