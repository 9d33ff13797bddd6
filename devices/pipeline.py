"""The telemetry pipeline: batched database writes and batched dashboard fan-out.

One `TelemetryPipeline` per event loop (`get_pipeline()`). Consumers call the sync, O(1)
`submit_*` methods; two background tasks do the slow parts:

- the writer stores readings in one transaction per batch, at most ``TELEMETRY_BATCH_DELAY``
  after the first pending value or as soon as ``TELEMETRY_BATCH_SIZE`` values wait, with one
  thread hop per batch. It runs in its own thread rather than Channels' shared
  ``database_sync_to_async`` thread, so a 20-80 ms batch never queues the sync views and the
  command service behind it; that thread keeps its database connection between batches and
  closes it after a failure, so the retry reconnects.
  Waiting values are bounded by ``TELEMETRY_BUFFER_LIMIT``; past it the oldest are dropped
  and counted (``gateway_telemetry_dropped_total{reason="buffer_full"}``).
  A failed write keeps its batch and retries with backoff (0.1 s doubling to 5 s).
- a submission may carry a `durable` callback (an MQTT QoS 1 message's acknowledgement): it is
  called once the submission is committed (or dropped and counted: refused by the database,
  buffer full), never before; it is not called if the process stops first, so the broker
  redelivers. While such callbacks wait, the writer does not wait the batch delay: it writes
  what accumulated during the previous write (group commit), so acknowledgements follow
  commits closely and the broker's in-flight window (Receive Maximum) keeps flowing.
- the fan-out sends every frame produced since its last send in ONE
  ``group_send("dashboard", {"type": "dashboard.events", "events": [...]})``; the first frame
  wakes it on the next loop turn, frames arriving during a send go in the next one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, connections

from devices.store import DeviceUpdate, Row, salvage_batch, write_batch
from gateway.metrics import DASHBOARD_EVENTS_DROPPED, TELEMETRY_DROPPED, TELEMETRY_STORED

logger = logging.getLogger(__name__)

DASHBOARD_GROUP = "dashboard"
#: Group told when this process first sees a device or a new metric of it (never per reading):
#: ``{"type": "device.metrics", "devices": [{"device", "transport", "source", "metrics":
#: {name: "number" | "bool"}}]}``; Home Assistant discovery (devices/homeassistant.py) listens.
DEVICE_METRICS_GROUP = "device-metrics"
#: Devices whose announced metric names are remembered; past it the memory starts over (a few
#: announcements repeat; listeners ignore what they already know).
ANNOUNCED_LIMIT = 100_000
SEND_TIMEOUT = 5.0  # a group_send stuck longer than this is abandoned (frames counted)
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0

Metrics = Mapping[str, float | bool]
#: Called (and awaited if it returns an awaitable) once a submission is safely stored.
Durable = Callable[[], Awaitable[None] | None]
T = TypeVar("T")


class _RateLimitedLog:
    """Log at most once per `interval` seconds, reporting how many were suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} similar messages suppressed)"
        self._suppressed, self._next = 0, now + self.interval
        logger.log(level, msg, *args, exc_info=exc_info)


class TelemetryPipeline:
    """Batches readings to the database and frames to dashboards, for one event loop."""

    def __init__(
        self,
        *,
        batch_size: int | None = None,
        batch_delay: float | None = None,
        buffer_limit: int | None = None,
        group: str = DASHBOARD_GROUP,
    ) -> None:
        cfg = settings.GATEWAY
        self.loop = asyncio.get_running_loop()
        self.batch_size = max(1, batch_size or cfg["TELEMETRY_BATCH_SIZE"])
        self.batch_delay = cfg["TELEMETRY_BATCH_DELAY"] if batch_delay is None else batch_delay
        self.buffer_limit = max(1, buffer_limit or cfg["TELEMETRY_BUFFER_LIMIT"])
        self.group = group
        self.closed = False
        self.channel_layer = get_channel_layer()
        # Writer state: FIFO rows, pending device updates, the batch being written.
        self._rows: deque[Row] = deque()
        self._devices: dict[str, DeviceUpdate] = {}
        self._inflight: dict[str, DeviceUpdate] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        # Progress counters, so flush() waits for exactly what was submitted before it.
        self._rows_added = self._rows_done = 0
        self._dev_seq = self._dev_done = 0
        self._fan_seq = self._fan_done = 0
        self._progress = asyncio.Event()
        # (rows mark, device mark, callback): submissions waiting for their commit, in order.
        self._durable: deque[tuple[int, int, Durable]] = deque()
        # Fan-out state: frames of the next group_send; each device's last frame in it.
        self._frames: list[dict[str, Any]] = []
        self._last_frame: dict[str, dict[str, Any]] = {}
        self._fan_wake = asyncio.Event()
        # device_id → online, as this process last saw it (unknown until then).
        self._online: dict[str, bool] = {}
        # Announcements (DEVICE_METRICS_GROUP): metric names told per device, everything
        # told by (device, source), and what waits for the fan-out task.
        self._announced: dict[str, set[str]] = {}
        self._told: dict[tuple[str, str], dict[str, Any]] = {}
        self._announce: dict[tuple[str, str], dict[str, Any]] = {}
        self._tasks: list[asyncio.Task] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="telemetry-writer")
        self._log_drop = _RateLimitedLog()
        self._log_db = _RateLimitedLog()
        self.failures = 0  # failed batch writes since start (for health checks)

    # -- submitting (sync, O(1), never raises) ---------------------------------------------

    def submit_reading(
        self,
        device_id: str,
        transport: str,
        ts: float,
        metrics: Metrics,
        source: str = "",
        durable: Durable | None = None,
    ) -> None:
        """Queue one telemetry message: its values for storage, a frame for dashboards.

        `source` names where it came from (the topic pattern, e.g. ``devices/{device_id}/
        telemetry``); it only travels with the announcement of a new device or metric.
        """
        try:
            if self._refuse(len(metrics)):
                return
            known = self._announced.get(device_id)
            if known is None or not known.issuperset(metrics):
                self._announce_metrics(device_id, transport, metrics, source)
            new_rows = [(device_id, name, ts, float(value)) for name, value in metrics.items()]
            now = time.time()
            update = self._devices.get(device_id)
            if update is None:
                self._devices[device_id] = DeviceUpdate(transport, True, now, dict(metrics), now)
            else:
                update.online, update.last_seen, update.at = True, now, now
                update.metrics.update(metrics)
            self._dev_seq += 1
            rows = self._rows
            rows.extend(new_rows)
            self._rows_added += len(new_rows)
            if len(rows) > self.buffer_limit:
                self._drop_oldest(len(rows) - self.buffer_limit)
            if durable is not None:
                self._durable.append((self._rows_added, self._dev_seq, durable))
            self._schedule_write(len(rows) >= self.batch_size or durable is not None)
            if self._online.get(device_id) is not True:
                self._online[device_id] = True
                self._add_frame(
                    device_id, {"type": "status", "device": device_id, "online": True, "ts": now}
                )
            last = self._last_frame.get(device_id)
            if last is not None and last["type"] == "telemetry":
                last["metrics"].update(metrics)  # coalesce: same device, nothing in between
                if ts > last["ts"]:
                    last["ts"] = ts
                self._fan_seq += 1
            else:
                frame = {
                    "type": "telemetry",
                    "device": device_id,
                    "ts": ts,
                    "metrics": dict(metrics),
                }
                self._add_frame(device_id, frame)
        except Exception:  # a caller's bad metrics (or a bug) must not take the consumer down
            logger.exception("telemetry pipeline: submit_reading(%r) failed", device_id)
            self._release_soon(durable)

    def submit_status(
        self,
        device_id: str,
        transport: str,
        online: bool,
        ts: float,
        source: str = "",
        durable: Durable | None = None,
    ) -> None:
        """Record a device's online/offline status: stored and pushed to dashboards."""
        try:
            if self._refuse(0):
                return
            if device_id not in self._announced:
                self._announce_metrics(device_id, transport, {}, source)
            # "online" is news from the device; "offline" is usually its Last Will, sent by
            # the broker, so it does not move last_seen.
            seen = time.time() if online else None
            update = DeviceUpdate(transport, online, seen)
            pending = self._devices.get(device_id)
            if pending is None:
                self._devices[device_id] = update
            else:
                pending.absorb(update)
            self._dev_seq += 1
            if durable is not None:
                self._durable.append((self._rows_added, self._dev_seq, durable))
            self._schedule_write(durable is not None)
            self._online[device_id] = online
            frame = {"type": "status", "device": device_id, "online": online, "ts": ts}
            self._add_frame(device_id, frame)
        except Exception:  # pragma: no cover
            logger.exception("telemetry pipeline: submit_status(%r) failed", device_id)
            self._release_soon(durable)

    def _release_soon(self, durable: Durable | None) -> None:
        """A submission that failed (a bug, logged): acknowledge it with the next write."""
        if durable is not None:
            self._durable.append((self._rows_added, self._dev_seq, durable))
            self._wake.set()

    def _announce_metrics(
        self, device_id: str, transport: str, metrics: Metrics, source: str
    ) -> None:
        """Queue the news of a device first seen, or of its new metrics, for the fan-out."""
        known = self._announced.get(device_id)
        if known is None:
            if len(self._announced) >= ANNOUNCED_LIMIT:
                self._announced.clear()
                self._told.clear()
            known = self._announced[device_id] = set()
        known.update(metrics)
        kinds = {n: "bool" if v is True or v is False else "number" for n, v in metrics.items()}
        key = (device_id, source)
        for table in (self._told, self._announce):
            entry = table.get(key)
            if entry is None:
                entry = table[key] = {
                    "device": device_id,
                    "transport": transport,
                    "source": source,
                    "metrics": {},
                }
            entry["metrics"].update(kinds)
        self._fan_seq += 1
        self._fan_wake.set()

    def _refuse(self, values: int) -> bool:
        if not self.closed:
            if not self._tasks:
                self._start()
            return False
        TELEMETRY_DROPPED.labels(reason="shutdown").inc(values)
        self._log_drop(logging.WARNING, "telemetry pipeline closed: dropping a submission")
        return True

    def _start(self) -> None:
        self._tasks = [
            self.loop.create_task(self._write_loop(), name="telemetry-pipeline.writer"),
            self.loop.create_task(self._fanout_loop(), name="telemetry-pipeline.fanout"),
        ]

    def _drop_oldest(self, count: int) -> None:
        for _ in range(count):
            self._rows.popleft()
        self._rows_done += count
        TELEMETRY_DROPPED.labels(reason="buffer_full").inc(count)
        self._log_drop(
            logging.WARNING,
            "telemetry buffer full (%d values): dropped the %d oldest",
            self.buffer_limit,
            count,
        )

    def _schedule_write(self, now: bool) -> None:
        if now:
            self._wake.set()
        elif self._timer is None and not self._wake.is_set():
            self._timer = self.loop.call_later(self.batch_delay, self._wake.set)

    def _add_frame(self, device_id: str, frame: dict[str, Any]) -> None:
        self._frames.append(frame)
        self._last_frame[device_id] = frame
        self._fan_seq += 1
        self._fan_wake.set()

    # -- background tasks ------------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._rows and not self._devices:
                await self._release_durable()
                self._notify()
                continue
            count = min(len(self._rows), self.batch_size)
            rows = [self._rows.popleft() for _ in range(count)]
            updates, self._devices = self._devices, {}
            self._inflight, dev_seq = updates, self._dev_seq
            if self._rows:
                self._wake.set()  # more than a batch was waiting: go again right away
            try:
                stored = await self.run_in_writer(write_batch, rows, updates)
            except asyncio.CancelledError:
                self._inflight = {}
                self._restore(rows, updates)  # close() counts what stays unwritten
                raise
            except Exception as exc:
                if not _transient(exc):
                    # The data itself is refused: retrying would block every later batch.
                    stored = await self._salvage(rows, updates, exc)
                else:
                    self._inflight = {}
                    self._restore(rows, updates)
                    await self._after_failure(exc, len(rows), backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    self._wake.set()
                    continue
            self._inflight = {}
            if backoff > BACKOFF_FIRST:
                logger.info("telemetry writes recovered")
                backoff = BACKOFF_FIRST
            TELEMETRY_STORED.inc(stored)
            self._rows_done += len(rows)
            self._dev_done = dev_seq
            await self._release_durable()
            self._notify()

    async def _release_durable(self) -> None:
        """Call the `durable` callbacks of what is now committed (or dropped and counted)."""
        waiters = self._durable
        while waiters and waiters[0][0] <= self._rows_done and waiters[0][1] <= self._dev_done:
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
        try:
            await self.run_in_writer(connections.close_all)
        except Exception:
            logger.debug("telemetry writer: closing its connection failed", exc_info=True)
        self._notify()
        await asyncio.sleep(backoff)

    async def _salvage(
        self, rows: list[Row], updates: dict[str, DeviceUpdate], exc: Exception
    ) -> int:
        logger.error("telemetry batch refused (%r), writing it row by row", exc)
        try:
            stored, refused = await self.run_in_writer(salvage_batch, rows, updates)
        except Exception:
            logger.exception("telemetry salvage failed; dropping %d values", len(rows))
            stored, refused = 0, len(rows)
        if refused:
            TELEMETRY_DROPPED.labels(reason="db_refused").inc(refused)
        return stored

    def _restore(self, rows: list[Row], updates: dict[str, DeviceUpdate]) -> None:
        """Put a failed batch back in front of what arrived meanwhile, within the bound."""
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

    async def _fanout_loop(self) -> None:
        while True:
            await self._fan_wake.wait()
            self._fan_wake.clear()
            frames, self._frames, self._last_frame = self._frames, [], {}
            seq = self._fan_seq
            if self._announce:
                await self._send_announcements()
            if frames and self.channel_layer is not None:
                message = {"type": "dashboard.events", "events": frames}
                try:
                    async with asyncio.timeout(SEND_TIMEOUT):
                        await self.channel_layer.group_send(self.group, message)
                except Exception as exc:
                    reason = "timeout" if isinstance(exc, TimeoutError) else "layer_error"
                    DASHBOARD_EVENTS_DROPPED.labels(reason=reason).inc(len(frames))
                    self._log_drop(
                        logging.WARNING,
                        "dashboard fan-out of %d frames failed: %r",
                        len(frames),
                        exc,
                    )
            self._fan_done = seq
            self._notify()

    async def _send_announcements(self) -> None:
        entries, self._announce = list(self._announce.values()), {}
        if self.channel_layer is None:
            return
        message = {"type": "device.metrics", "devices": entries}
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self.channel_layer.group_send(DEVICE_METRICS_GROUP, message)
        except Exception as exc:
            self._log_drop(logging.WARNING, "device-metrics announcement failed: %r", exc)

    async def run_in_writer(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` in the writer's thread (its database connection); tests use it."""
        return await self.loop.run_in_executor(self._executor, functools.partial(func, *args))

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # -- control ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write and fan out everything submitted before this call (retrying a failing DB)."""
        rows, dev, fan = self._rows_added, self._dev_seq, self._fan_seq
        while self._rows_done < rows or self._dev_done < dev or self._fan_done < fan:
            if not self._tasks or any(t.done() for t in self._tasks):
                break  # never started, or closed
            progress = self._progress
            self._wake.set()
            self._fan_wake.set()
            await progress.wait()

    async def close(self, grace: float = 10.0) -> None:
        """Flush (for at most `grace` seconds), then stop the background tasks."""
        if self.closed:
            return
        try:
            async with asyncio.timeout(grace):
                await self.flush()
        except TimeoutError:
            pass
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._timer is not None:
            self._timer.cancel()
        try:
            await self.run_in_writer(connections.close_all)
        except Exception:
            logger.debug("telemetry writer: closing its connection failed", exc_info=True)
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
        if _pipelines.get(self.loop) is self:
            del _pipelines[self.loop]

    def announcements(self) -> list[dict[str, Any]]:
        """Everything this process announced so far (a listener that joined late catches up)."""
        return [{**entry, "metrics": dict(entry["metrics"])} for entry in self._told.values()]

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


_pipelines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TelemetryPipeline] = (
    weakref.WeakKeyDictionary()
)


def _transient(exc: BaseException) -> bool:
    """A database that is down, locked or mid-migration: keep the batch and retry. Anything
    else (integrity, data, a value the driver cannot take) would fail forever."""
    return isinstance(exc, DatabaseError) and not isinstance(exc, IntegrityError | DataError)


_last: TelemetryPipeline | None = None  # the last one returned: called once per message


def get_pipeline() -> TelemetryPipeline:
    """The pipeline of the running event loop, created on first use (one per loop)."""
    global _last
    loop = asyncio.get_running_loop()
    pipeline = _last
    if pipeline is not None and pipeline.loop is loop and not pipeline.closed:
        return pipeline  # no WeakKeyDictionary lookup (a weakref per call: 2 % of ingest)
    pipeline = _pipelines.get(loop)
    if pipeline is None or pipeline.closed:
        pipeline = _pipelines[loop] = TelemetryPipeline()
    _last = pipeline
    return pipeline


def current_pipeline() -> TelemetryPipeline | None:
    """The running loop's pipeline if one exists (never creates one; None outside a loop)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return _pipelines.get(loop)


async def flush_if_pending(device_id: str) -> bool:
    """Write what this loop's pipeline holds if any of it is `device_id`'s; True if it did.

    For readers that must see a reading received a moment ago (history, commands to a device
    heard for the first time), instead of up to one batch delay late.
    """
    pipeline = current_pipeline()
    if pipeline is None or device_id not in pipeline.pending_devices():
        return False
    await pipeline.flush()
    return True


def merge_pending(
    devices: Iterable[dict[str, Any]], pending: Mapping[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Overlay `pending_devices()` on stored `Device.as_dict()`s; new devices appended, by id."""
    out = []
    seen = set()
    for stored in devices:
        overlay = pending.get(stored["id"])
        if overlay is not None:
            stored = _overlay(stored, overlay)
        seen.add(stored["id"])
        out.append(stored)
    for device_id, overlay in pending.items():
        if device_id not in seen:
            out.append(_overlay({"id": device_id, "name": device_id, "metrics": {}}, overlay))
    out.sort(key=lambda d: d["id"])
    return out


def _overlay(stored: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    last_seen = stored.get("last_seen")
    if overlay["last_seen"] is not None and (last_seen is None or overlay["last_seen"] > last_seen):
        last_seen = overlay["last_seen"]
    return {
        **stored,
        "online": overlay["online"],
        "last_seen": last_seen,
        "transport": stored.get("transport") or overlay["transport"],
        "metrics": {**(stored.get("metrics") or {}), **overlay["metrics"]},
    }


def snapshot_overlay(devices: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """`devices` with this loop's pending changes merged (API list, dashboard snapshot)."""
    pipeline = current_pipeline()
    pending = pipeline.pending_devices() if pipeline is not None else {}
    return merge_pending(devices, pending)
