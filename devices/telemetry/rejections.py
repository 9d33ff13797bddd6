"""Per-device rejection records: what the gateway refused of each device, stored in batches.

Every convention's rejection boundary (docs/interface.md §3.1 table of reasons) counts the
message in ``gateway_messages_rejected_total{reason}`` and, when the device id is valid, hands it
to the pipeline (`TelemetryPipeline.submit_rejection`). Here the rejections of one batch window
are coalesced per device (count, newest time, its reason and description) and written by the
telemetry writer's thread with one ``UPDATE`` per device in one prepared ``executemany``: no
database round trip per message, whatever the rate.

Only devices already in the registry get a record: the ``UPDATE`` never creates a row, so a
publisher sending garbage under made-up ids adds nothing to the database (those rejections are
counted in ``gateway_rejections_unrecorded_total{reason="unknown_device"}``). Several bridges
may record the same device: counts add up in the database and the newest rejection's reason
wins, whichever batch commits last. What was stored goes to dashboards as a ``rejection``
frame (docs/interface.md §6.2) after the commit, so a view refreshed by it reads the record.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connections, router, transaction

from devices.models import REJECTION_CHARS, Device
from devices.telemetry.batching import is_transient
from gateway.metrics import REJECTIONS_UNRECORDED

logger = logging.getLogger("devices.telemetry.pipeline")  # logs as the pipeline

#: Devices with rejections waiting for the next write, at most; a rejection of one more device
#: is dropped and counted (``…unrecorded_total{reason="pending_full"}``). New device ids are
#: admitted at ``GATEWAY_NEW_DEVICES_PER_SECOND`` (50/s), so only a fleet this large rejecting
#: at once, or a database away for a while, reaches it; about 0.5 KB per device.
PENDING_DEVICES = 10_000
REASON_CHARS = 32
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(slots=True)
class Rejection:
    """A device's rejections in one batch: how many, and the newest one's time and reason."""

    count: int
    at: float
    reason: str
    detail: str


#: What a write stored: ``(device_id, rejected total, last_rejected_at, reason, detail)``.
Stored = tuple[str, int, float, str, str]


def describe(text: str) -> str:
    """A rejection's description as stored: control characters replaced, at most 200 chars."""
    return _CONTROL.sub("\ufffd", text)[:REJECTION_CHARS]


def _update_sql(quote: Callable[[str], str]) -> str:
    table = quote(Device._meta.db_table)
    at, reason, detail = (
        quote("last_rejected_at"),
        quote("last_rejection_reason"),
        quote("last_rejection"),
    )
    count = quote("rejected")
    # Every SET reads the row as it was: the newest rejection wins, whichever batch (bridge)
    # commits last.
    newer = f"({at} IS NULL OR {at} <= %s)"
    return (
        f"UPDATE {table} SET {count} = {count} + %s, "
        f"{reason} = CASE WHEN {newer} THEN %s ELSE {reason} END, "
        f"{detail} = CASE WHEN {newer} THEN %s ELSE {detail} END, "
        f"{at} = CASE WHEN {newer} THEN %s ELSE {at} END "
        f"WHERE {quote('id')} = %s"
    )


def write_rejections(batch: Mapping[str, Rejection]) -> list[Stored]:
    """Add `batch` to its devices' records in one transaction; returns the records now stored
    for the devices that exist (sync: runs in the telemetry writer's thread)."""
    if not batch:
        return []
    using = router.db_for_write(Device)
    connection = connections[using]
    adapt = connection.ops.adapt_datetimefield_value
    params = []
    for device_id, r in batch.items():
        when = adapt(datetime.fromtimestamp(r.at, UTC))
        detail = describe(r.detail)
        params.append((r.count, when, r.reason, when, detail, when, when, device_id))
    ids = sorted(batch)
    chunk = connection.features.max_query_params or 5000
    fields = ("id", "rejected", "last_rejected_at", "last_rejection_reason", "last_rejection")
    stored: list[Stored] = []
    with transaction.atomic(using=using):
        with connection.cursor() as cursor:
            cursor.executemany(_update_sql(connection.ops.quote_name), params)
        devices = Device.objects.using(using)
        for start in range(0, len(ids), chunk):
            rows = devices.filter(id__in=ids[start : start + chunk]).values_list(*fields)
            stored += [(i, n, at.timestamp(), r, d) for i, n, at, r, d in rows if at is not None]
    return stored


class RejectionRecorder:
    """Rejections per device since the last write; `run()` writes them in batches."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        run_in_writer: Callable[..., Awaitable[Any]],
        *,
        delay: Callable[[], float],
        stored: Callable[[list[Stored]], None],
        notify: Callable[[], None],
        log_db: Callable[..., None],
    ) -> None:
        self.loop = loop
        self._delay = delay  # the writer's batch delay (tests change it)
        self._run_in_writer = run_in_writer
        self._stored = stored  # told what each write stored (the dashboards' frames)
        self._notify = notify  # progress for the pipeline's flush()
        self._log_db = log_db
        self._pending: dict[str, Rejection] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.wake = asyncio.Event()
        # Progress: rejections added, and written (or dropped and counted).
        self.seq = self.done = 0

    def add(self, device_id: str, reason: str, detail: str, at: float) -> None:
        """Note one rejected message of `device_id` (sync, O(1)); written with the next batch."""
        detail = detail[:REJECTION_CHARS]  # cleaned once per device and batch, when written
        pending = self._pending.get(device_id)
        if pending is None:
            if len(self._pending) >= PENDING_DEVICES:
                REJECTIONS_UNRECORDED.labels(reason="pending_full").inc()
                return
            self._pending[device_id] = Rejection(1, at, reason[:REASON_CHARS], detail)
        else:
            pending.count += 1
            if at >= pending.at:
                pending.at, pending.reason, pending.detail = at, reason[:REASON_CHARS], detail
        self.seq += 1
        if self._timer is None and not self.wake.is_set():
            self._timer = self.loop.call_later(self._delay(), self.wake.set)

    async def run(self) -> None:
        """The recorder task: one write per wake-up, retried with backoff while the DB is away."""
        backoff = BACKOFF_FIRST
        while True:
            await self._woken()
            batch, self._pending, seq = self._pending, {}, self.seq
            stored: list[Stored] = []
            if batch:
                try:
                    stored = await self._run_in_writer(write_rejections, batch)
                except asyncio.CancelledError:
                    self._restore(batch)
                    raise
                except Exception as exc:
                    if is_transient(exc):
                        self._restore(batch)
                        self._log_db(
                            logging.ERROR,
                            "writing the rejections of %d devices failed (%r); retry in %.1fs",
                            len(batch),
                            exc,
                            backoff,
                        )
                        await self._close_connection()  # the retry reconnects
                        self._notify()
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        self.wake.set()
                        continue
                    logger.error("rejection records refused by the database (%r), dropped", exc)
                    REJECTIONS_UNRECORDED.labels(reason="db_refused").inc(
                        sum(r.count for r in batch.values())
                    )
                else:
                    known = {s[0] for s in stored}
                    unknown = sum(r.count for d, r in batch.items() if d not in known)
                    if unknown:
                        REJECTIONS_UNRECORDED.labels(reason="unknown_device").inc(unknown)
                backoff = BACKOFF_FIRST
            if stored:
                self._stored(stored)
            self.done = seq
            self._notify()

    async def _close_connection(self) -> None:
        try:
            await self._run_in_writer(connections.close_all)
        except Exception:
            logger.debug("rejection recorder: closing its connection failed", exc_info=True)

    async def _woken(self) -> None:
        """Wait for the batch delay's timer or a flush; the timer is re-armed by the next add."""
        await self.wake.wait()
        self.wake.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None

    def _restore(self, batch: dict[str, Rejection]) -> None:
        """Put a batch that was not written back under what arrived meanwhile."""
        for device_id, newer in self._pending.items():
            older = batch.get(device_id)
            if older is None:
                batch[device_id] = newer
            else:
                older.count += newer.count
                if newer.at >= older.at:
                    older.at, older.reason, older.detail = newer.at, newer.reason, newer.detail
        self._pending = batch

    def close(self) -> None:
        """After the task stopped: count what stays unwritten."""
        if self._timer is not None:
            self._timer.cancel()
        lost = sum(r.count for r in self._pending.values())
        if lost:
            REJECTIONS_UNRECORDED.labels(reason="shutdown").inc(lost)
