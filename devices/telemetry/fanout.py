"""Dashboard fan-out: every frame since the last send goes out in ONE group_send.

The telemetry pipeline's second background task. Frames (docs/interface.md §6 ``telemetry``,
``status``, ``rejection``) collect here; the first one wakes the task on the next loop turn and
frames arriving during a send go in the next one, so dashboards cost one channel-layer send per
loop turn, never one per reading. A device's readings with nothing in between coalesce into
one ``telemetry`` frame (its rejection records into one ``rejection`` frame). The same task
sends the pipeline's device/metric news (devices/telemetry/announce.py) to group
``device-metrics`` first. A send stuck past `SEND_TIMEOUT` is abandoned and its frames counted, so a
slow layer never stops the readings behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from devices.telemetry.announce import DEVICE_METRICS_GROUP, MetricAnnouncer
from devices.telemetry.batching import Metrics
from gateway.metrics import DASHBOARD_EVENTS_DROPPED

SEND_TIMEOUT = 5.0  # a group_send stuck longer than this is abandoned (frames counted)


class DashboardFanout:
    """Frames for dashboards, coalesced per device and sent in batches by `run()`."""

    def __init__(
        self,
        channel_layer: Any,
        group: str,
        announcer: MetricAnnouncer,
        notify: Callable[[], None],
        log_drop: Callable[..., None],
    ) -> None:
        self.channel_layer = channel_layer
        self.group = group
        self.announcer = announcer
        self._notify = notify  # progress for the pipeline's flush()
        self._log_drop = log_drop
        # Frames of the next group_send; each device's last frame in it.
        self._frames: list[dict[str, Any]] = []
        self._last_frame: dict[str, dict[str, Any]] = {}
        self.wake = asyncio.Event()
        # Progress counters: news queued, news sent (or dropped and counted).
        self.seq = self.done = 0
        # device_id → online, as this process last saw it (unknown until then).
        self._online: dict[str, bool] = {}

    def poke(self) -> None:
        """Something new waits (an announcement): send it on the next loop turn."""
        self.seq += 1
        self.wake.set()

    def reading(self, device_id: str, ts: float, metrics: Metrics, now: float) -> None:
        """A telemetry frame (coalesced), after a ``status`` frame if the device was not online."""
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
            self.seq += 1
        else:
            frame = {
                "type": "telemetry",
                "device": device_id,
                "ts": ts,
                "metrics": dict(metrics),
            }
            self._add_frame(device_id, frame)

    def status(self, device_id: str, online: bool, ts: float) -> None:
        """A ``status`` frame; the device's online state as this process now knows it."""
        self._online[device_id] = online
        frame = {"type": "status", "device": device_id, "online": online, "ts": ts}
        self._add_frame(device_id, frame)

    def rejection(self, device_id: str, count: int, at: float, reason: str, detail: str) -> None:
        """A ``rejection`` frame: the device's stored rejection record (coalesced)."""
        frame = {
            "type": "rejection",
            "device": device_id,
            "ts": at,
            "rejected": count,
            "reason": reason,
            "detail": detail,
        }
        last = self._last_frame.get(device_id)
        if last is not None and last["type"] == "rejection":
            last.update(frame)  # coalesce: same device, nothing in between
            self.seq += 1
        else:
            self._add_frame(device_id, frame)

    def _add_frame(self, device_id: str, frame: dict[str, Any]) -> None:
        self._frames.append(frame)
        self._last_frame[device_id] = frame
        self.seq += 1
        self.wake.set()

    async def run(self) -> None:
        """The fan-out task: announcements, then one ``dashboard.events`` per wake-up."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            frames, self._frames, self._last_frame = self._frames, [], {}
            seq = self.seq
            entries = self.announcer.take()
            if entries and self.channel_layer is not None:
                message = {"type": "device.metrics", "devices": entries}
                exc = await self._send(DEVICE_METRICS_GROUP, message)
                if exc is not None:
                    self._log_drop(logging.WARNING, "device-metrics announcement failed: %r", exc)
            if frames and self.channel_layer is not None:
                exc = await self._send(self.group, {"type": "dashboard.events", "events": frames})
                if exc is not None:
                    reason = "timeout" if isinstance(exc, TimeoutError) else "layer_error"
                    DASHBOARD_EVENTS_DROPPED.labels(reason=reason).inc(len(frames))
                    self._log_drop(
                        logging.WARNING,
                        "dashboard fan-out of %d frames failed: %r",
                        len(frames),
                        exc,
                    )
            self.done = seq
            self._notify()

    async def _send(self, group: str, message: dict[str, Any]) -> Exception | None:
        """One group_send within `SEND_TIMEOUT`; the exception if it failed (never raised)."""
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self.channel_layer.group_send(group, message)
        except Exception as exc:
            return exc
        return None
