"""The telemetry pipeline's database side: one transaction per batch (sync; run in a thread).

`write_batch` upserts the batch's devices (register, last_seen, online, merged latest metrics)
with one multi-row ``INSERT … ON CONFLICT DO UPDATE`` per chunk, merging the ``metrics`` JSON
inside the database (SQLite ``json_patch``, PostgreSQL ``||``) so concurrent writers (several
bridges) never lose each other's keys; then inserts the readings with one prepared
``executemany``. Their batches may commit in any order, so the upsert is conditional on time:
an update older than the row's ``last_seen`` never overwrites newer latest values or ``online``.

A reading is stored once per (device, metric, ts): the insert skips one the table already has
(``ON CONFLICT DO NOTHING`` on the readings' primary key), so a retained message replayed
on every subscribe, or a message redelivered to another bridge, adds nothing. A *quiet* update
(a retained message: state, not news of the device) changes metrics and ``last_seen`` like any
other but never ``online`` (docs/retained-and-presence.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from django.conf import settings
from django.db import connections, router, transaction

from devices.models import Device, Reading

logger = logging.getLogger(__name__)

# (device_id, metric, ts epoch seconds, value)
Row = tuple[str, str, float, float]


@dataclass(slots=True)
class DeviceUpdate:
    """What a batch changes on one device; `last_seen` None leaves it as stored.

    `at` is when the latest of its events was received (an offline status too): the upsert
    keeps the stored `online` when the row has news newer than that (another bridge's).
    """

    transport: str
    online: bool
    last_seen: float | None
    metrics: dict[str, float | bool] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def absorb(self, newer: DeviceUpdate) -> None:
        """Fold a later update of the same device into this one (later values win)."""
        self.online = newer.online
        self.at = max(self.at, newer.at)
        if newer.last_seen is not None and (
            self.last_seen is None or newer.last_seen > self.last_seen
        ):
            self.last_seen = newer.last_seen
        self.metrics.update(newer.metrics)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# Columns of the upsert, in order; `name` is '' for new devices. `created` carries the update's
# `at`: the creation time of a new device, and for a known one the time its `online` is news of.
_COLUMNS = ("id", "name", "transport", "online", "last_seen", "metrics", "created")


def _upsert_sql(vendor: str, quote, count: int, quiet: bool = False) -> str:
    table = quote(Device._meta.db_table)
    cols = ", ".join(quote(c) for c in _COLUMNS)
    metrics_ph = "%s::jsonb" if vendor == "postgresql" else "%s"
    row = f"(%s, %s, %s, %s, %s, {metrics_ph}, %s)"
    t = f"{table}."
    ls, mt, at = quote("last_seen"), quote("metrics"), quote("created")
    # Several bridges (shared subscriptions) write one device and their batches commit in any
    # order: values seen before the row's last_seen only fill in metrics the row lacks, and
    # an `online` older than it stays unapplied.
    older_seen = f"(EXCLUDED.{ls} IS NOT NULL AND {t}{ls} IS NOT NULL AND EXCLUDED.{ls} < {t}{ls})"
    older_news = f"({t}{ls} IS NOT NULL AND EXCLUDED.{at} < {t}{ls})"
    if quiet:  # presence stays as stored; latest values without a time only fill gaps
        older_news = "TRUE"
        older_seen = f"({t}{ls} IS NOT NULL AND (EXCLUDED.{ls} IS NULL OR EXCLUDED.{ls} < {t}{ls}))"
    if vendor == "postgresql":
        stored = f"(CASE WHEN jsonb_typeof({t}{mt}) = 'object' THEN {t}{mt} ELSE '{{}}'::jsonb END)"
        merged = (
            f"CASE WHEN {older_seen} THEN EXCLUDED.{mt} || {stored} "
            f"ELSE {stored} || EXCLUDED.{mt} END"
        )
    else:
        stored = f"COALESCE({t}{mt}, '{{}}')"
        merged = (
            f"CASE WHEN {older_seen} THEN json_patch(EXCLUDED.{mt}, {stored}) "
            f"ELSE json_patch({stored}, EXCLUDED.{mt}) END"
        )
    # Never move last_seen backwards (several writers, out-of-order batches).
    last_seen = (
        f"CASE WHEN EXCLUDED.{ls} IS NULL THEN {t}{ls} "
        f"WHEN {t}{ls} IS NULL OR EXCLUDED.{ls} > {t}{ls} THEN EXCLUDED.{ls} "
        f"ELSE {t}{ls} END"
    )
    online = quote("online")
    return (
        f"INSERT INTO {table} ({cols}) VALUES {', '.join([row] * count)} "
        f"ON CONFLICT ({quote('id')}) DO UPDATE SET "
        f"{online} = CASE WHEN {older_news} THEN {t}{online} ELSE EXCLUDED.{online} END, "
        f"{ls} = {last_seen}, {mt} = {merged}"
    )


def upsert_devices(updates: Mapping[str, DeviceUpdate], using: str, quiet: bool = False) -> None:
    """Register unknown devices and apply `updates` to known ones (inside a transaction);
    `quiet`: leave `online` as stored (a new device starts offline)."""
    if not updates:
        return
    connection = connections[using]
    vendor = connection.vendor
    if vendor not in ("sqlite", "postgresql"):
        _upsert_generic(updates, using, quiet)
        return
    ops = connection.ops
    params_per_row = len(_COLUMNS)
    chunk = (
        max(1, connection.features.max_query_params // params_per_row)
        if vendor == "sqlite"
        else 5000
    )
    items = list(updates.items())
    with connection.cursor() as cursor:
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            params: list = []
            for device_id, u in part:
                params += [
                    device_id,
                    "",
                    u.transport,
                    u.online,
                    None
                    if u.last_seen is None
                    else ops.adapt_datetimefield_value(_dt(u.last_seen)),
                    orjson.dumps(u.metrics).decode(),
                    ops.adapt_datetimefield_value(_dt(u.at)),
                ]
            cursor.execute(_upsert_sql(vendor, ops.quote_name, len(part), quiet), params)


def _upsert_generic(updates: Mapping[str, DeviceUpdate], using: str, quiet: bool = False) -> None:
    """Other backends: lock the rows, merge metrics in Python, write back (two queries)."""
    existing = {
        d.id: d
        for d in Device.objects.using(using).select_for_update().filter(id__in=list(updates))
    }
    objs = []
    for device_id, u in updates.items():
        old = existing.get(device_id)
        last_seen = _dt(u.last_seen) if u.last_seen is not None else None
        online = u.online
        if old is not None:
            stored = old.metrics if isinstance(old.metrics, dict) else {}
            if old.last_seen and (
                (last_seen is not None and last_seen < old.last_seen)
                or (quiet and last_seen is None)
            ):
                metrics = {**u.metrics, **stored}  # older (or untimed retained) values fill gaps
            else:
                metrics = {**stored, **u.metrics}
            if quiet or (old.last_seen and _dt(u.at) < old.last_seen):
                online = old.online  # the row has newer news
            if last_seen is None or (old.last_seen and old.last_seen > last_seen):
                last_seen = old.last_seen
        else:
            metrics = dict(u.metrics)
        objs.append(
            Device(
                id=device_id,
                transport=u.transport,
                online=online,
                last_seen=last_seen,
                metrics=metrics,
            )
        )
    kwargs = {}
    if connections[using].features.supports_update_conflicts_with_target:
        kwargs["unique_fields"] = ["id"]
    Device.objects.using(using).bulk_create(
        objs, update_conflicts=True, update_fields=["online", "last_seen", "metrics"], **kwargs
    )


def _insert_readings_sql(quote) -> str:
    cols = ", ".join(
        quote(Reading._meta.get_field(f).column) for f in ("device", "metric", "ts", "value")
    )
    return (
        f"INSERT INTO {quote(Reading._meta.db_table)} ({cols}) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING"
    )


def _insert_readings_unnest_sql(quote) -> str:
    """PostgreSQL: the batch as four arrays in one statement. psycopg's executemany runs its
    pipeline in Python per row (27-30 ms of the writer's CPU per 2,000 rows, holding the GIL
    against the event loop); this is ~11 ms (docs/performance.md, "The latency tail")."""
    cols = ", ".join(
        quote(Reading._meta.get_field(f).column) for f in ("device", "metric", "ts", "value")
    )
    return (
        f"INSERT INTO {quote(Reading._meta.db_table)} ({cols}) SELECT * FROM "
        "unnest(%s::text[], %s::text[], %s::timestamptz[], %s::float8[]) ON CONFLICT DO NOTHING"
    )


def _ensure_devices(device_ids: set[str], updates: Mapping[str, DeviceUpdate], using: str) -> None:
    """Create devices that have rows in this batch but no update (their update went earlier
    and the device was deleted since), so a foreign key never fails a whole batch.

    Such devices nearly always exist: with a backlog, the first batch takes every pending
    update and the next ones carry rows only (up to a device per message at 10,000 devices).
    So they are looked up, one query per chunk, and only the deleted ones created: a model
    instance per device for `bulk_create` would cost a third of the writer thread at 10,000
    devices (docs/performance.md).
    """
    missing = device_ids.difference(updates)
    if not missing:
        return
    devices = Device.objects.using(using)
    ids = sorted(missing)
    chunk = connections[using].features.max_query_params or 5000
    for start in range(0, len(ids), chunk):
        missing.difference_update(
            devices.filter(id__in=ids[start : start + chunk]).values_list("id", flat=True)
        )
    if missing:
        devices.bulk_create([Device(id=d) for d in sorted(missing)], ignore_conflicts=True)


def _stamper(connection) -> Callable[[float], object]:
    """A reading's epoch seconds as its insert parameter for `connection`.

    SQLite stores Django's text of the time, naive in the connection's time zone: for UTC that
    is ``str()`` of the naive UTC datetime, made here without Django's per-call timezone checks
    (a third of the parameters' cost at 2 values per message). PostgreSQL gets the same text
    with its ``+00:00``, cast to timestamptz in the insert: psycopg sends text at half the cost
    of a datetime. Otherwise Django's own adaptation. tests/test_pipeline.py compares them.
    """
    if connection.vendor == "sqlite" and settings.USE_TZ and connection.timezone_name == "UTC":
        return lambda ts: str(datetime.fromtimestamp(ts, UTC).replace(tzinfo=None))
    if connection.vendor == "postgresql":
        return lambda ts: str(datetime.fromtimestamp(ts, UTC))
    adapt = connection.ops.adapt_datetimefield_value
    return lambda ts: adapt(_dt(ts))


def _reading_params(rows: Iterable[Row], stamp) -> list[tuple[str, str, object, float]]:
    """The readings' insert parameters, each distinct `ts` made a parameter once: a message's
    values share it (15 for a Tasmota STATE), and the conversion is the writer's costliest
    Python step, time in which it keeps the GIL from the event loop."""
    stamped: dict[float, object] = {}
    params = []
    for device_id, metric, ts, value in rows:
        when = stamped.get(ts)
        if when is None:
            when = stamped[ts] = stamp(ts)
        params.append((device_id, metric, when, value))
    return params


def write_batch(
    rows: Iterable[Row],
    updates: Mapping[str, DeviceUpdate],
    quiet: Mapping[str, DeviceUpdate] | None = None,
) -> int:
    """Store one batch in one transaction: device upserts (`quiet` ones first), then readings.
    Returns the rows stored: a reading the table already has is not stored again.

    Readings go in with one prepared ``executemany`` rather than ``bulk_create``: the same
    single transaction, without building a model instance per row (about 2x faster on
    SQLite here; psycopg pipelines executemany on PostgreSQL).
    """
    using = router.db_for_write(Reading)
    connection = connections[using]
    params = _reading_params(rows, _stamper(connection))
    stored = 0
    with transaction.atomic(using=using):
        if quiet:
            upsert_devices(quiet, using, quiet=True)
        upsert_devices(updates, using)
        _ensure_devices({p[0] for p in params}, {**(quiet or {}), **updates}, using)
        if params:
            with connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    columns = [list(column) for column in zip(*params, strict=True)]
                    cursor.execute(_insert_readings_unnest_sql(connection.ops.quote_name), columns)
                else:
                    cursor.executemany(_insert_readings_sql(connection.ops.quote_name), params)
                stored = cursor.rowcount
    return stored


def salvage_batch(
    rows: Iterable[Row],
    updates: Mapping[str, DeviceUpdate],
    quiet: Mapping[str, DeviceUpdate] | None = None,
) -> tuple[int, int]:
    """Error path after `write_batch` failed for good (integrity, data, a value the driver
    refuses): write what can be written, one savepoint per row. Returns (stored, refused)."""
    using = router.db_for_write(Reading)
    connection = connections[using]
    adapt = connection.ops.adapt_datetimefield_value
    sql = _insert_readings_sql(connection.ops.quote_name)
    stored = refused = 0
    with transaction.atomic(using=using):
        try:
            with transaction.atomic(using=using):
                if quiet:
                    upsert_devices(quiet, using, quiet=True)
                upsert_devices(updates, using)
        except Exception:
            logger.exception("telemetry: device updates refused by the database, dropped")
        with connection.cursor() as cursor:
            for device_id, metric, ts, value in rows:
                try:
                    with transaction.atomic(using=using):
                        _ensure_devices({device_id}, {}, using)
                        cursor.execute(sql, (device_id, metric, adapt(_dt(ts)), value))
                    stored += max(cursor.rowcount, 0)
                except Exception:
                    refused += 1
    return stored, refused
