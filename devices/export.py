"""A metric's history as CSV (``format=csv`` on the history API, docs/interface.md §5.2).

The points are the JSON answer's (at most ``max_points``, bucketed averages past it); they are
streamed in chunks so a 10,000-point download never sits in memory twice as text.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from django.http import StreamingHttpResponse

#: Rows written per streamed chunk.
CHUNK_ROWS = 500
#: The CSV header; the metric is named in the file name, never in a cell (a device-chosen
#: name starting with ``=`` would be a formula in a spreadsheet).
HEADER = ("time_utc", "epoch_seconds", "value")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def filename(device_id: str, metric: str) -> str:
    """``<device>_<metric>.csv`` with anything outside ``[A-Za-z0-9_.-]`` replaced by ``_``."""
    safe_metric = _UNSAFE.sub("_", metric).strip("._") or "metric"
    return f"{device_id}_{safe_metric[:100]}.csv"


def _iso(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _rows(points: Sequence[Sequence[float]]) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(HEADER)
    for start in range(0, max(len(points), 1), CHUNK_ROWS):
        for ts, value in points[start : start + CHUNK_ROWS]:
            writer.writerow((_iso(ts), repr(float(ts)), repr(float(value))))
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


def csv_response(
    device_id: str, metric: str, points: Sequence[Sequence[float]]
) -> StreamingHttpResponse:
    """`points` (``[[epoch_seconds, value], …]``, oldest first) as a streamed CSV download."""
    response = StreamingHttpResponse(_rows(points), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename(device_id, metric)}"'
    return response
