"""devices.telemetry.pipeline on the real test database and the real in-memory channel layer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from channels.db import database_sync_to_async
from django.db import connections
from django.test.utils import CaptureQueriesContext

from devices.models import Device, Reading
from devices.telemetry.pipeline import (
    TelemetryPipeline,
    current_pipeline,
    get_pipeline,
    merge_pending,
)
from devices.telemetry.store import _dt, _stamper, write_batch
from gateway.metrics import TELEMETRY_DROPPED, TELEMETRY_STORED
from tests.support.checks import sql
from tests.support.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)
TS = 1_764_214_000.0


@pytest.fixture
async def pipeline(layer):
    pipeline = get_pipeline()
    yield pipeline
    await pipeline.close()


async def next_events(layer, channel, wait: float = 5.0) -> list[dict]:
    message = await asyncio.wait_for(layer.receive(channel), wait)
    assert message["type"] == "dashboard.events"
    return message["events"]


def _start_capture() -> CaptureQueriesContext:
    ctx = CaptureQueriesContext(connections["default"])
    ctx.__enter__()
    return ctx


def _stop_capture(ctx: CaptureQueriesContext) -> list[str]:
    ctx.__exit__(None, None, None)
    return [q["sql"] for q in ctx.captured_queries]


async def start_capture(pipeline) -> CaptureQueriesContext:
    """Record the SQL of the pipeline's writer connection (it lives in the writer thread)."""
    return await pipeline.run_in_writer(_start_capture)


async def stop_capture(pipeline, ctx: CaptureQueriesContext) -> list[str]:
    return await pipeline.run_in_writer(_stop_capture, ctx)


@database_sync_to_async
def readings(device_id: str | None = None) -> list[tuple[str, str, float, float]]:
    qs = Reading.objects.order_by("ts", "device", "metric")
    if device_id:
        qs = qs.filter(device_id=device_id)
    return [(r.device_id, r.metric, r.ts.timestamp(), r.value) for r in qs]


@database_sync_to_async
def device(device_id: str) -> Device:
    return Device.objects.get(id=device_id)


def counter(metric, **labels) -> float:
    return (metric.labels(**labels) if labels else metric)._value.get()


# -- the writer ----------------------------------------------------------------------------


async def test_many_submits_one_transaction(pipeline):
    stored_before = counter(TELEMETRY_STORED)
    ctx = await start_capture(pipeline)
    for i in range(300):
        pipeline.submit_reading(f"dev{i % 7}", "mqtt", TS + i, {"t": float(i), "ok": i % 2 == 0})
    await pipeline.flush()
    queries = await stop_capture(pipeline, ctx)
    starts = [q for q in queries if q.startswith("BEGIN")]
    commits = [q for q in queries if q == "COMMIT"]
    device_upserts = [q for q in queries if q.startswith('INSERT INTO "devices_device"')]
    assert len(starts) == len(commits) == 1, queries
    assert len(device_upserts) == 1  # one statement for all seven devices
    rows = await readings()
    assert len(rows) == 600
    assert counter(TELEMETRY_STORED) - stored_before == 600
    # each value is stored with its own message's time
    assert all(ts == TS + value for _, metric, ts, value in rows if metric == "t")
    assert {r[3] for r in rows if r[1] == "ok"} == {0.0, 1.0}


async def test_devices_registered_online_and_metrics_merged(pipeline):
    await database_sync_to_async(Device.objects.create)(
        id="known", name="Kitchen", transport="serial", metrics={"old": 1}
    )
    received = datetime.now(UTC)
    pipeline.submit_reading("known", "mqtt", TS, {"t": 20.5})
    pipeline.submit_reading("fresh", "serial", TS, {"h": 40.0, "relay": True})
    await pipeline.flush()
    known, fresh = await device("known"), await device("fresh")
    assert (known.name, known.transport, known.online) == ("Kitchen", "serial", True)
    assert known.metrics == {"old": 1, "t": 20.5}
    assert (fresh.name, fresh.transport, fresh.online) == ("", "serial", True)
    assert fresh.metrics == {"h": 40.0, "relay": True}
    assert received <= fresh.last_seen <= datetime.now(UTC)  # receive time, not the ts
    first_seen = fresh.last_seen

    # a later batch merges (does not replace) the latest metrics
    pipeline.submit_reading("fresh", "mqtt", TS + 1, {"h": 41.0, "co2": 600})
    await pipeline.flush()
    fresh = await device("fresh")
    assert fresh.metrics == {"h": 41.0, "relay": True, "co2": 600}
    assert fresh.transport == "serial"  # set on creation only
    assert fresh.last_seen >= first_seen

    pipeline.submit_status("fresh", "mqtt", False, TS + 2)
    await pipeline.flush()
    fresh_off = await device("fresh")
    assert fresh_off.online is False
    assert fresh_off.last_seen == fresh.last_seen  # an offline Last Will is not "seen"
    assert fresh_off.metrics == fresh.metrics

    pipeline.submit_status("ghost", "mqtt", False, TS)  # status registers a device too
    await pipeline.flush()
    ghost = await device("ghost")
    assert (ghost.online, ghost.last_seen, ghost.metrics) == (False, None, {})


async def test_batch_delay_writes_without_flush(layer):
    pipeline = TelemetryPipeline(batch_delay=0.05)
    try:
        pipeline.submit_reading("d1", "mqtt", TS, {"t": 1.0})

        async def stored():
            return len(await readings()) == 1

        await eventually(stored)
    finally:
        await pipeline.close()


async def test_batch_size_triggers_write_before_delay(layer):
    pipeline = TelemetryPipeline(batch_size=10, batch_delay=3600)
    try:
        for i in range(9):
            pipeline.submit_reading("d1", "mqtt", TS + i, {"t": float(i)})
        # Sentinel: one loop turn lets a woken writer hand its batch to its single thread;
        # a query queued on that thread after it sees whatever it wrote.
        await asyncio.sleep(0)
        rows = await pipeline.run_in_writer(lambda: Reading.objects.count())
        assert rows == 0  # below the batch size and long before the delay
        pipeline.submit_reading("d1", "mqtt", TS + 9, {"t": 9.0})

        async def stored():
            return len(await readings()) == 10

        await eventually(stored)
    finally:
        await pipeline.close()


async def test_large_backlog_is_split_into_batches(layer):
    pipeline = TelemetryPipeline(batch_size=100, batch_delay=3600)
    try:
        ctx = await start_capture(pipeline)
        for i in range(250):
            pipeline.submit_reading(f"d{i % 3}", "mqtt", TS + i, {"t": float(i)})
        await pipeline.flush()
        queries = await stop_capture(pipeline, ctx)
        assert len([q for q in queries if q == "COMMIT"]) == 3
        assert [r[3] for r in await readings()] == [float(i) for i in range(250)]
    finally:
        await pipeline.close()


async def test_buffer_full_drops_oldest_and_counts(layer):
    dropped_before = counter(TELEMETRY_DROPPED, reason="buffer_full")
    pipeline = TelemetryPipeline(buffer_limit=10, batch_size=1000, batch_delay=3600)
    try:
        for i in range(25):  # all in one loop turn: the writer cannot run in between
            pipeline.submit_reading("d1", "mqtt", TS + i, {"t": float(i)})
        await pipeline.flush()
        assert [r[3] for r in await readings()] == [float(i) for i in range(15, 25)]
        assert counter(TELEMETRY_DROPPED, reason="buffer_full") - dropped_before == 15
    finally:
        await pipeline.close()


async def test_database_failure_keeps_batch_and_recovers(pipeline):
    pipeline.submit_reading("d1", "mqtt", TS, {"t": 0.0})
    await pipeline.flush()
    await sql('ALTER TABLE "devices_reading" RENAME TO "devices_reading_away"')
    try:
        for i in range(1, 6):
            pipeline.submit_reading("d1", "mqtt", TS + i, {"t": float(i)})

        async def failed():
            return pipeline.failures >= 2  # failed, backed off, failed again

        await eventually(failed)
        pipeline.submit_reading("d1", "mqtt", TS + 6, {"t": 6.0})
        assert pipeline.pending_devices()["d1"]["metrics"] == {"t": 6.0}
    finally:
        await sql('ALTER TABLE "devices_reading_away" RENAME TO "devices_reading"')
    await asyncio.wait_for(pipeline.flush(), 15)
    assert [r[3] for r in await readings()] == [float(i) for i in range(7)]
    assert pipeline.pending_devices() == {}
    assert (await device("d1")).metrics == {"t": 6.0}


# -- the fan-out ---------------------------------------------------------------------------


async def test_one_group_send_per_loop_turn_with_status_first(pipeline, layer, dashboard):
    pipeline.submit_reading("a", "mqtt", TS, {"t": 1.0})
    pipeline.submit_reading("b", "mqtt", TS + 1, {"h": 2.0})
    pipeline.submit_status("c", "mqtt", False, TS + 2)
    events = await next_events(layer, dashboard)
    assert [(e["type"], e["device"]) for e in events] == [
        ("status", "a"),
        ("telemetry", "a"),
        ("status", "b"),
        ("telemetry", "b"),
        ("status", "c"),
    ]
    assert events[0]["online"] is True and isinstance(events[0]["ts"], float)
    assert events[1] == {"type": "telemetry", "device": "a", "ts": TS, "metrics": {"t": 1.0}}
    assert events[4] == {"type": "status", "device": "c", "online": False, "ts": TS + 2}

    # One group_send for all of it: the next message is the next submission's.
    # Already online: telemetry alone; after "offline", telemetry brings "online" back.
    pipeline.submit_reading("a", "mqtt", TS + 3, {"t": 3.0})
    events = await next_events(layer, dashboard)
    assert [(e["type"], e["device"], e.get("ts")) for e in events] == [("telemetry", "a", TS + 3)]
    pipeline.submit_status("a", "mqtt", False, TS + 4)
    pipeline.submit_reading("a", "mqtt", TS + 5, {"t": 5.0})
    events = await next_events(layer, dashboard)
    assert [(e["type"], e.get("online")) for e in events] == [
        ("status", False),
        ("status", True),
        ("telemetry", None),
    ]


async def test_coalescing_keeps_every_metric_and_order(pipeline, layer, dashboard):
    pipeline.submit_reading("a", "mqtt", TS, {"t": 1.0, "h": 10.0})
    pipeline.submit_reading("b", "mqtt", TS, {"x": 1.0})
    pipeline.submit_reading("a", "mqtt", TS + 2, {"t": 2.0, "co2": 400.0})
    pipeline.submit_reading("a", "mqtt", TS + 1, {"flag": False})
    events = [e for e in await next_events(layer, dashboard) if e["type"] == "telemetry"]
    assert events == [
        {
            "type": "telemetry",
            "device": "a",
            "ts": TS + 2,
            "metrics": {"t": 2.0, "h": 10.0, "co2": 400.0, "flag": False},
        },
        {"type": "telemetry", "device": "b", "ts": TS, "metrics": {"x": 1.0}},
    ]
    # storage keeps every value, coalescing is only for dashboards
    await pipeline.flush()
    assert len(await readings("a")) == 5


async def test_frames_during_a_send_go_in_the_next_batch_in_order(pipeline, layer, dashboard):
    received: list[dict] = []
    for burst in range(5):
        for i in range(20):
            pipeline.submit_reading("d", "mqtt", TS + burst * 100 + i, {"n": float(i)})
            pipeline.submit_status("e", "mqtt", i % 2 == 0, TS + burst * 100 + i)
        await asyncio.sleep(0)  # let the fan-out run between bursts
    await pipeline.flush()
    # A sentinel submitted last arrives last: everything before it has been fanned out then.
    pipeline.submit_reading("z", "mqtt", TS + 1000, {"sentinel": 1.0})
    while not any(e["device"] == "z" for e in received):
        received += await next_events(layer, dashboard, wait=10)
    received = [e for e in received if e["device"] != "z"]
    e_states = [e["online"] for e in received if e["device"] == "e"]
    assert e_states == [i % 2 == 0 for _ in range(5) for i in range(20)]
    d_ts = [e["ts"] for e in received if e["device"] == "d" and e["type"] == "telemetry"]
    assert d_ts == sorted(d_ts) and d_ts[-1] == TS + 419


# -- bookkeeping ---------------------------------------------------------------------------


async def test_pending_devices_until_written(pipeline):
    pipeline.submit_reading("p1", "mqtt", TS, {"t": 1.0})
    pipeline.submit_reading("p1", "mqtt", TS, {"h": 2.0})
    pending = pipeline.pending_devices()
    assert pending["p1"]["online"] is True
    assert pending["p1"]["metrics"] == {"t": 1.0, "h": 2.0}
    assert pending["p1"]["transport"] == "mqtt"
    merged = merge_pending([{"id": "a0", "name": "A", "metrics": {}, "online": False}], pending)
    assert [d["id"] for d in merged] == ["a0", "p1"]
    assert merged[1]["name"] == "p1" and merged[1]["metrics"] == {"t": 1.0, "h": 2.0}
    await pipeline.flush()
    assert pipeline.pending_devices() == {}


async def test_one_pipeline_per_loop_and_close(layer):
    assert current_pipeline() is None
    first = get_pipeline()
    assert get_pipeline() is first and current_pipeline() is first
    first.submit_reading("d1", "mqtt", TS, {"t": 1.0})
    await first.close()
    assert len(await readings()) == 1  # close flushes
    assert current_pipeline() is None
    second = get_pipeline()
    assert second is not first
    await second.close()


async def test_submit_never_raises(pipeline):
    pipeline.submit_reading("d1", "mqtt", TS, {"t": "not a number"})  # type: ignore[dict-item]
    pipeline.submit_reading("d1", "mqtt", TS, {"t": 1.0})
    await pipeline.flush()
    assert [r[3] for r in await readings()] == [1.0]


async def test_refused_rows_do_not_block_the_batch(pipeline):
    refused_before = counter(TELEMETRY_DROPPED, reason="db_refused")
    pipeline.submit_reading("d1", "mqtt", TS, {"t": 1.0})
    pipeline.submit_reading("d1", "mqtt", TS + 1, {None: 2.0})  # type: ignore[dict-item]
    pipeline.submit_reading("d2", "mqtt", TS + 2, {"t": 3.0})
    await pipeline.flush()
    assert [(r[0], r[3]) for r in await readings()] == [("d1", 1.0), ("d2", 3.0)]
    assert counter(TELEMETRY_DROPPED, reason="db_refused") - refused_before == 1
    pipeline.submit_reading("d1", "mqtt", TS + 3, {"t": 4.0})  # and the writer goes on
    await pipeline.flush()
    assert len(await readings()) == 3


async def test_rows_of_a_device_deleted_meanwhile_recreate_it(pipeline):
    pipeline.submit_reading("gone", "mqtt", TS, {"t": 1.0})
    await pipeline.flush()
    await database_sync_to_async(Device.objects.filter(id="gone").delete)()
    # rows whose device update was written in an earlier batch
    await pipeline.run_in_writer(write_batch, [("gone", "t", TS + 1, 2.0)], {})
    assert (await device("gone")).transport == "mqtt"
    assert [r[3] for r in await readings("gone")] == [2.0]


async def test_new_metric_names_past_the_per_device_bound_are_refused(pipeline):
    """A publisher inventing names cannot grow a device without bound: known names still pass."""
    from gateway.metrics import MESSAGES_REJECTED

    refused = MESSAGES_REJECTED.labels(reason="too_many_metrics")
    before = refused._value.get()
    acked = []
    pipeline.max_metrics = 3
    pipeline.submit_reading("capped", "mqtt", TS, {"a": 1.0, "b": 2.0})
    pipeline.submit_reading("capped", "mqtt", TS + 1, {"a": 3.0, "c": 4.0, "d": 5.0, "e": 6.0})
    pipeline.submit_reading(
        "capped", "mqtt", TS + 2, {"x": 7.0, "y": 8.0}, durable=lambda: acked.append(1)
    )
    pipeline.submit_reading("other", "mqtt", TS, {"x": 1.0, "y": 2.0, "z": 3.0})
    await pipeline.flush()
    device = await Device.objects.aget(id="capped")
    assert device.metrics == {"a": 3.0, "b": 2.0, "c": 4.0}, "d and e came past the bound"
    names = {r.metric async for r in Reading.objects.filter(device_id="capped")}
    assert names == {"a", "b", "c"}
    assert refused._value.get() - before == 2, "two messages lost names"
    assert len(acked) == 1, "a message refused whole is still acknowledged"
    assert (await Device.objects.aget(id="other")).metrics.keys() == {"x", "y", "z"}


# Whole seconds (no fraction in the text), microsecond rounding edges, before 1970, far ahead.
AWKWARD_TIMES = [TS, TS + 0.5, TS + 0.0000005, TS + 0.9999995, 1e9 + 0.123456, -1.5, 4.1e9]


def test_the_writer_stores_each_time_as_django_would():
    connection = connections["default"]
    stamp = _stamper(connection)
    adapt = connection.ops.adapt_datetimefield_value
    assert [stamp(ts) for ts in AWKWARD_TIMES] == [adapt(_dt(ts)) for ts in AWKWARD_TIMES]
    instants = sorted({_dt(ts) for ts in AWKWARD_TIMES})  # to the microsecond: TS + 0.0000005 is TS
    assert write_batch([("d1", "t", ts, 1.0) for ts in AWKWARD_TIMES], {}) == len(instants) == 6
    read = Reading.objects.filter(device_id="d1").order_by("ts").values_list("ts", flat=True)
    assert list(read) == instants
