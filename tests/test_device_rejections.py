"""A device's rejected messages as its record (docs/interface.md §5.2) and as a problem on the
dashboard (§6.3 `rejecting`): the consumer rejects, the pipeline adds the batch's rejections to
the device's row, the fleet view ranks, filters and counts it, the API shows it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from asgiref.sync import sync_to_async

from alerts.models import Alert, AlertRule
from dashboard.fleet import Fleet, Light
from devices.conventions import mirror
from devices.conventions.serial import SerialDeviceConsumer
from devices.models import Device
from devices.routing import mqtt_routes
from devices.telemetry.pipeline import current_pipeline
from devices.telemetry.rejections import Rejection, write_rejections
from gateway.mqtt.routing import TopicRouter
from gateway.mqtt.testing import MqttCommunicator
from gateway.serial.testing import SerialCommunicator
from tests.support.checks import dashboard_frame, metric, rejected
from tests.support.dashboard_ws import connect, session_of
from tests.support.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)

# ESPHome's MQTT binary sensor publishes its state as the text "ON" / "OFF" (esphome/esphome,
# esphome/components/mqtt/mqtt_binary_sensor.cpp, MQTTBinarySensorComponent::publish_state);
# on a native per-metric topic, which takes a bare number or true/false, it is `bad_value`.
ESPHOME_STATE = b"ON"
# Tasmota's Last Will payload, the text "Online" (Tasmota docs "MQTT", LWT topic
# ``tele/<topic>/LWT``; tasmota/include/i18n.h ``D_ONLINE``), is not JSON on a native
# telemetry topic: `bad_json`.
TASMOTA_LWT = b"Online"
# A `ts` the native convention cannot read, carrying markup: it reaches the record as text.
HOSTILE_TS = b'{"open": true, "ts": "<script>alert(1)</script>"}'
HOSTILE_DETAIL = "ts '<script>alert(1)</script>' is not ISO 8601"


def unrecorded(reason: str) -> float:
    return metric("gateway_rejections_unrecorded_total", reason=reason)


@pytest.fixture
def app():
    return TopicRouter(mqtt_routes)


@pytest.fixture
def cookie(django_user_model) -> str:
    return session_of(django_user_model.objects.create_user("rita", password="pw-123456789"))


async def frames(layer, channel, count: int) -> list[dict]:
    out: list[dict] = []
    async with asyncio.timeout(5):
        while len(out) < count:
            out += (await layer.receive(channel))["events"]
    return out


async def instance(app, device_id: str) -> MqttCommunicator:
    comm = MqttCommunicator(app, topic=f"devices/{device_id}/telemetry")
    await comm.connect()
    return comm


def record(device_id: str) -> tuple:
    return Device.objects.filter(id=device_id).values_list(
        "rejected", "last_rejection_reason", "last_rejection"
    )[0]


async def test_a_burst_of_rejections_is_one_write_and_one_frame(app, layer, dashboard):
    door = await instance(app, "door-1")
    await door.send_message("devices/door-1/telemetry", b'{"open": false}')
    await frames(layer, dashboard, 2)  # its status and telemetry
    pipeline = current_pipeline()
    await pipeline.flush()  # door-1 is registered
    pipeline.batch_delay = 60.0  # nothing is written before flush(): the burst is one batch
    bad_value = rejected("bad_value")
    for _ in range(25):
        await door.send_message("devices/door-1/telemetry/open", ESPHOME_STATE)
    await door.send_message("devices/door-1/telemetry", HOSTILE_TS)
    await door.send_message("devices/door-1/telemetry", b'{"open": true}')  # sentinel
    (telemetry,) = await frames(layer, dashboard, 1)
    assert telemetry["metrics"] == {"open": True}  # the next good message goes through
    assert rejected("bad_value") - bad_value == 25
    assert await sync_to_async(record)("door-1") == (0, "", "")  # counted, not written yet

    await pipeline.flush()
    (frame,) = await frames(layer, dashboard, 1)
    assert frame["type"] == "rejection" and frame["device"] == "door-1"
    assert (frame["rejected"], frame["reason"], frame["detail"]) == (
        26,
        "bad_timestamp",
        HOSTILE_DETAIL,
    )
    assert time.time() - 5 < frame["ts"] <= time.time()
    assert await sync_to_async(record)("door-1") == (26, "bad_timestamp", HOSTILE_DETAIL)
    await door.retire()


async def test_garbage_under_unknown_ids_creates_no_device(app, layer, dashboard):
    before, bad_json = unrecorded("unknown_device"), rejected("bad_json")
    ghosts = {f"ghost-{i}": await instance(app, f"ghost-{i}") for i in range(3)}
    for device_id, ghost in ghosts.items():
        for _ in range(2):
            await ghost.send_message(f"devices/{device_id}/telemetry", TASMOTA_LWT)
    await eventually(lambda: rejected("bad_json") - bad_json == 6, what="6 rejections")
    await current_pipeline().flush()
    assert await sync_to_async(Device.objects.filter(id__startswith="ghost").count)() == 0
    assert unrecorded("unknown_device") - before == 6
    for ghost in ghosts.values():
        await ghost.retire()


async def test_a_serial_device_records_its_rejected_lines(layer, dashboard):
    saved = dict(mirror._config)
    mirror.configure(enabled=False)
    try:
        comm = SerialCommunicator(SerialDeviceConsumer.as_asgi(), "loop://?device=ser-r")
        await comm.connect()  # the port's device, online: registered with the first batch
        await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
        await current_pipeline().flush()
        for line in (b"#$%^&*", b'{"temperature": 2', b"t=1"):
            await comm.send_frame(line)
        await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
        await current_pipeline().flush()
        assert await sync_to_async(record)("ser-r") == (2, "bad_json", "payload is not valid JSON")
        await comm.disconnect()
    finally:
        mirror._config.update(saved)


def test_several_bridges_add_up_and_the_newest_rejection_wins(db):
    Device.objects.create(id="d1")
    now = time.time()
    write_rejections({"d1": Rejection(3, now, "bad_json", "payload is not valid JSON")})
    # Another bridge's batch, committed later but holding an older rejection.
    stored = write_rejections({"d1": Rejection(2, now - 30, "bad_status", "status …")})
    assert record("d1") == (5, "bad_json", "payload is not valid JSON")
    assert [(s[0], s[1], s[3]) for s in stored] == [("d1", 5, "bad_json")]
    assert abs(stored[0][2] - now) < 0.01


def seed(count: int) -> None:
    now = datetime.now(UTC)
    Device.objects.bulk_create(
        Device(id=f"d-{i:04d}", online=True, last_seen=now, metrics={"t": i}) for i in range(count)
    )


def problems_fixture() -> None:
    """30 devices: d-0025 alerting, d-0020 stale, d-0010 offline."""
    seed(30)
    old = datetime.fromtimestamp(time.time() - 3600, UTC)
    Device.objects.filter(id="d-0020").update(last_seen=old)
    Device.objects.filter(id="d-0010").update(online=False)
    rule = AlertRule.objects.create(name="hot", metric="t", op="gt", threshold=1)
    now = datetime.now(UTC)
    Alert.objects.create(
        rule=rule, device="d-0025", state="active", pending_since=now, raised_at=now
    )


async def test_a_device_starting_to_reject_moves_up_the_open_fleet_view(app, layer, cookie):
    await sync_to_async(problems_fixture)()
    comm = await connect(cookie, query="view=1&limit=5")
    snapshot = await comm.receive_json_from(timeout=5)
    assert [d["id"] for d in snapshot["devices"]] == [
        "d-0025", "d-0020", "d-0010", "d-0000", "d-0001",
    ]  # fmt: skip
    assert snapshot["fleet"]["rejecting"] == 0 and snapshot["fleet"]["problems"] == 3
    assert snapshot["devices"][3]["rejected"] == 0
    assert snapshot["devices"][3]["last_rejection"] is None

    device = await instance(app, "d-0007")
    await device.send_message("devices/d-0007/telemetry/open", ESPHOME_STATE)
    # Nothing flushed by hand: the batch is written, its frame marks the view changed, and
    # the view's next refresh sends a new page, the rejecting device after the alerting one.
    while (frame := await comm.receive_json_from(timeout=10))["type"] != "view":
        assert frame["type"] in ("fleet", "rejection", "alert"), frame
    assert [d["id"] for d in frame["devices"]] == [
        "d-0025", "d-0007", "d-0020", "d-0010", "d-0000",
    ]  # fmt: skip
    row = frame["devices"][1]
    assert row["rejected"] == 1
    assert row["last_rejection"] == {
        "reason": "bad_value",
        "detail": "expected a bare number, true or false",
    }
    assert frame["fleet"]["rejecting"] == 1 and frame["fleet"]["problems"] == 4
    assert frame["fleet"]["presence"]["online"] == 28  # presence is unchanged: it is online

    # The filter: the rejecting devices alone.
    await comm.send_json_to({"type": "view", "presence": "rejecting", "ref": 1})
    while (page := await comm.receive_json_from(timeout=5)).get("ref") != 1:
        pass
    assert [d["id"] for d in page["devices"]] == ["d-0007"] and page["view"]["total"] == 1
    # Live: the row on the page gets the next rejection as a `rejection` frame.
    await device.send_message("devices/d-0007/telemetry", HOSTILE_TS)
    while (live := await comm.receive_json_from(timeout=5))["type"] != "rejection":
        pass
    assert (live["device"], live["rejected"], live["detail"]) == ("d-0007", 2, HOSTILE_DETAIL)
    await comm.disconnect()
    await device.retire()


async def test_only_clients_that_ask_for_more_than_the_floor_get_rejection_frames(app, cookie):
    plain = await connect(cookie)  # asks for nothing: the frames of docs/interface.md §6
    paged = await connect(cookie, query="batch=1")  # as the device page connects
    for comm in (plain, paged):
        await comm.receive_json_from(timeout=5)  # the snapshot
    valve = await instance(app, "valve-2")
    await valve.send_message("devices/valve-2/telemetry", b'{"open": 0}')
    await valve.handled()
    await current_pipeline().flush()  # registered
    await valve.send_message("devices/valve-2/telemetry/open", ESPHOME_STATE)
    await valve.handled()
    await current_pipeline().flush()
    while (frame := await paged.receive_json_from(timeout=5))["type"] != "rejection":
        pass
    assert (frame["device"], frame["rejected"], frame["reason"]) == ("valve-2", 1, "bad_value")
    # A sentinel sent after the rejection frame: the plain client gets it, and no rejection.
    await valve.send_message("devices/valve-2/telemetry", b'{"open": 1}')
    seen = []
    while not (seen and seen[-1].get("metrics") == {"open": 1}):
        seen.append(await plain.receive_json_from(timeout=5))
    assert {f["type"] for f in seen} <= {"status", "telemetry"}, seen
    for comm in (plain, paged):
        await comm.disconnect()
    await valve.retire()


def test_rejecting_is_a_recent_rejection_and_its_end_is_a_timed_change():
    now = time.time()

    def light(device_id: str, rejected_at: float | None, online: bool = True) -> Light:
        return Light(device_id, device_id, online, now, "native", device_id, rejected_at)

    rows = [
        light("a", now - 10),  # rejecting
        light("b", now - 700),  # rejected long ago: fine again
        light("c", None),
        light("d", now - 5, online=False),  # offline and rejecting: counted in both
    ]
    fleet = Fleet(rows, frozenset(), 0.0, window=600.0)
    assert [fleet.state(r, now) for r in rows] == ["rejecting", "online", "online", "rejecting"]
    counts = fleet.counts(now)
    assert counts["rejecting"] == 2 and counts["problems"] == 2
    assert counts["presence"] == {"online": 3, "stale": 0, "offline": 1}
    # The view re-reads when "a" would turn stale (120 s) or "d" stops rejecting, whichever first.
    assert fleet.next_stale(now) == pytest.approx(120.0)
    assert Fleet(rows[1:], frozenset(), 0.0, window=60.0).next_stale(now) == pytest.approx(55.0)


def test_the_api_lists_the_record_beside_the_fields_it_had(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("amy", password="pw-123456789"))
    Device.objects.create(id="d1", online=True)
    Device.objects.create(id="d2")
    at = time.time()
    write_rejections({"d1": Rejection(4, at, "bad_json", "payload is not valid JSON")})
    devices = client.get("/api/devices/").json()
    first, second = devices
    assert set(first) >= {"id", "name", "online", "last_seen", "transport", "metrics"}
    assert first["rejected"] == 4 and first["last_rejected_at"] == pytest.approx(at, abs=0.01)
    assert first["last_rejection"] == {"reason": "bad_json", "detail": "payload is not valid JSON"}
    assert (second["rejected"], second["last_rejected_at"], second["last_rejection"]) == (
        0,
        None,
        None,
    )
