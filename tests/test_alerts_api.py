"""The alerts REST API (docs/alerts.md): rules, the alert list, acknowledging; through Django's
full middleware stack (sessions, CSRF, auth) with the real database and channel layer."""

from __future__ import annotations

import json
import time

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission, User
from django.test import AsyncClient

from alerts import store
from alerts.models import AlertEvent, AlertRule
from tests.support.alerts import AlertFrames

pytestmark = pytest.mark.django_db(transaction=True)

RULES = "/api/alerts/rules"
RULE = {
    "name": "Boiler too hot",
    "device": "boiler-*",
    "metric": "temperature",
    "op": "above",
    "threshold": 80,
    "for": 30,
    "severity": "critical",
}


def make_user(username: str, *, staff: bool = False, perms: tuple[str, ...] = ()) -> User:
    user = User.objects.create_user(username, password=f"pw-{username}-12345", is_staff=staff)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


async def client_for(username: str | None, **kwargs) -> AsyncClient:
    client = AsyncClient()
    if username is not None:
        await client.aforce_login(await database_sync_to_async(make_user)(username, **kwargs))
    return client


async def post(client: AsyncClient, url: str, body) -> object:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return await client.post(url, data=data, content_type="application/json")


@database_sync_to_async
def raised_alert(device: str = "boiler-1") -> int:
    rule = AlertRule.objects.create(name="r", device=device, metric="t", op="above", threshold=1)
    now = time.time()
    alert_id, _, _ = store.open_alert(rule.id, device, True, now, 5.0, now)
    return alert_id


async def test_staff_create_a_rule_201_and_it_is_listed():
    client = await client_for("ops", staff=True)
    response = await post(client, RULES, RULE)
    assert response.status_code == 201, response.content
    body = response.json()
    assert isinstance(body["id"], int)
    assert body["device"] == "boiler-*" and body["op"] == "above" and body["threshold"] == 80.0
    assert body["for"] == 30.0 and body["severity"] == "critical" and body["enabled"] is True
    listed = (await client.get(RULES)).json()
    assert [rule["id"] for rule in listed] == [body["id"]]


async def test_offline_rules_need_no_threshold_and_for_defaults_to_zero():
    client = await client_for("ops", staff=True)
    response = await post(
        client, RULES, {"name": "gone", "device": "sim-0001", "op": "offline", "severity": "info"}
    )
    assert response.status_code == 201, response.content
    assert response.json()["for"] == 0.0 and response.json()["threshold"] is None


@pytest.mark.parametrize(
    "change",
    [
        {"op": "sideways"},
        {"op": None},
        {"severity": "apocalyptic"},
        {"threshold": None},
        {"threshold": "80"},
        {"threshold": True},
        {"threshold": 1e309},  # JSON's way to spell inf
        {"for": -1},
        {"for": "soon"},
        {"device": ""},
        {"device": "x" * 129},
        {"device": "*" * 5000},
        {"device": "../etc/passwd"},
        {"device": "a/b"},
        {"device": "sim-\u0000"},
        {"device": ["sim-1"]},
        {"metric": ""},
        {"metric": "bad\nmetric"},
        {"name": ""},
        {"name": "x" * 201},
        {"name": "<b>\u0007</b>"},
        {"notify": "json://x/"},
        {"notify": ["not a url"]},
    ],
)
async def test_bad_rules_are_400_and_nothing_is_stored(change):
    client = await client_for("ops", staff=True)
    response = await post(client, RULES, {**RULE, **change})
    assert response.status_code == 400, (change, response.content)
    assert response.json()["code"] == "bad_request" and response.json()["error"]
    assert not await AlertRule.objects.aexists()


@pytest.mark.parametrize("raw", [b"NaN", b"[]", b"{", b"\xff", b"null", b'"rule"', b"1" * 20000])
async def test_bodies_that_are_not_a_rule_are_400(raw):
    client = await client_for("ops", staff=True)
    response = await client.post(RULES, data=raw, content_type="application/json")
    assert response.status_code == 400
    assert not await AlertRule.objects.aexists()


async def test_nan_and_infinite_thresholds_are_refused():
    client = await client_for("ops", staff=True)
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        text = json.dumps({**RULE, "threshold": 0}).replace(
            '"threshold": 0', f'"threshold": {literal}'
        )
        assert literal in text
        response = await client.post(RULES, data=text, content_type="application/json")
        assert response.status_code == 400, literal


async def test_managing_rules_needs_the_permission():
    viewer = await client_for("viewer")
    assert (await post(viewer, RULES, RULE)).status_code == 403
    assert (await viewer.get(RULES)).status_code == 200  # reading rules needs only a login
    manager = await client_for("manager", perms=("manage_rules",))
    assert (await post(manager, RULES, RULE)).status_code == 201
    anonymous = AsyncClient()
    for response in (await post(anonymous, RULES, RULE), await anonymous.get("/api/alerts/")):
        assert response.status_code == 401 and response.json()["code"] == "unauthenticated"


async def test_csrf_is_enforced_after_authentication():
    client = AsyncClient(enforce_csrf_checks=True)
    await client.aforce_login(await database_sync_to_async(make_user)("ops", staff=True))
    response = await post(client, RULES, RULE)
    assert response.status_code == 403 and response.json()["code"] == "csrf_failed"


async def test_the_list_has_the_contract_fields_and_filters_by_state():
    alert_id = await raised_alert()
    client = await client_for("viewer")
    active = (await client.get("/api/alerts/?state=active")).json()
    assert [a["id"] for a in active] == [alert_id]
    alert = active[0]
    expected = {"id", "rule", "device", "state", "acknowledged", "acknowledged_by", "raised_at"}
    assert expected | {"cleared_at", "value"} <= alert.keys()
    assert alert["state"] == "active" and alert["value"] == 5.0 and alert["device"] == "boiler-1"
    assert isinstance(alert["raised_at"], float) and alert["cleared_at"] is None
    assert (await client.get("/api/alerts/?state=cleared")).json() == []
    await database_sync_to_async(store.clear_alert)(alert_id, 1.0, time.time())
    cleared = (await client.get("/api/alerts/?state=cleared")).json()
    assert [a["id"] for a in cleared] == [alert_id] and isinstance(cleared[0]["cleared_at"], float)
    assert (await client.get("/api/alerts/?state=bogus")).status_code == 400
    # Without the trailing slash: Django's APPEND_SLASH sends a GET on to the list.
    bare = await client.get("/api/alerts")
    assert (bare.status_code, bare["Location"]) == (301, "/api/alerts/")
    followed = await client.get("/api/alerts", follow=True)
    assert [a["id"] for a in followed.json()] == [alert_id]


async def test_staff_acknowledge_once_with_a_note_and_every_dashboard_hears_it(layer, dashboard):
    alert_id = await raised_alert()
    frames = AlertFrames(layer, dashboard)
    client = await client_for("ops", staff=True)
    response = await post(client, f"/api/alerts/{alert_id}/ack", {"note": "on it"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["acknowledged"] is True and body["acknowledged_by"] == "ops"
    assert body["ack_note"] == "on it" and body["state"] == "active"
    frame = await frames.next()
    assert frame["id"] == alert_id and frame["acknowledged_by"] == "ops"
    again = await post(client, f"/api/alerts/{alert_id}/ack", b"")
    assert again.status_code == 200 and again.json()["acknowledged_by"] == "ops"
    await frames.none_so_far()  # the view emits before it answers: nothing for a repeat
    kinds = [e.kind async for e in AlertEvent.objects.filter(alert_id=alert_id)]
    assert kinds == ["raised", "acknowledged"]
    trail = (await client.get(f"/api/alerts/{alert_id}")).json()["events"]
    assert [(e["kind"], e["user"], e["note"]) for e in trail] == [
        ("raised", None, ""),
        ("acknowledged", "ops", "on it"),
    ]
    assert trail[0]["value"] == 5.0 and isinstance(trail[1]["at"], float)
    assert (await client.get("/api/alerts/424242")).status_code == 404


async def test_a_viewer_cannot_acknowledge_but_the_permission_can():
    alert_id = await raised_alert()
    viewer = await client_for("viewer")
    response = await post(viewer, f"/api/alerts/{alert_id}/ack", {})
    assert response.status_code == 403 and response.json()["code"] == "forbidden"
    listed = (await viewer.get("/api/alerts/")).json()
    assert listed[0]["acknowledged"] is False
    acker = await client_for("acker", perms=("acknowledge_alert",))
    assert (await post(acker, f"/api/alerts/{alert_id}/ack", {})).status_code == 200


@pytest.mark.parametrize("alert_id", ["999999", "abc", "1e3", "9" * 40, "-1"])
async def test_unknown_alerts_are_404(alert_id):
    client = await client_for("ops", staff=True)
    response = await post(client, f"/api/alerts/{alert_id}/ack", {})
    assert response.status_code == 404 and response.json()["code"] == "not_found"


async def test_hostile_notes_are_refused_and_stored_ones_come_back_as_data():
    alert_id = await raised_alert()
    client = await client_for("ops", staff=True)
    assert (
        await post(client, f"/api/alerts/{alert_id}/ack", {"note": "x" * 1001})
    ).status_code == 400
    assert (await post(client, f"/api/alerts/{alert_id}/ack", {"note": 5})).status_code == 400
    note = "<img src=x onerror=alert(1)>"
    response = await post(client, f"/api/alerts/{alert_id}/ack", {"note": note})
    assert response.json()["ack_note"] == note
    assert response["Content-Type"] == "application/json"


async def test_the_admin_lists_rules_and_alerts_with_their_trail():
    alert_id = await raised_alert()
    client = AsyncClient()
    root = await database_sync_to_async(User.objects.create_superuser)(
        "root", password="pw-root-12345"
    )
    await client.aforce_login(root)
    for url in (
        "/admin/alerts/alertrule/",
        "/admin/alerts/alertrule/add/",
        "/admin/alerts/alert/",
        f"/admin/alerts/alert/{alert_id}/change/",
    ):
        response = await client.get(url)
        assert response.status_code == 200, url
    page = (await client.get(f"/admin/alerts/alert/{alert_id}/change/")).content.decode()
    assert "Raised" in page  # the audit row, inline


async def test_a_rule_is_read_at_its_location_and_deleted_with_its_alerts(layer, dashboard):
    alert_id = await raised_alert()
    frames = AlertFrames(layer, dashboard)
    client = await client_for("ops", staff=True)
    doomed = f"/api/alerts/rules/{(await client.get('/api/alerts/')).json()[0]['rule']}"
    assert (await client.delete(doomed)).status_code == 204
    cleared = await frames.next()
    assert cleared["id"] == alert_id and cleared["state"] == "cleared"
    created = await post(client, RULES, RULE)
    location = created["Location"]
    assert (await client.get(location)).json() == created.json()
    viewer = await client_for("viewer")
    assert (await viewer.delete(location)).status_code == 403
    assert (await client.delete(location)).status_code == 204
    assert (await client.get(location)).status_code == 404
    assert (await client.delete(location)).status_code == 404
    assert (await client.get("/api/alerts/rules/x")).status_code == 404
    assert not await AlertRule.objects.aexists()


async def test_the_admin_validates_rules_as_the_api_does():
    client = AsyncClient()
    root = await database_sync_to_async(User.objects.create_superuser)(
        "root", password="pw-root-12345"
    )
    await client.aforce_login(root)
    form = {"name": "r", "device": "a/b", "metric": "t", "op": "above", "threshold": "1",
            "hysteresis": "0", "for_seconds": "0", "severity": "warning", "enabled": "on",
            "notify_urls": "[]"}  # fmt: skip
    response = await client.post("/admin/alerts/alertrule/add/", form)
    assert response.status_code == 200 and b"device must be" in response.content
    assert not await AlertRule.objects.aexists()
    response = await client.post("/admin/alerts/alertrule/add/", {**form, "device": "a-*"})
    assert response.status_code == 302
    assert await AlertRule.objects.filter(device="a-*").aexists()
