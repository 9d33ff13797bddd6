"""The telemetry pipeline: one per event loop, the front door to batched writes and fan-out.

One `TelemetryPipeline` per event loop (`get_pipeline()`). Consumers call the sync, O(1)
`submit_*` methods; the pipeline hands each submission to its rooms and runs their three
background tasks:

- the writer (`batching.TelemetryWriter`) stores readings in one transaction per batch, at
  most ``TELEMETRY_BATCH_DELAY`` after the first pending value or as soon as
  ``TELEMETRY_BATCH_SIZE`` values wait, in its own thread; waiting values are bounded by
  ``TELEMETRY_BUFFER_LIMIT`` (oldest dropped and counted); failed writes retry with backoff; a
  submission's `durable` callback (an MQTT QoS 1 acknowledgement) is called once it is
  committed, with group commit while such callbacks wait.
- the fan-out (`fanout.DashboardFanout`) sends every frame produced since its last send in ONE
  ``group_send("dashboard", {"type": "dashboard.events", "events": [...]})``.
- rejected messages (`rejections.RejectionRecorder`) add up per device and are stored in
  batches by the writer's thread, for devices in the registry only; what was stored goes to
  dashboards as a ``rejection`` frame.
- news of a device first seen or a new metric of it (`announce.MetricAnnouncer`) goes to group
  ``device-metrics`` with the fan-out, never per reading.

This module keeps the pipeline's lifecycle (start on first submission, `flush()`, `close()`)
and one pipeline per loop; `overlay.merge_pending` lays not-yet-stored device changes over
stored ones (API list, dashboard snapshot). The rooms' own names (`Metrics`,
`DEVICE_METRICS_GROUP`, …) are imported from the room that defines them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from channels.layers import get_channel_layer
from django.conf import settings

from devices.telemetry.announce import MetricAnnouncer
from devices.telemetry.batching import Durable, Metrics, TelemetryWriter
from devices.telemetry.fanout import DashboardFanout
from devices.telemetry.overlay import merge_pending
from devices.telemetry.rejections import RejectionRecorder, Stored
from gateway.loops import PerLoop
from gateway.metrics import MESSAGES_REJECTED, REJECTIONS_UNRECORDED, TELEMETRY_DROPPED

__all__ = [
    "DASHBOARD_GROUP",
    "TelemetryPipeline",
    "add_observer",
    "current_pipeline",
    "flush_if_pending",
    "get_pipeline",
    "merge_pending",
    "snapshot_overlay",
]

logger = logging.getLogger(__name__)

DASHBOARD_GROUP = "dashboard"
T = TypeVar("T")

#: Sync callables told of every admitted reading ``(device_id, ts, metrics)`` and status
#: ``(device_id, online, ts)``, e.g. the alert evaluator; each must be O(1) and never block.
_reading_observers: list[Callable[[str, float, Metrics], None]] = []
_status_observers: list[Callable[[str, bool, float], None]] = []


def add_observer(
    reading: Callable[[str, float, Metrics], None], status: Callable[[str, bool, float], None]
) -> None:
    """Register a pair of observers (once per process, e.g. from an AppConfig.ready())."""
    if reading not in _reading_observers:
        _reading_observers.append(reading)
        _status_observers.append(status)


def _observe(observers: list[Callable[..., None]], *args: Any) -> None:
    for observe in observers:
        try:
            observe(*args)
        except Exception:  # an observer's bug must not cost the reading
            logger.exception("telemetry observer %r failed", observe)


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


def _forward(room: str, name: str, doc: str) -> property:
    """An attribute of the pipeline that is `name` of its `room` (``_writer``, ``_fanout``)."""

    def get(self: TelemetryPipeline) -> Any:
        return getattr(getattr(self, room), name)

    def set_(self: TelemetryPipeline, value: Any) -> None:
        setattr(getattr(self, room), name, value)

    return property(get, set_, doc=doc)


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
        self.closed = False
        self._tasks: list[asyncio.Task] = []
        # Progress: set (and replaced) whenever a task finished a round, for flush().
        self._progress = asyncio.Event()
        log_drop = self._log_drop = _RateLimitedLog()
        self._writer = TelemetryWriter(
            self.loop,
            batch_size=max(1, batch_size or cfg["TELEMETRY_BATCH_SIZE"]),
            batch_delay=cfg["TELEMETRY_BATCH_DELAY"] if batch_delay is None else batch_delay,
            buffer_limit=max(1, buffer_limit or cfg["TELEMETRY_BUFFER_LIMIT"]),
            notify=self._notify,
            log_drop=log_drop,
            log_db=_RateLimitedLog(),
        )
        self._announcer = MetricAnnouncer()
        self.max_metrics = max(1, cfg["DEVICE_MAX_METRICS"])
        self._fanout = DashboardFanout(
            get_channel_layer(), group, self._announcer, self._notify, log_drop
        )
        self._rejections = RejectionRecorder(
            self.loop,
            self._writer.run_in_writer,
            delay=lambda: self._writer.batch_delay,
            stored=self._rejections_stored,
            notify=self._notify,
            log_db=_RateLimitedLog(),
        )

    # -- submitting (sync, O(1), never raises) ---------------------------------------------

    def submit_reading(
        self,
        device_id: str,
        transport: str,
        ts: float | None,
        metrics: Metrics,
        source: str = "",
        durable: Durable | None = None,
        presence: bool = True,
    ) -> None:
        """Queue one telemetry message: its values for storage, a frame for dashboards.

        `source` names where it came from (the topic pattern, e.g. ``devices/{device_id}/
        telemetry``); it only travels with the announcement of a new device or metric.
        `presence` False: a retained message replayed by the broker, state rather than news
        (docs/retained-and-presence.md): stored once, no frame, the device's online state
        untouched; `ts` None then: not a reading, only latest values the device lacks.
        """
        try:
            if metrics:
                metrics = self._within_budget(device_id, metrics)
                if not metrics:  # every name refused: handled, so acknowledged
                    self._writer.release_soon(durable)
                    return
            if not self._admit(device_id, transport, metrics, source):
                return
            now = time.time()
            self._writer.add_reading(device_id, transport, ts, metrics, now, durable, presence)
            if presence:
                self._fanout.reading(device_id, ts, metrics, now)
                if _reading_observers:
                    _observe(_reading_observers, device_id, ts, metrics)
        except Exception:  # a caller's bad metrics (or a bug) must not take the consumer down
            logger.exception("telemetry pipeline: submit_reading(%r) failed", device_id)
            self._writer.release_soon(durable)

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
            if not self._admit(device_id, transport, {}, source):
                return
            self._writer.add_status(device_id, transport, online, durable)
            self._fanout.status(device_id, online, ts)
            if _status_observers:
                _observe(_status_observers, device_id, online, ts)
        except Exception:  # pragma: no cover
            logger.exception("telemetry pipeline: submit_status(%r) failed", device_id)
            self._writer.release_soon(durable)

    def submit_rejection(self, device_id: str, reason: str, detail: str = "") -> None:
        """Note a rejected message of `device_id` (a valid id) in its rejection record: why
        (the ``gateway_messages_rejected_total`` reason) and a short description of it.
        Counted per device and stored with the next batch, if the device is registered."""
        try:
            if self.closed:
                REJECTIONS_UNRECORDED.labels(reason="shutdown").inc()
                return
            if not self._tasks:
                self._start()
            self._rejections.add(device_id, reason, detail, time.time())
        except Exception:  # pragma: no cover - a bug here must not cost the consumer
            logger.exception("telemetry pipeline: submit_rejection(%r) failed", device_id)

    def _rejections_stored(self, stored: list[Stored]) -> None:
        for device_id, count, at, reason, detail in stored:
            self._fanout.rejection(device_id, count, at, reason, detail)

    def _within_budget(self, device_id: str, metrics: Metrics) -> Metrics:
        """Drop the new metric names past the device's `max_metrics` (counted, logged)."""
        kept = self._announcer.within(device_id, metrics, self.max_metrics)
        if len(kept) < len(metrics):
            MESSAGES_REJECTED.labels(reason="too_many_metrics").inc()
            refused = sorted(set(metrics).difference(kept))
            detail = (
                f"{len(refused)} new metric name(s) past {self.max_metrics}, e.g. {refused[0]!r}"
            )
            self.submit_rejection(device_id, "too_many_metrics", detail)
            self._log_drop(
                logging.WARNING,
                "device %r: %d new metric name(s) refused, past %d distinct metrics per device",
                device_id,
                len(metrics) - len(kept),
                self.max_metrics,
            )
        return kept

    def _admit(self, device_id: str, transport: str, metrics: Metrics, source: str) -> bool:
        """False (dropped, counted) once closed; else a new device or metric is announced."""
        if self._refuse(len(metrics)):
            return False
        if self._announcer.note(device_id, transport, metrics, source):
            self._fanout.poke()
        return True

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
            self.loop.create_task(self._writer.run(), name="telemetry-pipeline.writer"),
            self.loop.create_task(self._fanout.run(), name="telemetry-pipeline.fanout"),
            self.loop.create_task(self._rejections.run(), name="telemetry-pipeline.rejections"),
        ]

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def run_in_writer(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` in the writer's thread (its database connection); tests use it."""
        return await self._writer.run_in_writer(func, *args)

    # -- control ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write and fan out everything submitted before this call (retrying a failing DB)."""
        writer, fanout, rejections = self._writer, self._fanout, self._rejections
        rows, dev, fan = writer.rows_added, writer.dev_seq, fanout.seq
        rej = rejections.seq
        while (
            writer.rows_done < rows
            or writer.dev_done < dev
            or rejections.done < rej
            or fanout.done < fan
        ):
            if not self._tasks or any(t.done() for t in self._tasks):
                break  # never started, or closed
            progress = self._progress
            writer.wake.set()
            rejections.wake.set()
            fanout.wake.set()
            await progress.wait()
            if rej and rejections.done >= rej:
                # The records just stored went to the fan-out as frames: send those too.
                fan, rej = max(fan, fanout.seq), 0

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
        self._rejections.close()
        await self._writer.close()
        _pipelines.discard(self.loop, self)

    # -- reading ---------------------------------------------------------------------------

    def announcements(self) -> list[dict[str, Any]]:
        """Everything this process announced so far (a listener that joined late catches up)."""
        return self._announcer.announcements()

    def pending_devices(self) -> dict[str, dict[str, Any]]:
        """Devices with changes not yet in the database: ``{id: as_dict-like overlay}``."""
        return self._writer.pending_devices()

    # Settings and state that live in the rooms, readable (and the settings writable, as tests
    # do) on the pipeline itself.
    failures = _forward("_writer", "failures", "failed batch writes since start (health checks)")
    batch_size = _forward("_writer", "batch_size", "values per write transaction, at most")
    batch_delay = _forward("_writer", "batch_delay", "seconds a value may wait for its batch")
    buffer_limit = _forward("_writer", "buffer_limit", "values waiting, at most")
    group = _forward("_fanout", "group", "the dashboards' group")
    channel_layer = _forward("_fanout", "channel_layer", "the layer frames go out on")


_pipelines: PerLoop[TelemetryPipeline] = PerLoop(TelemetryPipeline, stale=lambda p: p.closed)


_last: TelemetryPipeline | None = None  # the last one returned: called once per message


def get_pipeline() -> TelemetryPipeline:
    """The pipeline of the running event loop, created on first use (one per loop)."""
    global _last
    pipeline = _last
    if pipeline is not None and pipeline.loop is asyncio.get_running_loop() and not pipeline.closed:
        return pipeline  # no WeakKeyDictionary lookup (a weakref per call: 2 % of ingest)
    _last = pipeline = _pipelines.get()
    return pipeline


def current_pipeline() -> TelemetryPipeline | None:
    """The running loop's pipeline if one exists (never creates one; None outside a loop)."""
    return _pipelines.current()


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


def snapshot_overlay(
    devices: Iterable[dict[str, Any]], stored_only: bool = False
) -> list[dict[str, Any]]:
    """`devices` with this loop's pending changes merged (API list, dashboard snapshot);
    `stored_only`: on these devices alone, none appended (one page of a list)."""
    pipeline = current_pipeline()
    pending = pipeline.pending_devices() if pipeline is not None else {}
    if stored_only:
        devices = list(devices)
        ids = {d["id"] for d in devices}
        pending = {k: v for k, v in pending.items() if k in ids}
    return merge_pending(devices, pending)
