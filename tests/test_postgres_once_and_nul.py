"""On PostgreSQL: a reading is stored once whoever writes it, and device text with NUL is stored.

Two bridges of a shared group write the same replayed reading at the same moment; the database's
key (device, metric, ts) keeps one (devices/telemetry/store.py). An ack whose result or error
carries ``\\u0000`` (valid JSON, refused by PostgreSQL's text and jsonb) finishes its command with
the NUL replaced and counted (devices/storable.py).
"""

from __future__ import annotations

import pytest

from tests.support.gateway import run_on_postgres

pytestmark = pytest.mark.postgres

TWO_BRIDGES = """
import threading
from django.db import connections
from devices.models import Reading
from devices.telemetry.store import DeviceUpdate, write_batch

rows = [("ret-1", "temperature", 1764214000.0, 19.0), ("ret-1", "humidity", 1764214000.0, 40.0)]
barrier, stored = threading.Barrier(2), []

def bridge():
    barrier.wait()
    stored.append(write_batch(rows, {"ret-1": DeviceUpdate("mqtt", True, 1764214001.0)}))
    connections.close_all()

threads = [threading.Thread(target=bridge) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
stored.append(write_batch(rows, {}))  # a restart's replay
print(sorted(stored), Reading.objects.count())
"""


def test_two_bridges_and_a_replay_store_a_reading_once():
    result = run_on_postgres(TWO_BRIDGES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[0,", "0,", "2]", "2"]


MIGRATION = """
from django.core.management import call_command
from django.db import connection
call_command("migrate", "devices", "0003", verbosity=0)
with connection.cursor() as c:
    c.execute("INSERT INTO devices_device (id, name, transport, online, metrics, created) "
              "VALUES ('d1', '', 'mqtt', false, '{}', now())")
    for value in (19.0, 19.0, 19.0, 20.0):
        ts = "2026-11-27T04:46:40Z" if value == 19.0 else "2026-11-27T04:47:40Z"
        c.execute("INSERT INTO devices_reading (device_id, metric, ts, value) "
                  "VALUES ('d1', 't', %s, %s)", [ts, value])
call_command("migrate", "devices", verbosity=0)
from devices.models import Reading
print(sorted(Reading.objects.values_list("value", flat=True)))
"""


def test_the_migration_keeps_one_of_each_stored_copy():
    result = run_on_postgres(MIGRATION)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[19.0, 20.0]"


NUL_ACKS = r"""
import asyncio, uuid
from datetime import timedelta
from django.utils import timezone
from devices.commands import service as commands
from devices.models import Command, Device
from devices.telemetry.parsing import parse_ack
from gateway.metrics import DEVICE_TEXT_CLEANED

device = Device.objects.create(id="d1")
now = timezone.now()
ids = [uuid.uuid4() for _ in range(2)]
for key in ids:
    Command.objects.create(id=key, device=device, name="run", status="sent", created_at=now,
                           sent_at=now, expires_at=now + timedelta(seconds=60))
# Payloads as a device puts them on devices/<id>/commands/ack (docs/interface.md §3.1), NUL escaped.
good = b'{"id": "%s", "ok": true, "result": {"out\\u0000": "a\\u0000b"}}' % str(ids[0]).encode()
bad = b'{"id": "%s", "ok": false, "error": "disk\\u0000full"}' % str(ids[1]).encode()
good, bad = parse_ack(good, 65536), parse_ack(bad, 65536)

async def main():
    for ack in (good, bad):
        print(await commands.apply_ack("d1", ack.id, ack.ok, ack.result, ack.error))

asyncio.run(main())
for key in ids:
    c = Command.objects.get(id=key)
    print(c.status, c.result, repr(c.error))
print(DEVICE_TEXT_CLEANED.labels(reason="nul")._value.get())
"""


def test_an_ack_with_nul_finishes_its_command_with_the_nul_replaced():
    result = run_on_postgres(NUL_ACKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == ["True", "True"]
    assert lines[2] == "acked {'out\ufffd': 'a\ufffdb'} ''"
    assert lines[3] == "failed None 'disk\ufffdfull'"
    assert lines[4] == "2.0"


QUIET = """
from devices.models import Device, Reading
from devices.telemetry.store import DeviceUpdate, write_batch

T = 1764214000.0
write_batch([("q1", "t", T, 19.0)], {"q1": DeviceUpdate("mqtt", True, T + 5, {"t": 19.0}, T + 5)})
# A restart's replays: a retained reading without ts (fills gaps only, never online/last_seen),
# one with its own ts (stored once, last_seen at most that ts), and a replay-only device.
write_batch(
    [("q1", "h", T + 1, 40.0)],
    {},
    {
        "q1": DeviceUpdate("mqtt", False, None, {"t": 99.0, "p": 1000.0}, T + 60),
        "q2": DeviceUpdate("mqtt", False, None, {"t": 17.5}, T + 60),
    },
)
again = {"q1": DeviceUpdate("mqtt", False, T + 1, {"h": 40.0}, T + 61)}
write_batch([("q1", "h", T + 1, 40.0)], {}, again)
for d in Device.objects.order_by("id"):
    print(d.id, d.online, d.last_seen and d.last_seen.timestamp(), sorted(d.metrics.items()))
print(Reading.objects.count())
"""


def test_replayed_state_never_changes_presence_on_postgresql():
    result = run_on_postgres(QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [
        "q1 True 1764214005.0 [('h', 40.0), ('p', 1000.0), ('t', 19.0)]",
        "q2 False None [('t', 17.5)]",
        "2",
    ]


TIMES = """
from devices.models import Reading
from devices.telemetry.store import _dt, write_batch

# Whole seconds, microsecond rounding edges, before 1970, far ahead (tests/test_pipeline.py).
times = [1764214000.0, 1764214000.5, 1764214000.0000005, 1764214000.9999995, 1e9 + 0.123456,
         -1.5, 4.1e9]
print(write_batch([("d1", "t", ts, 1.0) for ts in times], {}))
read = list(Reading.objects.order_by("ts").values_list("ts", flat=True))
print(read == sorted({_dt(ts) for ts in times}))
"""


def test_the_writer_stores_each_time_as_django_would_on_postgresql():
    result = run_on_postgres(TIMES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["6", "True"]  # 1764214000.0000005 is 1764214000.0
