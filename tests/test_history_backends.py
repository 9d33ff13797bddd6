"""The history query answers the same on PostgreSQL as on SQLite (docs/interface.md §5 semantics).

Every stored point when there are at most N, else at most N time-bucket averages, oldest
first. The same readings are queried in this process on SQLite and in a child process on a
throwaway PostgreSQL database, and the answers compared.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from devices.models import Device, Reading
from devices.views import history
from tests.support.gateway import run_on_postgres

T0 = datetime(2025, 3, 1, tzinfo=UTC)
QUERIES = {
    "all points": ("temp", None, None, 1000),
    "exactly N": ("temp", None, None, 500),
    "downsampled": ("temp", None, None, 7),
    "one bucket": ("temp", None, None, 1),
    "window": ("temp", T0 + timedelta(minutes=100), T0 + timedelta(minutes=200), 1000),
    "window downsampled": ("temp", T0 + timedelta(minutes=100), T0 + timedelta(minutes=300), 20),
    "same instant": ("same", None, None, 1),
    "unknown metric": ("nope", None, None, 10),
}


def seed() -> None:
    """500 `temp` readings a minute apart (values 0 … 499) and one `same` (a metric is stored
    once per instant: the readings' key (device, metric, ts))."""
    device = Device.objects.create(id="d1")
    minutes = [
        Reading(device=device, metric="temp", ts=T0 + timedelta(minutes=i), value=i)
        for i in range(500)
    ]
    same = [Reading(device=device, metric="same", ts=T0, value=2.0)]
    Reading.objects.bulk_create(minutes + same)


def answers() -> dict[str, list[list[float]]]:
    return {name: history("d1", *query) for name, query in QUERIES.items()}


def check_contract(got: dict[str, list[list[float]]]) -> None:
    """What docs/interface.md §5 promises, whatever the backend."""
    assert got["all points"] == [[(T0 + timedelta(minutes=i)).timestamp(), i] for i in range(500)]
    assert got["exactly N"] == got["all points"]
    assert [p[1] for p in got["window"]] == [float(i) for i in range(100, 201)]
    for name in ("downsampled", "one bucket", "window downsampled"):
        points, limit = got[name], QUERIES[name][3]
        assert 1 <= len(points) <= limit, name
        assert [p[0] for p in points] == sorted(p[0] for p in points), name
    assert got["one bucket"] == [[pytest.approx(T0.timestamp() + 249.5 * 60), pytest.approx(249.5)]]
    assert got["same instant"] == [[T0.timestamp(), 2.0]]
    assert got["unknown metric"] == []


@pytest.mark.django_db
def test_history_semantics_on_sqlite():
    seed()
    check_contract(answers())


@pytest.mark.django_db
@pytest.mark.postgres
def test_postgresql_answers_like_sqlite():
    seed()
    on_sqlite = answers()
    script = (
        "import json\n"
        "from tests import test_history_backends as t\n"
        "t.seed()\n"
        "got = t.answers()\n"
        "t.check_contract(got)\n"
        "print(json.dumps(got))\n"
    )
    result = run_on_postgres(script)
    assert result.returncode == 0, result.stderr[-4000:]
    on_postgres = json.loads(result.stdout.strip().splitlines()[-1])
    assert on_postgres.keys() == on_sqlite.keys()
    for name, points in on_sqlite.items():
        # SQLite's epoch comes from julianday(), good to a few µs; the buckets are the same.
        assert len(on_postgres[name]) == len(points), name
        for (t1, v1), (t2, v2) in zip(on_postgres[name], points, strict=True):
            assert t1 == pytest.approx(t2, abs=1e-3) and v1 == pytest.approx(v2), name
