"""The devices REST API: auth, device list (with pending pipeline values), telemetry history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.test import AsyncClient

from devices.models import Device, Reading
from devices.telemetry.pipeline import get_pipeline

T0 = datetime(2025, 1, 1, tzinfo=UTC)
URL = "/api/devices/d1/telemetry"


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def api(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def d1(db):
    """Device d1 with `temp` every 10 s for 100 points (values 0..99) and one `hum` point."""
    device = Device.objects.create(id="d1", name="Lab", metrics={"temp": 99.0})
    Reading.objects.bulk_create(
        [
            Reading(device=device, metric="temp", ts=T0 + timedelta(seconds=10 * i), value=i)
            for i in range(100)
        ]
        + [Reading(device=device, metric="hum", ts=T0, value=40.0)]
    )
    return device


def points(response) -> list[list[float]]:
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    return body["points"]


# -- auth ----------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/devices/", URL + "?metric=temp"])
def test_anonymous_gets_401_json_not_a_redirect(client, path):
    response = client.get(path)
    assert response.status_code == 401
    assert response.json() == {"error": "authentication required"}


@pytest.mark.django_db
def test_session_login_works(client, user, d1):
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123"})
    assert response.status_code == 302, "the login form signs in and redirects"
    assert client.get("/api/devices/").status_code == 200


def test_only_get(api, d1):
    response = api.post("/api/devices/")
    assert (response.status_code, response.json()) == (405, {"error": "method not allowed"})
    response = api.delete(URL + "?metric=temp")
    assert response.status_code == 405 and "error" in response.json()


# -- device list ---------------------------------------------------------------------------


def test_device_list(api, d1):
    Device.objects.create(id="a0", transport="serial")
    response = api.get("/api/devices/")
    assert response.status_code == 200
    body = response.json()
    assert [d["id"] for d in body] == ["a0", "d1"]
    assert body[0] == {
        "id": "a0",
        "name": "a0",
        "online": False,
        "last_seen": None,
        "transport": "serial",
        "convention": "serial",
        "metrics": {},
        "rejected": 0,
        "last_rejected_at": None,
        "last_rejection": None,
    }
    assert body[1]["name"] == "Lab" and body[1]["metrics"] == {"temp": 99.0}
    assert body[1]["convention"] == "native"


@pytest.mark.django_db
def test_device_list_pages_with_limit_and_offset(api):
    Device.objects.bulk_create(Device(id=f"p{i}") for i in range(5))
    first = api.get("/api/devices/?limit=2")
    assert [d["id"] for d in first.json()] == ["p0", "p1"]
    assert first["X-Total-Count"] == "5"
    assert first["Link"] == '</api/devices/?limit=2&offset=2>; rel="next"'
    last = api.get("/api/devices/?limit=2&offset=4")
    assert [d["id"] for d in last.json()] == ["p4"] and "Link" not in last
    assert [d["id"] for d in api.get("/api/devices/?offset=3").json()] == ["p3", "p4"]
    assert api.get("/api/devices/?offset=9").json() == []
    assert "X-Total-Count" not in api.get("/api/devices/")  # unpaged: as before, every device
    for query, message in [
        ("limit=0", "limit must be between 1 and 1000"),
        ("limit=1001", "limit must be between 1 and 1000"),
        ("offset=-1", "offset must be between 0"),
        ("limit=ten", "limit must be an integer"),
    ]:
        response = api.get("/api/devices/?" + query)
        assert response.status_code == 400 and message in response.json()["error"], query


@pytest.mark.django_db(transaction=True)
async def test_device_list_includes_values_not_yet_written(user):
    await get_channel_layer().flush()
    await sync_to_async(Device.objects.create)(id="d1", metrics={"old": 1.0})
    pipeline = get_pipeline()
    pipeline.batch_delay = 3600  # keep them pending during the request
    try:
        received = datetime.now(UTC)
        pipeline.submit_reading("d1", "mqtt", T0.timestamp(), {"temp": 21.5})
        pipeline.submit_reading("new-one", "mqtt", T0.timestamp(), {"hum": 40.0})
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get("/api/devices/")
        assert response.status_code == 200
        body = {d["id"]: d for d in response.json()}
        assert body["d1"]["metrics"] == {"old": 1.0, "temp": 21.5}
        assert body["d1"]["online"] is True
        # last_seen is when the gateway received the reading, not the reading's own ts.
        last_seen = body["d1"]["last_seen"]  # epoch seconds (docs/interface.md §5.2)
        assert received.timestamp() <= last_seen <= datetime.now(UTC).timestamp()
        assert body["new-one"]["metrics"] == {"hum": 40.0}
        assert body["new-one"]["name"] == "new-one"
        assert body["new-one"]["rejected"] == 0  # the record's shape before it is stored
    finally:
        await pipeline.close()


@pytest.mark.django_db(transaction=True)
async def test_history_includes_a_reading_not_yet_written(user, layer):
    """A chart opened right after a reading shows it: the API writes what is pending first."""
    pipeline = get_pipeline()
    pipeline.batch_delay = 3600  # without the flush the reading would stay pending
    pipeline.submit_reading("fresh", "mqtt", T0.timestamp(), {"temp": 21.5})
    client = AsyncClient()
    await client.aforce_login(user)
    response = await client.get("/api/devices/fresh/telemetry", {"metric": "temp"})
    assert response.status_code == 200, response.content
    assert response.json()["points"] == [[T0.timestamp(), 21.5]]


# -- history -------------------------------------------------------------------------------


def test_history_all_points_oldest_first(api, d1):
    pts = points(api.get(URL, {"metric": "temp"}))
    assert len(pts) == 100
    assert pts[0] == [T0.timestamp(), 0.0]
    assert pts[-1] == [T0.timestamp() + 990, 99.0]
    assert [p[0] for p in pts] == sorted(p[0] for p in pts)
    assert api.get(URL + "/", {"metric": "temp"}).status_code == 200  # trailing slash too
    body = api.get(URL, {"metric": "temp"}).json()
    assert (body["device"], body["metric"]) == ("d1", "temp")


def test_history_since_until_iso_and_epoch(api, d1):
    since = (T0 + timedelta(seconds=100)).isoformat().replace("+00:00", "Z")
    until = str(T0.timestamp() + 190)
    pts = points(api.get(URL, {"metric": "temp", "since": since, "until": until}))
    assert [p[1] for p in pts] == [float(i) for i in range(10, 20)]  # both ends inclusive
    naive = (T0 + timedelta(seconds=980)).replace(tzinfo=None).isoformat()
    assert [p[1] for p in points(api.get(URL, {"metric": "temp", "since": naive}))] == [98, 99]
    millis = str(int((T0.timestamp() + 985) * 1000))
    assert [p[1] for p in points(api.get(URL, {"metric": "temp", "since": millis}))] == [99]


def test_history_exactly_n_points_is_not_downsampled(api, d1):
    pts = points(api.get(URL, {"metric": "temp", "max_points": 100}))
    assert [p[1] for p in pts] == [float(i) for i in range(100)]


def test_history_downsampled_to_time_bucket_averages(api, d1):
    pts = points(api.get(URL, {"metric": "temp", "max_points": 10}))
    assert 1 <= len(pts) <= 10
    assert [p[0] for p in pts] == sorted(p[0] for p in pts)
    # every value is counted once: the weighted mean of the buckets is the overall mean
    assert min(p[1] for p in pts) < 10 and max(p[1] for p in pts) > 89
    assert all(T0.timestamp() <= p[0] <= T0.timestamp() + 990 for p in pts)
    pts = points(api.get(URL, {"metric": "temp", "max_points": 1}))
    assert pts == [[pytest.approx(T0.timestamp() + 495), pytest.approx(49.5)]]


def test_history_downsampling_buckets_by_time_not_by_count(api, d1):
    # 50 extra points crowded into the first second: time buckets average them together
    Reading.objects.bulk_create(
        [
            Reading(device=d1, metric="burst", ts=T0 + timedelta(milliseconds=10 * i), value=0)
            for i in range(50)
        ]
        + [Reading(device=d1, metric="burst", ts=T0 + timedelta(seconds=100), value=10)]
    )
    pts = points(api.get(URL, {"metric": "burst", "max_points": 5}))
    assert [p[1] for p in pts] == [0.0, 10.0]


def test_history_of_same_instant_points(api, d1):
    # One reading per (device, metric, ts): the first stored is kept (the readings' key).
    Reading.objects.bulk_create(
        [Reading(device=d1, metric="same", ts=T0, value=v) for v in (1.0, 2.0, 3.0)],
        ignore_conflicts=True,
    )
    assert points(api.get(URL, {"metric": "same", "max_points": 2})) == [[T0.timestamp(), 1.0]]


def test_history_unknown_metric_is_empty(api, d1):
    assert points(api.get(URL, {"metric": "nope"})) == []


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"metric": ""},
        {"metric": "temp", "since": "yesterday"},
        {"metric": "temp", "until": "nan"},
        {"metric": "temp", "since": "1e400"},
        {"metric": "temp", "max_points": "0"},
        {"metric": "temp", "max_points": "10001"},
        {"metric": "temp", "max_points": "ten"},
        {"metric": "temp", "since": "2025-02-01", "until": "2025-01-01"},
    ],
)
def test_history_bad_params_are_400_json(api, d1, query):
    response = api.get(URL, query)
    assert response.status_code == 400
    assert response.json()["error"]


@pytest.mark.parametrize("path", ["/api/devices/ghost/telemetry", "/api/devices/b%20d/telemetry"])
def test_history_unknown_device_is_404(api, d1, path):
    response = api.get(path, {"metric": "temp"})
    assert response.status_code == 404 and response.json()["error"]
