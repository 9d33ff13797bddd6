"""The devices REST API (docs/interface.md §5.2), mounted at ``/api/``; every path needs a login.

Anonymous requests get ``401 {"error": "authentication required"}`` (JSON, never a redirect to
the login page: scripts call this API). Session authentication, as for the dashboard.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.db.models import Avg, F, FloatField, Func, Value
from django.db.models.functions import Floor, Greatest
from django.http import HttpRequest, HttpResponse

from devices.api import api_view, json_error, json_response
from devices.conventions.kinds import with_conventions
from devices.export import csv_response
from devices.models import Device, Reading
from devices.telemetry.parsing import MS_THRESHOLD, valid_device_id, valid_metric_name
from devices.telemetry.pipeline import flush_if_pending, snapshot_overlay

DEFAULT_MAX_POINTS = 1000
MAX_POINTS_CAP = 10_000


#: Devices per page of a paged device list at most (``?limit=``).
MAX_PAGE = 1000


@api_view
async def device_list(request: HttpRequest) -> HttpResponse:
    """All devices as `Device.as_dict()` with their ``convention``, and with values the
    pipeline has not stored yet; with ``limit``/``offset``, one page of the stored devices
    (total in ``X-Total-Count``, the next page in ``Link``)."""
    try:
        page = parse_page(request.GET.get("limit"), request.GET.get("offset"))
    except BadParam as exc:
        return json_error(400, str(exc))
    if page is None:
        stored = [device.as_dict() async for device in Device.objects.all()]
        return json_response(with_conventions(snapshot_overlay(stored)))
    limit, offset = page
    devices = Device.objects.order_by("id")
    total = await devices.acount()
    stored = [device.as_dict() async for device in devices[offset : offset + limit]]
    response = json_response(with_conventions(snapshot_overlay(stored, stored_only=True)))
    response["X-Total-Count"] = str(total)
    if offset + limit < total:
        response["Link"] = f'<{request.path}?limit={limit}&offset={offset + limit}>; rel="next"'
    return response


class BadParam(ValueError):
    """A query parameter the API cannot use (answered with 400)."""


def parse_time(name: str, text: str | None) -> datetime | None:
    """`since`/`until`: ISO 8601 (naive = UTC) or epoch seconds (milliseconds above 1e11)."""
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    try:
        if number is not None:
            if not math.isfinite(number):
                raise ValueError
            if abs(number) >= MS_THRESHOLD:
                number /= 1000.0
            return datetime.fromtimestamp(number, UTC)
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        # In UTC here: 0001-01-01T00:00+01:00 has no UTC datetime (the database query would 500).
        return moment.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise BadParam(f"{name} must be ISO 8601 or epoch seconds, got {text!r}") from None


def parse_page(limit: str | None, offset: str | None) -> tuple[int, int] | None:
    """A device list's page, ``(limit, offset)``; None when neither is given (every device)."""
    if limit is None and offset is None:
        return None
    bounds = {"limit": (limit, MAX_PAGE, 1, MAX_PAGE), "offset": (offset, 0, 0, 10**9)}
    values = []
    for name, (text, default, low, high) in bounds.items():
        if text is None or text.strip() == "":
            values.append(default)
            continue
        try:
            value = int(text)
        except ValueError:
            raise BadParam(f"{name} must be an integer, got {text[:40]!r}") from None
        if not low <= value <= high:
            raise BadParam(f"{name} must be between {low} and {high}")
        values.append(value)
    return values[0], values[1]


def parse_max_points(text: str | None) -> int:
    if text is None or text.strip() == "":
        return DEFAULT_MAX_POINTS
    try:
        value = int(text)
    except ValueError:
        raise BadParam(f"max_points must be an integer, got {text!r}") from None
    if not 1 <= value <= MAX_POINTS_CAP:
        raise BadParam(f"max_points must be between 1 and {MAX_POINTS_CAP}")
    return value


class Epoch(Func):
    """A datetime column as epoch seconds (float), in SQL, for SQLite and PostgreSQL."""

    output_field = FloatField()
    template = "EXTRACT(EPOCH FROM %(expressions)s)"

    def as_sqlite(self, compiler, connection, **extra):  # noqa: D102
        # julianday() reads Django's stored text; 2440587.5 is the Julian day of 1970-01-01.
        template = "((julianday(%(expressions)s) - 2440587.5) * 86400.0)"
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_postgresql(self, compiler, connection, **extra):  # noqa: D102
        # date_part is double precision already; EXTRACT returns numeric since PostgreSQL 14,
        # twice as slow over the rows of a long history.
        template = "date_part('epoch', %(expressions)s)"
        return self.as_sql(compiler, connection, template=template, **extra)


def history(device_id: str, metric: str, since, until, max_points: int) -> list[list[float]]:
    """Points of one metric, oldest first; time-bucketed averages in SQL when more than N.

    No count over the range: the first N + 1 points tell whether there are more than N, and
    the last one is an index seek (the readings' key (device, metric, ts) holds every column
    read here; ts is unique within a series, so it orders the points alone).
    """
    qs = Reading.objects.filter(device_id=device_id, metric=metric)
    if since is not None:
        qs = qs.filter(ts__gte=since)
    if until is not None:
        qs = qs.filter(ts__lte=until)
    head = list(qs.order_by("ts").values_list("ts", "value")[: max_points + 1])
    if len(head) <= max_points:
        return [[ts.timestamp(), value] for ts, value in head]
    last = qs.order_by("-ts").values_list("ts", flat=True).first()
    t0, t1 = head[0][0].timestamp(), last.timestamp()
    # max_points - 0.5 buckets' worth of width keeps the last point in bucket max_points - 1.
    width = max((t1 - t0) / (max_points - 0.5), 1e-6)
    # Not below 0: SQLite's julianday() can put the first point a few microseconds before t0.
    bucket = Floor(Greatest((Epoch("ts") - Value(t0)) / Value(width), Value(0.0)))
    rows = (
        qs.annotate(bucket=bucket)
        .values("bucket")
        .annotate(t=Avg(Epoch(F("ts"))), v=Avg("value"))
        .order_by("bucket")
        .values_list("t", "v")
    )
    return [[t, v] for t, v in rows]


@api_view
async def device_telemetry(request: HttpRequest, device_id: str) -> HttpResponse:
    """``{"device", "metric", "points": [[epoch_seconds, value], …]}``, at most max_points;
    with ``format=csv`` the same points as a CSV download (devices/export.py).

    Readings this process holds for the device but has not written yet are written first, so
    a chart opened right after a reading includes it.
    """
    params = request.GET
    metric = params.get("metric", "")
    as_csv = params.get("format", "json") == "csv"
    try:
        if params.get("format", "json") not in ("json", "csv"):
            raise BadParam("format must be json or csv")
        if not metric:
            raise BadParam("metric is required")
        if not valid_metric_name(metric):  # never stored; a NUL would also break PostgreSQL
            raise BadParam("metric must be 1-200 characters without control characters")
        since = parse_time("since", params.get("since"))
        until = parse_time("until", params.get("until"))
        max_points = parse_max_points(params.get("max_points"))
        if since is not None and until is not None and since > until:
            raise BadParam("since is after until")
    except BadParam as exc:
        return json_error(400, str(exc))
    if not valid_device_id(device_id):
        return json_error(404, f"unknown device {device_id!r}")
    await flush_if_pending(device_id)
    if not await Device.objects.filter(id=device_id).aexists():
        return json_error(404, f"unknown device {device_id!r}")
    points = await sync_to_async(history)(device_id, metric, since, until, max_points)
    if as_csv:
        return csv_response(device_id, metric, points)
    return json_response({"device": device_id, "metric": metric, "points": points})
