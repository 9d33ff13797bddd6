"""The telemetry pipeline's database side: a bounded write buffer, batches, durable acks.

Readings and device updates wait here until the writer task stores them in one transaction per batch
(devices/telemetry/store.py), at most the batch delay after the first pending value or as soon as a
batch's worth waits, with one thread hop per batch. The writer runs in its own thread rather than
Channels' shared ``database_sync_to_async`` thread, so a 20-80 ms batch never queues the sync views
and the command service behind it; that thread keeps its database connection between batches and
closes it after a failure, so the retry reconnects.

- Bounded: past the buffer limit the oldest values are dropped and counted
  (``gateway_telemetry_dropped_total{reason="buffer_full"}``).
- A failed write keeps its batch and retries with backoff (0.1 s doubling to 5 s); a batch the
  database refuses (integrity, data) is salvaged row by row, since retrying would block
  every later batch.
- Durable acks: a submission may carry a `durable` callback (an MQTT QoS 1 message's
  acknowledgement), called once it is committed (or dropped and counted), never before; not
  called if the process stops first, so the broker redelivers. While such callbacks wait the
  writer does not wait the batch delay (group commit), so acknowledgements follow commits
  closely and the broker's in-flight window keeps flowing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import DatabaseError, DataError, IntegrityError, connections

from devices.telemetry.store import DeviceUpdate, Row, salvage_batch, write_batch
from gateway.metrics import TELEMETRY_DROPPED, TELEMETRY_DUPLICATES, TELEMETRY_STORED

# The pipeline's log, whichever of its rooms speaks (operators filter on it).
logger = logging.getLogger("devices.telemetry.pipeline")  # logs as the pipeline

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0

Metrics = Mapping[str, float | bool]
#: Called (and awaited if it returns an awaitable) once a submission is safely stored.
Durable = Callable[[], Awaitable[None] | None]
T = TypeVar("T")


class TelemetryWriter:
    """Pending rows and device updates, written in batches by `run()` in the writer thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        batch_size: int,
        batch_delay: float,
        buffer_limit: int,
        notify: Callable[[], None],
        log_drop: Callable[..., None],
        log_db: Callable[..., None],
    ) -> None:
        self.loop = loop
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self.buffer_limit = buffer_limit
        self._notify = notify  # progress for the pipeline's flush()
        self._log_drop = log_drop
        self._log_db = log_db
        # FIFO rows, pending device updates, the batch being written.
        self._rows: deque[Row] = deque()
        self._devices: dict[str, DeviceUpdate] = {}
        # Retained (replayed) state: latest values and last_seen, never `online`.
        self._quiet: dict[str, DeviceUpdate] = {}
        self._inflight: dict[str, DeviceUpdate] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.wake = asyncio.Event()
        # Progress counters (values, device updates): submitted and written (or dropped).
        self.rows_added = self.rows_done = 0
        self.dev_seq = self.dev_done = 0
        # (rows mark, device mark, callback): submissions waiting for their commit, in order.
        self._durable: deque[tuple[int, int, Durable]] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="telemetry-writer")
        self.failures = 0  # failed batch writes since start (for health checks)

    # -- buffering (sync, O(1)) ----------------------------------------------------------------

    def add_reading(
        self,
        device_id: str,
        transport: str,
        ts: float,
        metrics: Metrics,
        now: float,
        durable: Durable | None,
        presence: bool = True,
    ) -> None:
        """Buffer one message's values and its device's update (online, seen `now`).

        `presence` False (a retained message, replayed): the values are stored, and the
        device seen at `ts` at the latest, but its `online` is left as it is; `ts` None: no
        reading at all, the values only fill the device's latest ones it lacks.
        """
        if not presence:
            self._add_quiet(device_id, transport, ts, metrics, now, durable)
            return
        new_rows = [(device_id, name, ts, float(value)) for name, value in metrics.items()]
        update = self._devices.get(device_id)
        if update is None:
            self._devices[device_id] = DeviceUpdate(transport, True, now, dict(metrics), now)
        else:
            update.online, update.last_seen, update.at = True, now, now
            update.metrics.update(metrics)
        self.dev_seq += 1
        rows = self._rows
        rows.extend(new_rows)
        self.rows_added += len(new_rows)
        if len(rows) > self.buffer_limit:
            self._drop_oldest(len(rows) - self.buffer_limit)
        if durable is not None:
            self._durable.append((self.rows_added, self.dev_seq, durable))
        self._schedule_write(len(rows) >= self.batch_size or durable is not None)

    def _add_quiet(
        self,
        device_id: str,
        transport: str,
        ts: float | None,
        metrics: Metrics,
        now: float,
        durable: Durable | None,
    ) -> None:
        seen = None if ts is None else min(ts, now)
        update = DeviceUpdate(transport, False, seen, dict(metrics), now)
        pending = self._quiet.get(device_id)
        if pending is None:
            self._quiet[device_id] = update
        else:
            pending.absorb(update)
        self.dev_seq += 1
        if ts is not None:
            self._rows.extend((device_id, name, ts, float(v)) for name, v in metrics.items())
            self.rows_added += len(metrics)
            if len(self._rows) > self.buffer_limit:
                self._drop_oldest(len(self._rows) - self.buffer_limit)
        if durable is not None:
            self._durable.append((self.rows_added, self.dev_seq, durable))
        self._schedule_write(len(self._rows) >= self.batch_size or durable is not None)

    def add_status(
        self, device_id: str, transport: str, online: bool, durable: Durable | None
    ) -> None:
        """Buffer a device's online/offline update."""
        # "online" is news from the device; "offline" is usually its Last Will, sent by
        # the broker, so it does not move last_seen.
        seen = time.time() if online else None
        update = DeviceUpdate(transport, online, seen)
        pending = self._devices.get(device_id)
        if pending is None:
            self._devices[device_id] = update
        else:
            pending.absorb(update)
        self.dev_seq += 1
        if durable is not None:
            self._durable.append((self.rows_added, self.dev_seq, durable))
        self._schedule_write(durable is not None)

    def release_soon(self, durable: Durable | None) -> None:
        """A submission that failed (a bug, logged): acknowledge it with the next write."""
        if durable is not None:
            self._durable.append((self.rows_added, self.dev_seq, durable))
            self.wake.set()

    def _drop_oldest(self, count: int) -> None:
        for _ in range(count):
            self._rows.popleft()
        self.rows_done += count
        TELEMETRY_DROPPED.labels(reason="buffer_full").inc(count)
        self._log_drop(
            logging.WARNING,
            "telemetry buffer full (%d values): dropped the %d oldest",
            self.buffer_limit,
            count,
        )

    def _schedule_write(self, now: bool) -> None:
        if now:
            self.wake.set()
        elif self._timer is None and not self.wake.is_set():
            self._timer = self.loop.call_later(self.batch_delay, self.wake.set)

    # -- the writer task -----------------------------------------------------------------------

    async def run(self) -> None:
        """The writer task: one batch per wake-up, retried with backoff while the DB is away."""
        backoff = BACKOFF_FIRST
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._rows and not self._devices and not self._quiet:
                await self._release_durable()
                self._notify()
                continue
            count = min(len(self._rows), self.batch_size)
            rows = [self._rows.popleft() for _ in range(count)]
            updates, self._devices = self._devices, {}
            quiet, self._quiet = self._quiet, {}
            self._inflight, dev_seq = updates, self.dev_seq
            if self._rows:
                self.wake.set()  # more than a batch was waiting: go again right away
            try:
                stored = await self.run_in_writer(write_batch, rows, updates, quiet)
                TELEMETRY_DUPLICATES.inc(len(rows) - stored)
            except asyncio.CancelledError:
                self._inflight = {}
                self._restore(rows, updates, quiet)  # close() counts what stays unwritten
                raise
            except Exception as exc:
                if not is_transient(exc):
                    # The data itself is refused: retrying would block every later batch.
                    stored = await self._salvage(rows, updates, quiet, exc)
                else:
                    self._inflight = {}
                    self._restore(rows, updates, quiet)
                    await self._after_failure(exc, len(rows), backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    self.wake.set()
                    continue
            self._inflight = {}
            if backoff > BACKOFF_FIRST:
                logger.info("telemetry writes recovered")
                backoff = BACKOFF_FIRST
            TELEMETRY_STORED.inc(stored)
            self.rows_done += len(rows)
            self.dev_done = dev_seq
            await self._release_durable()
            self._notify()

    async def _release_durable(self) -> None:
        """Call the `durable` callbacks of what is now committed (or dropped and counted)."""
        waiters = self._durable
        while waiters and waiters[0][0] <= self.rows_done and waiters[0][1] <= self.dev_done:
            callback = waiters.popleft()[2]
            try:
                result = callback()
                if result is not None:
                    await result
            except Exception:
                logger.exception("telemetry pipeline: a durable callback failed")

    async def _after_failure(self, exc: Exception, count: int, backoff: float) -> None:
        """Log, drop the (possibly broken) connection, and wait `backoff` before the retry."""
        self.failures += 1
        self._log_db(
            logging.ERROR,
            "telemetry write of %d values failed (%s: %s); keeping them, retry in %.1fs",
            count,
            type(exc).__name__,
            exc,
            backoff,
        )
        await self._close_connection()
        self._notify()
        await asyncio.sleep(backoff)

    async def _salvage(
        self,
        rows: list[Row],
        updates: dict[str, DeviceUpdate],
        quiet: dict[str, DeviceUpdate],
        exc: Exception,
    ) -> int:
        logger.error("telemetry batch refused (%r), writing it row by row", exc)
        try:
            stored, refused = await self.run_in_writer(salvage_batch, rows, updates, quiet)
        except Exception:
            logger.exception("telemetry salvage failed; dropping %d values", len(rows))
            stored, refused = 0, len(rows)
        if refused:
            TELEMETRY_DROPPED.labels(reason="db_refused").inc(refused)
        TELEMETRY_DUPLICATES.inc(max(len(rows) - stored - refused, 0))
        return stored

    def _restore(
        self, rows: list[Row], updates: dict[str, DeviceUpdate], quiet: dict[str, DeviceUpdate]
    ) -> None:
        """Put a failed batch back in front of what arrived meanwhile, within the bound."""
        for device_id, newer in self._quiet.items():
            if device_id in quiet:
                quiet[device_id].absorb(newer)
            else:
                quiet[device_id] = newer
        self._quiet = quiet
        if rows:
            self._rows.extendleft(reversed(rows))
            if len(self._rows) > self.buffer_limit:
                self._drop_oldest(len(self._rows) - self.buffer_limit)
        for device_id, newer in self._devices.items():
            older = updates.get(device_id)
            if older is not None:
                older.absorb(newer)
            else:
                updates[device_id] = newer
        self._devices = updates

    async def run_in_writer(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` in the writer's thread (its database connection)."""
        return await self.loop.run_in_executor(self._executor, functools.partial(func, *args))

    async def _close_connection(self) -> None:
        try:
            await self.run_in_writer(connections.close_all)
        except Exception:
            logger.debug("telemetry writer: closing its connection failed", exc_info=True)

    # -- reading and closing -------------------------------------------------------------------

    def pending_devices(self) -> dict[str, dict[str, Any]]:
        """Devices with changes not yet in the database: ``{id: as_dict-like overlay}``."""
        out: dict[str, dict[str, Any]] = {}
        for source in (self._inflight, self._devices):
            for device_id, u in source.items():
                entry = out.get(device_id)
                if entry is None:
                    out[device_id] = {
                        "id": device_id,
                        "online": u.online,
                        "last_seen": u.last_seen,
                        "transport": u.transport,
                        "metrics": dict(u.metrics),
                    }
                else:
                    entry["online"] = u.online
                    if u.last_seen is not None and (
                        entry["last_seen"] is None or u.last_seen > entry["last_seen"]
                    ):
                        entry["last_seen"] = u.last_seen
                    entry["metrics"].update(u.metrics)
        return out

    async def close(self) -> None:
        """After the writer task stopped: release the thread, count what stays unwritten."""
        if self._timer is not None:
            self._timer.cancel()
        await self._close_connection()
        self._executor.shutdown(wait=False)
        if self._durable:
            logger.warning(
                "telemetry pipeline closed with %d submissions unacknowledged (redelivered)",
                len(self._durable),
            )
            self._durable.clear()
        lost = len(self._rows)
        if lost:
            TELEMETRY_DROPPED.labels(reason="shutdown").inc(lost)
            logger.error("telemetry pipeline closed with %d values unwritten", lost)


def is_transient(exc: BaseException) -> bool:
    """A database that is down, locked or mid-migration: keep the batch and retry. Anything
    else (integrity, data, a value the driver cannot take) would fail forever."""
    return isinstance(exc, DatabaseError) and not isinstance(exc, IntegrityError | DataError)
