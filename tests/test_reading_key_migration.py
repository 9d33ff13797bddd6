"""Migration devices/0006 keys readings by (device, metric, ts), on SQLite and PostgreSQL.

A database with readings in the layout before (a row id, the `reading_once` unique index and
the covering series index) is migrated to the latest: every reading is kept, a second copy of
one can no longer be stored, the history answers as before, and the table is the one structure
the model describes (SQLite: WITHOUT ROWID, no other index; PostgreSQL: the primary key INCLUDE
(value), no other index; a later migration that made Django rebuild the table fails this).
Migrating back restores the layout before, readings kept.
"""

from __future__ import annotations

import json

import pytest

from tests.support.gateway import run_on_postgres, run_on_sqlite

STORY = """
import json
from datetime import UTC, datetime
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction

T1 = datetime(2026, 11, 27, 4, 46, 40, 500000, tzinfo=UTC)
T2 = datetime(2026, 11, 27, 4, 47, 40, tzinfo=UTC)
TABLE = "devices_reading"
ROWS = [("d1", "t", T1, 19.0), ("d1", "h", T1, 40.0), ("d2", "t", T1, 18.0), ("d1", "t", T2, 20.0)]
adapt = connection.ops.adapt_datetimefield_value
out = {}


def stored():
    with connection.cursor() as c:
        c.execute("SELECT device_id, metric, ts, value FROM devices_reading")
        rows = c.fetchall()
    return sorted([d, m, str(ts), v] for d, m, ts, v in rows)


def copy_refused():
    # What any writer does with a second copy of a stored reading: refused by the database.
    try:
        with transaction.atomic(), connection.cursor() as c:
            c.execute(
                "INSERT INTO devices_reading (device_id, metric, ts, value) "
                "VALUES (%s, %s, %s, %s)",
                ["d1", "t", adapt(T1), 99.0],
            )
    except IntegrityError:
        return True
    return False


def layout():
    with connection.cursor() as c:
        if connection.vendor == "sqlite":
            c.execute("SELECT type, name, sql FROM sqlite_master WHERE tbl_name = %s", [TABLE])
            return [[t, n, s.endswith("WITHOUT ROWID")] for t, n, s in sorted(c.fetchall())]
        c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [TABLE])
        indexes = [[n, d.split(" USING ")[1]] for n, d in sorted(c.fetchall())]
        c.execute("SELECT reloptions FROM pg_class WHERE relname = %s", [TABLE])
        return [*indexes, c.fetchone()[0]]  # and 0003's autovacuum setting, kept


call_command("migrate", "devices", "0005", verbosity=0)
with connection.cursor() as c:
    for device in ("d1", "d2"):
        c.execute(
            "INSERT INTO devices_device (id, name, transport, online, metrics, created) "
            "VALUES (%s, '', 'mqtt', %s, '{}', %s)",
            [device, False, adapt(T1)],
        )
    for d, m, ts, v in ROWS:
        c.execute(
            "INSERT INTO devices_reading (device_id, metric, ts, value) VALUES (%s, %s, %s, %s)",
            [d, m, adapt(ts), v],
        )
out["before"] = stored()
out["before refuses a copy"] = copy_refused()

call_command("migrate", "devices", verbosity=0)  # 0006 and any later one
from devices.telemetry.store import write_batch
from devices.views import history

out["after"] = stored()
out["after refuses a copy"] = copy_refused()
out["writer stores a copy"] = write_batch([("d1", "t", T1.timestamp(), 99.0)], {})
out["writer stores a new one"] = write_batch([("d1", "t", T2.timestamp() + 1, 21.0)], {})
out["history"] = history("d1", "t", None, None, 1000)
out["layout"] = layout()
if connection.vendor == "sqlite":
    with connection.cursor() as c:
        c.execute(
            "EXPLAIN QUERY PLAN SELECT ts, value FROM devices_reading "
            "WHERE device_id = 'd1' AND metric = 't' ORDER BY ts"
        )
        out["plan"] = [row[-1] for row in c.fetchall()]

call_command("migrate", "devices", "0005", verbosity=0)
out["back"] = stored()
out["back refuses a copy"] = copy_refused()
out["back layout"] = layout()
print(json.dumps(out))
"""

T1 = "2026-11-27 04:46:40.500000"
T2 = "2026-11-27 04:47:40"
KEPT = [["d1", "h", T1, 40.0], ["d1", "t", T1, 19.0], ["d1", "t", T2, 20.0], ["d2", "t", T1, 18.0]]
NEW = ["d1", "t", "2026-11-27 04:47:41", 21.0]


def story(run) -> dict:
    result = run(STORY)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("before", "after", "back"):  # the database's own text of each time, made equal
        out[key] = [
            [d, m, ts.replace("T", " ").removesuffix("+00:00"), v] for d, m, ts, v in out[key]
        ]
    return out


def check_common(out: dict) -> None:
    assert out["before"] == KEPT
    assert out["before refuses a copy"] is True
    assert out["after"] == KEPT, "every reading kept, none added"
    assert out["after refuses a copy"] is True
    assert out["writer stores a copy"] == 0 and out["writer stores a new one"] == 1
    assert out["history"] == [[1795754800.5, 19.0], [1795754860.0, 20.0], [1795754861.0, 21.0]]
    assert out["back"] == sorted([*KEPT, NEW]), "migrating back keeps them too"
    assert out["back refuses a copy"] is True


def test_sqlite_readings_migrate_to_one_keyed_table_and_back():
    out = story(run_on_sqlite)
    check_common(out)
    assert out["layout"] == [["table", "devices_reading", True]]  # the key's b-tree alone
    assert out["plan"] == ["SEARCH devices_reading USING PRIMARY KEY (device_id=? AND metric=?)"]
    assert out["back layout"] == [
        ["index", "reading_once", False],
        ["index", "reading_series_covering", False],
        ["table", "devices_reading", False],
    ]


@pytest.mark.postgres
def test_postgresql_readings_migrate_to_one_keyed_index_and_back():
    out = story(run_on_postgres)
    check_common(out)
    assert out["layout"] == [
        ["devices_reading_pkey", "btree (device_id, metric, ts) INCLUDE (value)"],
        ["autovacuum_vacuum_insert_scale_factor=0.01"],
    ]
    assert out["back layout"] == [
        ["devices_reading_pkey", "btree (id)"],
        ["reading_once", "btree (device_id, metric, ts)"],
        ["reading_series_covering", "btree (device_id, metric, ts, value)"],
        ["autovacuum_vacuum_insert_scale_factor=0.01"],
    ]
