"""The alert evaluator on the real ingest path: readings and statuses go into this loop's
telemetry pipeline, rules live in the test database, and every change is read back from a
dashboard channel (group ``dashboard``), the audit trail and Apprise's json:// deliveries."""

from __future__ import annotations

import asyncio
import time

import pytest
from channels.db import database_sync_to_async

from alerts import store
from alerts.hooks import current_evaluator, start_evaluator
from alerts.models import Alert, AlertEvent, AlertRule
from devices.telemetry.pipeline import get_pipeline
from tests.support.alerts import AlertFrames, receiver
from tests.support.waiting import until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@database_sync_to_async
def make_rule(**fields) -> AlertRule:
    fields.setdefault("name", f"{fields['op']} rule")
    return AlertRule.objects.create(**fields)


@database_sync_to_async
def events_of(alert_id: int) -> list[str]:
    return list(AlertEvent.objects.filter(alert_id=alert_id).values_list("kind", flat=True))


@database_sync_to_async
def open_rows() -> list[tuple[str, str]]:
    return list(
        Alert.objects.filter(state__in=["pending", "active"]).values_list("device", "state")
    )


@pytest.fixture
async def frames(layer, dashboard):
    return AlertFrames(layer, dashboard)


async def evaluating():
    evaluator = start_evaluator()
    await evaluator.wait_ready()
    return evaluator


def reading(device: str, **metrics) -> None:
    get_pipeline().submit_reading(device, "mqtt", time.time(), metrics)


def status(device: str, online: bool) -> None:
    get_pipeline().submit_status(device, "mqtt", online, time.time())


async def test_a_threshold_held_for_its_duration_raises_once_and_clears_past_the_hysteresis(
    frames,
):
    rule = await make_rule(
        device="boiler-1",
        metric="temperature",
        op="above",
        threshold=80.0,
        hysteresis=5.0,
        for_seconds=0.3,
        severity="critical",
    )
    evaluator = await evaluating()
    hot_since = time.time()
    reading("boiler-1", temperature=85.0)
    reading("boiler-1", temperature=90.0)  # still above: the same (pending) alert
    alert = await frames.next()  # the first alert frame: none before it
    assert alert["raised_at"] >= hot_since + 0.3 - 0.01  # held for its 0.3 s first
    assert alert["rule"] == rule.id and alert["device"] == "boiler-1"
    assert alert["state"] == "active" and alert["value"] == 90.0
    assert alert["acknowledged"] is False and alert["acknowledged_by"] is None
    assert alert["severity"] == "critical" and alert["cleared_at"] is None
    assert alert["raised_at"] == pytest.approx(time.time(), abs=5)

    reading("boiler-1", temperature=78.0)  # below 80, inside the 5° band: stays active
    await evaluator.flush()
    await frames.none_so_far()
    reading("boiler-1", temperature=74.0)
    cleared = await frames.next()
    assert cleared["id"] == alert["id"] and cleared["state"] == "cleared"
    assert cleared["cleared_at"] >= cleared["raised_at"]
    assert await events_of(alert["id"]) == ["raised", "cleared"]

    reading("boiler-1", temperature=99.0)  # a new episode is a new alert
    again = await frames.next()
    assert again["id"] != alert["id"] and again["state"] == "active"


async def test_a_condition_shorter_than_for_raises_nothing(frames):
    await make_rule(
        device="boiler-*", metric="temperature", op="above", threshold=80.0, for_seconds=0.5
    )
    evaluator = await evaluating()
    reading("boiler-1", temperature=85.0)
    await evaluator.flush()
    assert await open_rows() == [("boiler-1", "pending")]  # stored: it survives a restart
    reading("boiler-1", temperature=60.0)
    await evaluator.flush()
    assert await open_rows() == []
    # Sentinel: the same `for` started later on another boiler; boiler-1's timer, had it
    # survived, would have fired first.
    reading("boiler-sentinel", temperature=85.0)
    sentinel = await frames.next()
    assert (sentinel["device"], sentinel["state"]) == ("boiler-sentinel", "active"), sentinel
    rows = await database_sync_to_async(list)(Alert.objects.values_list("device", flat=True))
    assert rows == ["boiler-sentinel"]


async def test_below_outside_and_equals(frames):
    await make_rule(device="tank", metric="level", op="below", threshold=10.0)
    await make_rule(device="room", metric="temp", op="outside", threshold=18.0, threshold_high=24.0)
    await make_rule(device="door", metric="open", op="equals", threshold=1.0)
    await evaluating()
    reading("tank", level=12.0)
    reading("room", temp=21.0)
    reading("door", open=False)
    await get_pipeline().flush()
    reading("tank", level=9.5)
    reading("room", temp=25.0)
    reading("door", open=True)  # booleans are 1/0
    # Each raised by its second reading (the value it carries), none by its first.
    raised = {}
    for _ in range(3):
        alert = await frames.next()
        raised[alert["device"]] = alert["value"]
    assert raised == {"tank": 9.5, "room": 25.0, "door": 1.0}


async def test_a_glob_rule_covers_matching_devices_each_with_its_own_alert(frames):
    await make_rule(device="sim-*", metric="temperature", op="above", threshold=30.0)
    await evaluating()
    reading("other-1", temperature=99.0)
    reading("sim-1", temperature=31.0)
    reading("sim-2", temperature=32.0)
    devices = {(await frames.next())["device"] for _ in range(2)}
    assert devices == {"sim-1", "sim-2"}
    reading("sim-sentinel", temperature=33.0)  # evaluated after other-1: its alert is next
    assert (await frames.next())["device"] == "sim-sentinel"


async def test_offline_fires_from_the_last_will_after_for_and_clears_when_back(frames):
    rule = await make_rule(device="sensor-?", op="offline", for_seconds=0.2)
    await evaluating()
    status("sensor-1", False)  # the broker's Last Will: devices/sensor-1/status offline
    alert = await frames.next()
    assert alert["rule"] == rule.id and alert["state"] == "active" and alert["value"] is None
    status("sensor-1", True)
    assert (await frames.next())["state"] == "cleared"
    status("sensor-2", False)
    status("sensor-2", True)  # back before `for`: nothing
    # Sentinel: the same `for` started later; sensor-2's timer would have fired first.
    status("sensor-3", False)
    sentinel = await frames.next()
    assert (sentinel["device"], sentinel["state"]) == ("sensor-3", "active"), sentinel


async def test_no_data_for_n_seconds_raises_and_the_next_reading_clears(frames):
    await make_rule(device="quiet", op="nodata", for_seconds=0.3)
    await evaluating()
    reading("quiet", t=1.0)
    alert = await frames.next()
    assert alert["device"] == "quiet" and alert["state"] == "active"
    reading("quiet", t=2.0)
    assert (await frames.next())["state"] == "cleared"


async def test_a_rule_created_while_running_is_picked_up(frames):
    evaluator = await evaluating()
    reading("boiler-1", temperature=99.0)
    await evaluator.flush()
    await frames.none_so_far()
    reloaded = asyncio.ensure_future(evaluator.rules_loaded())
    rule = await make_rule(device="boiler-1", metric="temperature", op="above", threshold=80.0)
    await reloaded
    assert evaluator.rule_ids() == {rule.id}
    reading("boiler-1", temperature=98.0)
    alert = await frames.next()
    assert (alert["rule"], alert["state"], alert["value"]) == (rule.id, "active", 98.0), alert


async def test_a_restart_rearms_pending_alerts_and_never_raises_an_active_one_twice(frames):
    async with receiver() as (inbox, url):
        await make_rule(
            device="b", metric="t", op="above", threshold=1.0, for_seconds=1.5, notify_urls=[url]
        )
        await make_rule(device="a", metric="t", op="above", threshold=1.0, notify_urls=[url])
        await make_rule(device="z", metric="t", op="above", threshold=1.0, notify_urls=[url])
        evaluator = await evaluating()
        reading("a", t=5.0)
        reading("b", t=5.0)
        assert (await frames.next())["device"] == "a"
        await evaluator.close()  # the process stops while b is pending and a is active
        assert sorted(await open_rows()) == [("a", "active"), ("b", "pending")]

        evaluator = await evaluating()  # the new process
        reading("a", t=6.0)  # still above: nothing new
        b = await frames.next()  # b's timer, re-armed for what was left of its 1.5 s
        assert b["device"] == "b" and b["state"] == "active"
        reading("z", t=5.0)  # sentinel: raised after all that, the next frame and notification
        assert (await frames.next())["device"] == "z"
        bodies = await inbox.wait_for(3)
        titles = [body["title"].split()[-1] for body in bodies]
        assert len(titles) == 3 and sorted(titles[:2]) == ["a", "b"] and titles[2] == "z", titles


async def test_two_processes_racing_open_one_alert():
    rule = await make_rule(device="d", metric="t", op="above", threshold=1.0)
    now = time.time()
    first = await database_sync_to_async(store.open_alert)(rule.id, "d", True, now, 2.0, now)
    second = await database_sync_to_async(store.open_alert)(rule.id, "d", True, now, 3.0, now)
    assert first[0] == second[0] and first[2] is not None and second[2] is None
    assert await database_sync_to_async(store.raise_alert)(first[0], 2.0, now) is None


async def test_notifications_go_to_the_rule_and_global_urls_and_failures_are_retried(
    frames, settings
):
    from alerts import notify
    from gateway.metrics import ALERT_NOTIFICATIONS

    failed = ALERT_NOTIFICATIONS.labels(result="failed")._value.get()
    async with receiver() as (ok, ok_url), receiver(status=500) as (broken, broken_url):
        settings.GATEWAY = {**settings.GATEWAY, "ALERT_NOTIFY_URLS": [ok_url]}
        await make_rule(
            name="Hot boiler",
            device="boiler-1",
            metric="temperature",
            op="above",
            threshold=80.0,
            notify_urls=[broken_url],
        )
        await evaluating()
        notify.get_notifier().backoff_first = 0.01
        reading("boiler-1", temperature=81.5)
        await frames.next()
        body = (await ok.wait_for(1))[0]
        assert "Hot boiler" in body["title"] and "boiler-1" in body["title"]
        assert "81.5" in body["message"]
        assert await notify.get_notifier().flush()
        assert ALERT_NOTIFICATIONS.labels(result="failed")._value.get() == failed + 1
        assert broken.attempts == notify.RETRIES + 1
        assert len(ok.bodies) == 1  # the working target is not notified again by the retries
    assert current_evaluator() is not None


async def test_two_bridges_sharing_a_device_raise_one_alert_and_stay_in_step(frames):
    """Two evaluators (two bridges of a shared subscription: a device's messages alternate
    between them) on one database and one channel layer."""
    from alerts.evaluator import Evaluator

    async with receiver() as (inbox, url):
        await make_rule(device="d", metric="t", op="above", threshold=10.0, for_seconds=0.3,
                        notify_urls=[url])  # fmt: skip
        await make_rule(device="s", metric="t", op="above", threshold=10.0, for_seconds=0.3)
        one, two = Evaluator(), Evaluator()
        try:
            await one.wait_ready()
            await two.wait_ready()
            now = time.time()
            one.reading("d", now, {"t": 11.0})
            two.reading("d", now, {"t": 12.0})  # the same episode, heard by the other bridge
            raised = await frames.next()
            assert raised["state"] == "active"
            # Sentinel: the same `for` started later on both bridges; both of d's timers
            # fired before, and one raise won.
            one.reading("s", time.time(), {"t": 11.0})
            two.reading("s", time.time(), {"t": 12.0})
            sentinel = await frames.next()
            assert (sentinel["device"], sentinel["state"]) == ("s", "active"), sentinel
            assert len(await inbox.wait_for(1)) == 1

            one.reading("d", time.time(), {"t": 5.0})
            assert (await frames.next())["state"] == "cleared"
            await one.flush()
            # The other bridge hears of it (alert.changed) and forgets its track.
            await until(
                lambda: not [key for key in two.tracks if key[1] == "d"],
                what="the other bridge forgot the alert",
            )
            two.reading("d", time.time(), {"t": 15.0})  # a new episode on the other bridge
            again = await frames.next()
            assert again["state"] == "active" and again["id"] != raised["id"]
            assert len(await inbox.wait_for(3)) == 3  # raised, cleared, raised
        finally:
            await one.close()
            await two.close()


async def test_a_new_offline_rule_covers_devices_already_offline(frames):
    evaluator = await evaluating()
    status("gone-1", False)
    status("here-1", True)
    await get_pipeline().flush()
    reloaded = asyncio.ensure_future(evaluator.rules_loaded())
    await make_rule(device="*-1", op="offline")
    await reloaded
    alert = await frames.next()
    assert alert["device"] == "gone-1" and alert["state"] == "active"
    await evaluator.flush()
    await frames.none_so_far()  # here-1 is online: nothing for it


async def test_a_rule_posted_to_the_api_applies_to_the_very_next_reading(frames):
    from django.contrib.auth.models import User
    from django.test import AsyncClient

    await evaluating()
    client = AsyncClient()
    user = await database_sync_to_async(User.objects.create_user)("ops", is_staff=True)
    await client.aforce_login(user)
    rule = {"name": "hot", "device": "boiler-1", "metric": "temperature", "op": "above",
            "threshold": 80, "severity": "warning"}  # fmt: skip
    response = await client.post("/api/alerts/rules", rule, content_type="application/json")
    assert response.status_code == 201
    reading("boiler-1", temperature=81.0)  # no wait: the 201 means the rule is in force here
    assert (await frames.next())["rule"] == response.json()["id"]


async def test_no_data_keeps_counting_across_a_rule_change(frames):
    rule = await make_rule(device="quiet", op="nodata", for_seconds=0.5)
    evaluator = await evaluating()
    reading("quiet", t=1.0)
    reloaded = asyncio.ensure_future(evaluator.rules_loaded())
    await make_rule(device="other", metric="t", op="above", threshold=1.0)  # any rule change
    await reloaded
    alert = await frames.next()  # the device stays silent: still raised
    assert alert["rule"] == rule.id and alert["device"] == "quiet"
