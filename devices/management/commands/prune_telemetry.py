"""`manage.py prune_telemetry`: keep the readings table bounded (retention and hourly averages).

Raw readings older than the retention (``GATEWAY_TELEMETRY_RETENTION_DAYS``, default 30) are
rewritten as one reading per (device, metric, hour) holding the hour's average, in the same
table, so the history API keeps returning them; those older than
``GATEWAY_TELEMETRY_DOWNSAMPLE_DAYS`` (default 365; 0 = no averages, delete at the retention)
are deleted. It works series by series on the readings' key (device, metric, ts), in short
transactions of at most ``--batch-size`` readings, so the gateway's writer is never held up for
long, on SQLite and PostgreSQL alike. Running it again changes nothing (an hour that holds one
reading is left alone). Run it daily: deploy/systemd/gateway-prune.timer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.db.models import Avg, Count, QuerySet
from django.db.models.functions import TruncHour

from devices.models import Device, Reading
from devices.views import Epoch

HOUR = timedelta(hours=1)


@dataclass
class PruneReport:
    """What one run did (or, with dry_run, would do)."""

    deleted: int = 0  # readings older than the horizon, deleted
    rolled: int = 0  # raw readings replaced by hourly averages
    averages: int = 0  # hourly averages written (dry run: hours to roll up)
    series: int = 0  # (device, metric) pairs looked at
    devices: int = 0


def floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


class Pruner:
    """Deletes readings before `horizon` and rolls those in [horizon, cutoff) up by hour."""

    def __init__(
        self, cutoff: datetime, horizon: datetime, batch_size: int, dry_run: bool = False
    ) -> None:
        self.cutoff = cutoff
        self.horizon = horizon
        self.batch_size = batch_size
        self.dry_run = dry_run
        self.report = PruneReport()

    def run(self) -> PruneReport:
        """Every series of every device; deletes first, then the hourly roll-up."""
        for device_id in Device.objects.order_by("id").values_list("id", flat=True).iterator():
            self.report.devices += 1
            for metric in metrics_of(device_id):
                self.report.series += 1
                series = Reading.objects.filter(device_id=device_id, metric=metric)
                self.delete_old(series)
                if self.horizon < self.cutoff:
                    self.roll_up(series, device_id, metric)
        return self.report

    def delete_old(self, series: QuerySet) -> None:
        """Readings before the horizon, oldest first, `batch_size` per statement."""
        old = series.filter(ts__lt=self.horizon)
        if self.dry_run:
            self.report.deleted += old.count()
            return
        while True:
            # ts is unique within the series: the batch is every reading up to its last ts.
            nth = old.order_by("ts").values_list("ts", flat=True)
            last = next(iter(nth[self.batch_size - 1 : self.batch_size]), None)
            batch = old if last is None else old.filter(ts__lte=last)
            deleted, _ = batch.delete()
            self.report.deleted += deleted
            if last is None:
                return

    def roll_up(self, series: QuerySet, device_id: str, metric: str) -> None:
        """Hours in [horizon, cutoff) that hold more than one reading become their average."""
        window = series.filter(ts__gte=self.horizon, ts__lt=self.cutoff)
        hours = (
            window.annotate(hour=hour_of("ts"))
            .values("hour")
            .annotate(n=Count("*"))
            .filter(n__gt=1)
            .order_by("hour")
            .values_list("hour", "n")
        )
        chunk: list[datetime] = []
        rows = 0
        for hour, count in hours.iterator():
            if self.dry_run:
                self.report.rolled += count
                self.report.averages += 1
                continue
            chunk.append(hour)
            rows += count
            if rows >= self.batch_size:
                self.rewrite(series, device_id, metric, chunk[0], chunk[-1])
                chunk, rows = [], 0
        if chunk:
            self.rewrite(series, device_id, metric, chunk[0], chunk[-1])

    def rewrite(self, series: QuerySet, device_id: str, metric: str, first, last) -> None:
        """Replace every reading of hours first..last by one average per hour (one transaction)."""
        start = max(first, self.horizon)
        end = min(last + HOUR, self.cutoff)
        with transaction.atomic():
            span = series.filter(ts__gte=start, ts__lt=end)
            groups = list(
                span.annotate(hour=hour_of("ts"))
                .values("hour")
                .annotate(n=Count("*"), t=Avg(Epoch("ts")), v=Avg("value"))
                .values_list("n", "t", "v")
            )
            deleted, _ = span.delete()
            averages = [
                Reading(device_id=device_id, metric=metric, ts=clamp(t, start, end), value=v)
                for _, t, v in groups
            ]
            Reading.objects.bulk_create(averages, batch_size=500)
        self.report.rolled += deleted
        self.report.averages += len(averages)


def metrics_of(device_id: str) -> Iterator[str]:
    """The device's distinct metrics, one index seek each (a loose index scan)."""
    last: str | None = None
    while True:
        qs = Reading.objects.filter(device_id=device_id)
        if last is not None:
            qs = qs.filter(metric__gt=last)
        metric = qs.order_by("metric").values_list("metric", flat=True).first()
        if metric is None:
            return
        yield metric
        last = metric


def hour_of(field: str) -> TruncHour:
    """The reading's hour, exact on both backends (not a float epoch: 11:00 stays in 11:00)."""
    return TruncHour(field, tzinfo=UTC)


def epoch_dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def clamp(epoch: float, start: datetime, end: datetime) -> datetime:
    """The average's time, kept inside its range (SQLite's julianday epoch is approximate)."""
    moment = epoch_dt(epoch)
    return min(max(moment, start), end - timedelta(microseconds=1))


class Command(BaseCommand):
    help = "Roll readings older than the retention up into hourly averages; delete older ones."

    def add_arguments(self, parser: CommandParser) -> None:
        gateway = settings.GATEWAY
        parser.add_argument(
            "--retention-days",
            type=float,
            default=gateway["TELEMETRY_RETENTION_DAYS"],
            help="keep raw readings this long (default GATEWAY_TELEMETRY_RETENTION_DAYS, "
            "%(default)s; 0 = forever, nothing is pruned)",
        )
        parser.add_argument(
            "--downsample-days",
            type=float,
            default=gateway["TELEMETRY_DOWNSAMPLE_DAYS"],
            help="keep hourly averages this long (default GATEWAY_TELEMETRY_DOWNSAMPLE_DAYS, "
            "%(default)s; 0 = no averages, delete at the retention)",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=10_000,
            help="readings per transaction (default %(default)s)",
        )
        parser.add_argument("--dry-run", action="store_true", help="count, change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        retention, downsample = options["retention_days"], options["downsample_days"]
        if retention < 0 or downsample < 0 or options["batch_size"] < 1:
            raise CommandError("retention, downsample days must be ≥ 0 and batch size ≥ 1")
        if retention == 0:
            self.stdout.write("prune_telemetry: retention is 0 (keep forever): nothing to do")
            return
        if downsample and downsample <= retention:
            raise CommandError(
                f"--downsample-days ({downsample:g}) must be longer than --retention-days "
                f"({retention:g}), or 0 for no hourly averages"
            )
        now = datetime.now(UTC)
        cutoff = floor_hour(now - timedelta(days=retention))
        horizon = floor_hour(now - timedelta(days=downsample)) if downsample else cutoff
        began = time.monotonic()
        pruner = Pruner(cutoff, horizon, options["batch_size"], options["dry_run"])
        report = pruner.run()
        vacuumed = False
        if report.deleted + report.rolled and connection.vendor == "postgresql":
            # Now, not whenever autovacuum comes: the dead rows would slow every series scan
            # (the next run's took 30 s instead of 1 s at 10M rows) and index-only scans need
            # the visibility map this sets.
            with connection.cursor() as cursor:
                cursor.execute(f"VACUUM (ANALYZE) {Reading._meta.db_table}")
            vacuumed = True
        verb = ("would delete", "would roll") if options["dry_run"] else ("deleted", "rolled")
        lines = [
            f"prune_telemetry{' (dry run, nothing changed)' if options['dry_run'] else ''}: "
            f"raw readings kept after {cutoff:%Y-%m-%d %H:%M} UTC ({retention:g} days)"
            + (f", hourly averages after {horizon:%Y-%m-%d %H:%M} UTC" if downsample else ""),
            f"  {verb[0]} {report.deleted:,} readings older than {horizon:%Y-%m-%d %H:%M} UTC",
        ]
        if downsample:
            lines.append(
                f"  {verb[1]} {report.rolled:,} readings into {report.averages:,} hourly averages"
            )
        lines.append(
            f"  {report.series:,} series on {report.devices:,} devices in "
            f"{time.monotonic() - began:.1f} s{' (then VACUUM ANALYZE)' if vacuumed else ''}"
        )
        self.stdout.write("\n".join(lines))
