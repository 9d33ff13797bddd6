"""The history API as a CSV download (``format=csv``, docs/interface.md §5.2): the same points
as the JSON answer, streamed, bounded by ``max_points``, named after the device and metric."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from devices.models import Device, Reading

T0 = datetime(2026, 12, 4, 9, 15, 54, tzinfo=UTC)
URL = "/api/devices/lab-1/telemetry"


def _seed() -> None:
    device = Device.objects.create(id="lab-1", metrics={"pressure": 1006.5, "relay": True})
    Reading.objects.bulk_create(
        [
            Reading(device=device, metric="pressure", ts=T0 + timedelta(seconds=i), value=1000 + i)
            for i in range(1200)
        ]
        + [
            Reading(device=device, metric="relay", ts=T0, value=0.0),
            Reading(device=device, metric="relay", ts=T0 + timedelta(seconds=5), value=1.0),
        ]
    )


@pytest.fixture
async def api(django_user_model):
    await sync_to_async(_seed)()
    user = await django_user_model.objects.acreate(username="alice")
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def download(response) -> tuple[list[list[str]], str]:
    assert response.status_code == 200
    assert response.streaming, "a CSV download is streamed"
    body = b"".join([chunk async for chunk in response.streaming_content]).decode()
    return list(csv.reader(io.StringIO(body))), body


@pytest.mark.django_db(transaction=True)
async def test_csv_is_an_attachment_with_iso_utc_times_epochs_and_values(api):
    response = await api.get(URL, {"metric": "relay", "format": "csv"})
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="lab-1_relay.csv"'
    rows, body = await download(response)
    assert body.endswith("\r\n")
    assert rows == [
        ["time_utc", "epoch_seconds", "value"],
        ["2026-12-04T09:15:54.000Z", repr(T0.timestamp()), "0.0"],
        ["2026-12-04T09:15:59.000Z", repr(T0.timestamp() + 5), "1.0"],
    ]


@pytest.mark.django_db(transaction=True)
async def test_csv_has_the_json_points_bounded_by_max_points_over_several_chunks(api):
    query = {"metric": "pressure", "since": (T0 + timedelta(seconds=100)).isoformat()}
    as_json = (await api.get(URL, {**query, "max_points": 1200})).json()["points"]
    rows, _ = await download(await api.get(URL, {**query, "max_points": 1200, "format": "csv"}))
    assert len(rows) == 1 + 1100  # more rows than one streamed chunk (500)
    assert [[float(r[1]), float(r[2])] for r in rows[1:]] == as_json
    rows, _ = await download(await api.get(URL, {**query, "max_points": 10, "format": "csv"}))
    assert len(rows) == 1 + 10  # downsampled as the JSON answer is


@pytest.mark.django_db(transaction=True)
async def test_csv_of_a_metric_without_points_is_the_header_only(api):
    rows, _ = await download(await api.get(URL, {"metric": "nothing", "format": "csv"}))
    assert rows == [["time_utc", "epoch_seconds", "value"]]


@pytest.mark.django_db(transaction=True)
async def test_a_metric_name_never_reaches_a_cell_or_the_header_unsafely(api):
    await sync_to_async(Reading.objects.create)(
        device_id="lab-1", metric='=cmd|"/c calc"!A1', ts=T0, value=1.0
    )
    response = await api.get(URL, {"metric": '=cmd|"/c calc"!A1', "format": "csv"})
    assert response["Content-Disposition"] == 'attachment; filename="lab-1_cmd_c_calc_A1.csv"'
    rows, _ = await download(response)
    assert rows[1][2] == "1.0" and not any(cell.startswith("=") for row in rows for cell in row)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "query, status",
    [
        ({"metric": "pressure", "format": "xml"}, 400),
        ({"metric": "pressure", "format": "csv", "max_points": 10_001}, 400),
        ({"format": "csv"}, 400),
    ],
)
async def test_bad_csv_requests_are_json_errors(api, query, status):
    response = await api.get(URL, query)
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert "error" in response.json()


@pytest.mark.django_db(transaction=True)
async def test_csv_needs_a_login_and_a_known_device():
    assert (await AsyncClient().get(URL, {"metric": "x", "format": "csv"})).status_code == 401
