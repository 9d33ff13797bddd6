"""The paged dashboard protocol (docs/interface.md §6.3 `view`) through the real auth stack,
database and channel layer: a page plus the fleet's counts, frames only for visible devices."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from asgiref.sync import sync_to_async

from alerts.models import Alert, AlertRule
from devices.models import Device
from tests.support.dashboard_ws import connect, session_of

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cookie(django_user_model) -> str:
    return session_of(django_user_model.objects.create_user("vera", password="pw-123456789"))


def seed(count: int, **fields) -> None:
    """`count` devices d-0000… (online, seen now), bulk-created."""
    now = datetime.now(UTC)
    Device.objects.bulk_create(
        Device(id=f"d-{i:04d}", online=True, last_seen=now, metrics={"t": i}, **fields)
        for i in range(count)
    )


async def frames_until(comm, done) -> list[dict]:
    """Frames received up to and including the first for which `done(frame)` is true."""
    out = []
    while True:
        frame = await comm.receive_json_from(timeout=5)
        out.append(frame)
        if done(frame):
            return out


async def send(layer, *frames) -> None:
    await layer.group_send("dashboard", {"type": "dashboard.events", "events": list(frames)})


async def test_a_view_in_the_url_snapshots_one_page_and_the_fleet_counts(layer, cookie):
    await sync_to_async(seed)(120)
    await sync_to_async(Device.objects.filter(id="d-0007").update)(online=False)
    comm = await connect(cookie, query="sort=id&limit=50&offset=50")
    snapshot = await comm.receive_json_from(timeout=5)
    assert snapshot["type"] == "snapshot"
    assert [d["id"] for d in snapshot["devices"]] == [f"d-{i:04d}" for i in range(50, 100)]
    assert snapshot["devices"][0]["metrics"] == {"t": 50}
    assert snapshot["devices"][0]["convention"] == "native"
    assert snapshot["view"] == {
        "q": "", "presence": "all", "convention": "all", "sort": "id",
        "offset": 50, "limit": 50, "total": 120,
    }  # fmt: skip
    fleet = snapshot["fleet"]
    assert fleet["total"] == 120
    assert fleet["presence"] == {"online": 119, "stale": 0, "offline": 1}
    assert fleet["conventions"]["native"] == 120
    assert fleet["problems"] == 1
    await comm.disconnect()


async def test_problems_first_alerting_then_stale_then_offline(layer, cookie):
    await sync_to_async(seed)(30)
    old = datetime.fromtimestamp(time.time() - 3600, UTC)
    await sync_to_async(Device.objects.filter(id="d-0020").update)(last_seen=old)  # stale
    await sync_to_async(Device.objects.filter(id="d-0010").update)(online=False)
    rule = await sync_to_async(AlertRule.objects.create)(
        name="hot", metric="t", op="gt", threshold=1
    )
    now = datetime.now(UTC)
    await sync_to_async(Alert.objects.create)(
        rule=rule, device="d-0025", state="active", pending_since=now, raised_at=now
    )
    comm = await connect(cookie, query="view=1&limit=5")
    snapshot = await comm.receive_json_from(timeout=5)
    assert [d["id"] for d in snapshot["devices"]] == [
        "d-0025", "d-0020", "d-0010", "d-0000", "d-0001",
    ]  # fmt: skip
    assert snapshot["fleet"]["alerting"] == 1
    assert snapshot["fleet"]["presence"]["stale"] == 1
    await comm.send_json_to({"type": "view", "presence": "problems", "ref": 3})
    page = await comm.receive_json_from(timeout=5)
    assert page["type"] == "view" and page["ref"] == 3
    assert [d["id"] for d in page["devices"]] == ["d-0025", "d-0020", "d-0010"]
    assert page["view"]["total"] == 3
    await comm.disconnect()


async def test_search_matches_name_or_id_literally_and_case_insensitively(layer, cookie):
    await sync_to_async(seed)(40)
    await sync_to_async(Device.objects.filter(id="d-0033").update)(name="Boiler <b>room</b>")
    await sync_to_async(Device.objects.create)(id="a_1", name="")
    await sync_to_async(Device.objects.create)(id="ab1", name="")
    comm = await connect(cookie, query="view=1")
    await comm.receive_json_from(timeout=5)
    for q, expected in [("BOILER <B>", ["d-0033"]), ("a_1", ["a_1"]), ("%", []), ("d-003", None)]:
        await comm.send_json_to({"type": "view", "q": q, "sort": "id"})
        page = await comm.receive_json_from(timeout=5)
        ids = [d["id"] for d in page["devices"]]
        if expected is None:
            assert ids == [f"d-{i:04d}" for i in range(30, 40)]
        else:
            assert ids == expected, q
    # The name goes out as JSON data, verbatim: the page inserts it as text.
    await comm.send_json_to({"type": "view", "q": "boiler"})
    raw = await comm.receive_from(timeout=5)
    assert '"name":"Boiler <b>room</b>"' in raw
    await comm.disconnect()


async def test_paging_is_bounded_and_bad_views_are_refused_with_a_clear_error(layer, cookie):
    await sync_to_async(seed)(25)
    comm = await connect(cookie, query="sort=id&limit=10")
    await comm.receive_json_from(timeout=5)
    await comm.send_json_to({"type": "view", "sort": "id", "limit": 10, "offset": 9999})
    page = await comm.receive_json_from(timeout=5)
    assert page["view"]["offset"] == 20  # clamped to the last page
    assert [d["id"] for d in page["devices"]] == [f"d-{i:04d}" for i in range(20, 25)]
    bad = [
        ({"limit": 0}, "limit must be an integer from 1 to 200"),
        ({"limit": 500}, "limit must be an integer from 1 to 200"),
        ({"offset": -1}, "offset must be an integer"),
        ({"limit": True}, "limit must be an integer"),
        ({"sort": "<script>"}, "sort must be one of problems, id, name, last_seen"),
        ({"presence": "sideways"}, "presence must be one of"),
        ({"convention": 7}, "convention must be one of"),
        ({"q": ["x"]}, "q must be a string"),
        ({"q": "x" * 101}, "q must be a string of at most 100 characters"),
    ]
    for fields, message in bad:
        await comm.send_json_to({"type": "view", **fields, "ref": "r"})
        error = await comm.receive_json_from(timeout=5)
        assert error["type"] == "error" and error["code"] == "bad_request", fields
        assert error["ref"] == "r"
        assert message in error["message"], (fields, error["message"])
    # The view stayed the last good one: its devices' frames still come, others' never.
    await send(
        layer,
        {"type": "telemetry", "device": "d-0001", "ts": 1.0, "metrics": {"t": 1}},
        {"type": "telemetry", "device": "d-0021", "ts": 2.0, "metrics": {"t": 2}},
    )
    got = await frames_until(comm, lambda f: f.get("device") == "d-0021")
    assert all(f.get("device") != "d-0001" for f in got)
    await comm.disconnect()


async def test_a_bad_view_in_the_url_gets_the_default_view_and_an_error(layer, cookie):
    await sync_to_async(seed)(3)
    comm = await connect(cookie, query="limit=abc")
    snapshot = await comm.receive_json_from(timeout=5)
    assert snapshot["type"] == "snapshot" and snapshot["view"]["limit"] == 50
    error = await comm.receive_json_from(timeout=5)
    assert error["type"] == "error" and "limit must be an integer" in error["message"]
    await comm.disconnect()


async def test_only_visible_devices_frames_are_forwarded(layer, cookie):
    await sync_to_async(seed)(100)
    comm = await connect(cookie, query="sort=id&limit=10")
    await comm.receive_json_from(timeout=5)
    hidden = {"type": "telemetry", "device": "d-0050", "ts": 1.0, "metrics": {"t": 9}}
    hidden_status = {"type": "status", "device": "d-0051", "online": False, "ts": 1.0}
    command = {"type": "command", "id": "c1", "device": "d-0050", "name": "x", "status": "sent"}
    visible = {"type": "telemetry", "device": "d-0003", "ts": 2.0, "metrics": {"t": 3}}
    await send(layer, hidden, hidden_status, command, visible)
    got = await frames_until(comm, lambda f: f == visible)
    assert hidden not in got and hidden_status not in got
    assert command in got  # command and alert frames go to every dashboard, as before
    # The page moves: now d-0050 is visible and d-0003 is not.
    await comm.send_json_to({"type": "view", "sort": "id", "limit": 10, "offset": 50})
    page = await frames_until(comm, lambda f: f["type"] == "view")
    assert page[-1]["devices"][0]["id"] == "d-0050"
    await send(layer, visible, hidden)
    got = await frames_until(comm, lambda f: f == hidden)
    assert visible not in got
    await comm.disconnect()


async def test_counts_follow_a_change_at_a_bounded_rate(layer, cookie):
    await sync_to_async(seed)(20)
    comm = await connect(cookie, query="sort=id&limit=5")
    snapshot = await comm.receive_json_from(timeout=5)
    assert snapshot["fleet"]["presence"]["offline"] == 0
    await sync_to_async(Device.objects.filter(id="d-0015").update)(online=False)
    await send(layer, {"type": "status", "device": "d-0015", "online": False, "ts": 1.0})
    got = await frames_until(comm, lambda f: f["type"] == "fleet")
    assert got[-1]["fleet"]["presence"] == {"online": 19, "stale": 0, "offline": 1}
    await comm.disconnect()


async def test_a_device_page_view_gets_its_device_alone(layer, cookie):
    await sync_to_async(seed)(5)
    comm = await connect(cookie, query="device=d-0002")
    snapshot = await comm.receive_json_from(timeout=5)
    assert [d["id"] for d in snapshot["devices"]] == ["d-0002"]
    assert "fleet" not in snapshot
    other = {"type": "telemetry", "device": "d-0001", "ts": 1.0, "metrics": {"t": 1}}
    mine = {"type": "telemetry", "device": "d-0002", "ts": 2.0, "metrics": {"t": 2}}
    await send(layer, other, mine)
    assert await comm.receive_json_from(timeout=5) == mine
    await comm.disconnect()
    # A device not stored yet: an empty snapshot, then its frames as they come.
    comm = await connect(cookie, query="device=new-1")
    assert (await comm.receive_json_from(timeout=5))["devices"] == []
    new = {"type": "status", "device": "new-1", "online": True, "ts": 3.0}
    await send(layer, other, new)
    assert await comm.receive_json_from(timeout=5) == new
    await comm.disconnect()


async def test_a_client_without_a_view_still_gets_every_device(layer, cookie):
    await sync_to_async(seed)(60)
    comm = await connect(cookie)
    snapshot = await comm.receive_json_from(timeout=5)
    assert len(snapshot["devices"]) == 60 and "fleet" not in snapshot
    frame = {"type": "telemetry", "device": "d-0059", "ts": 1.0, "metrics": {"t": 1}}
    await send(layer, frame)
    assert await comm.receive_json_from(timeout=5) == frame
    await comm.disconnect()
