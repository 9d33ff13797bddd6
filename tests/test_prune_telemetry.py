"""`manage.py prune_telemetry`: old readings become hourly averages, then go; on both databases.

Each story below is a plain function run twice: on SQLite in this process (pytest-django), and
on PostgreSQL in a child process migrated onto a throwaway database (`run_on_postgres`).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import CommandError, call_command

from devices.models import Device, Reading
from devices.views import history
from tests.support.gateway import run_on_postgres

DAY = timedelta(days=1)


def hour_ago(days: float) -> datetime:
    """The start of the hour `days` ago (stories keep clear of the cutoff's own hour)."""
    return (datetime.now(UTC) - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)


def seed(device: str, metric: str, first: datetime, hours: int) -> None:
    """Six readings per hour (at :00, :10 … :50, values 0 … 5) for `hours` hours."""
    Device.objects.get_or_create(id=device)
    Reading.objects.bulk_create(
        Reading(
            device_id=device,
            metric=metric,
            ts=first + timedelta(hours=h, minutes=10 * i),
            value=float(i),
        )
        for h in range(hours)
        for i in range(6)
    )


def prune(*args: str) -> str:
    out = io.StringIO()
    call_command("prune_telemetry", *args, stdout=out)
    return out.getvalue()


def rows(device: str, metric: str) -> list[tuple[datetime, float]]:
    return list(
        Reading.objects.filter(device_id=device, metric=metric)
        .order_by("ts")
        .values_list("ts", "value")
    )


def story_old_readings_become_hourly_averages_the_api_still_shows() -> None:
    old_start, recent_start = hour_ago(40), hour_ago(20)
    seed("d1", "temp", old_start, hours=48)  # 40 and 38 days ago: past the 30-day retention
    seed("d1", "temp", recent_start, hours=24)  # 20 days ago: kept raw
    seed("d2", "hum", old_start, hours=2)
    out = prune("--retention-days", "30", "--downsample-days", "365")
    assert "rolled 300 readings into 50 hourly averages" in out, out
    assert "deleted 0 readings" in out and "2 series on 2 devices" in out, out

    kept = rows("d1", "temp")
    assert len(kept) == 48 + 24 * 6
    averages, raw = kept[:48], kept[48:]
    for h, (ts, value) in enumerate(averages):
        # the hour's mean value (0 … 5 → 2.5) at the hour's mean time (:25)
        assert value == pytest.approx(2.5)
        assert abs((ts - (old_start + timedelta(hours=h, minutes=25))).total_seconds()) < 0.01
    assert raw[0] == (recent_start, 0.0) and raw[-1][1] == 5.0
    assert [v for _, v in rows("d2", "hum")] == [2.5, 2.5]

    # the history API returns the averages, then the raw readings, oldest first
    points = history("d1", "temp", None, None, 10_000)
    assert len(points) == len(kept) and points[0][1] == pytest.approx(2.5)
    assert points[-1] == [(recent_start + timedelta(hours=23, minutes=50)).timestamp(), 5.0]

    # a second run finds nothing to do and changes nothing
    again = prune("--retention-days", "30", "--downsample-days", "365")
    assert "deleted 0 readings" in again and "rolled 0 readings into 0" in again, again
    assert rows("d1", "temp") == kept


def story_readings_past_the_horizon_are_deleted() -> None:
    seed("d1", "temp", hour_ago(400), hours=3)  # past a year: deleted
    seed("d1", "temp", hour_ago(100), hours=1)  # averaged
    seed("d1", "temp", hour_ago(1), hours=1)  # raw
    out = prune("--retention-days", "30", "--downsample-days", "365")
    assert "deleted 18 readings" in out and "rolled 6 readings into 1 hourly" in out, out
    assert [v for _, v in rows("d1", "temp")] == [2.5, 0, 1, 2, 3, 4, 5]

    # without averages the retention deletes outright
    out = prune("--retention-days", "30", "--downsample-days", "0")
    assert "deleted 1 readings" in out and "rolled" not in out, out
    assert [v for _, v in rows("d1", "temp")] == [0, 1, 2, 3, 4, 5]


def story_small_batches_reach_the_same_result() -> None:
    """Many short transactions (3 readings each) end where one big run would."""
    seed("d1", "temp", hour_ago(500), hours=5)
    seed("d1", "temp", hour_ago(60), hours=5)
    seed("d1", "temp", hour_ago(2), hours=1)
    out = prune("--retention-days", "30", "--downsample-days", "365", "--batch-size", "3")
    assert "deleted 30 readings" in out and "rolled 30 readings into 5 hourly" in out, out
    assert [v for _, v in rows("d1", "temp")] == [2.5] * 5 + [0, 1, 2, 3, 4, 5]


def story_dry_run_counts_and_changes_nothing() -> None:
    seed("d1", "temp", hour_ago(400), hours=1)
    seed("d1", "temp", hour_ago(50), hours=2)
    before = rows("d1", "temp")
    out = prune("--dry-run", "--retention-days", "30", "--downsample-days", "365")
    assert "dry run" in out, out
    assert "would delete 6 readings" in out and "would roll 12 readings into 2 hourly" in out
    assert rows("d1", "temp") == before


STORIES = [
    story_old_readings_become_hourly_averages_the_api_still_shows,
    story_readings_past_the_horizon_are_deleted,
    story_small_batches_reach_the_same_result,
    story_dry_run_counts_and_changes_nothing,
]


@pytest.mark.django_db
@pytest.mark.parametrize("story", STORIES, ids=lambda s: s.__name__.removeprefix("story_"))
def test_on_sqlite(story):
    story()


@pytest.mark.postgres
def test_on_postgresql():
    """Every story, in one child process migrated onto a throwaway database, emptied between."""
    script = (
        "from devices.models import Device\n"
        "from tests import test_prune_telemetry as t\n"
        "for story in t.STORIES:\n"
        "    Device.objects.all().delete()\n"
        "    story()\n"
        "    print('ok', story.__name__)\n"
    )
    result = run_on_postgres(script)
    assert result.returncode == 0, f"on PostgreSQL:\n{result.stdout}{result.stderr[-4000:]}"
    assert result.stdout.count("ok story_") == len(STORIES)


@pytest.mark.django_db
def test_bad_options_are_refused_and_zero_retention_keeps_everything():
    seed("d1", "temp", hour_ago(400), hours=1)
    with pytest.raises(CommandError, match="must be longer"):
        prune("--retention-days", "30", "--downsample-days", "30")
    with pytest.raises(CommandError):
        prune("--batch-size", "0")
    assert "keep forever" in prune("--retention-days", "0")
    assert Reading.objects.count() == 6


@pytest.mark.django_db
def test_defaults_come_from_the_settings(settings):
    settings.GATEWAY = {
        **settings.GATEWAY,
        "TELEMETRY_RETENTION_DAYS": 5.0,
        "TELEMETRY_DOWNSAMPLE_DAYS": 0.0,
    }
    seed("d1", "temp", hour_ago(7), hours=1)
    seed("d1", "temp", hour_ago(3), hours=1)
    out = prune()
    assert "(5 days)" in out and "deleted 6 readings" in out, out
    assert Reading.objects.count() == 6
