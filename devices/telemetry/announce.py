"""What this process has announced about devices and their metrics (group ``device-metrics``).

The telemetry pipeline tells listeners (Home Assistant discovery,
devices/conventions/homeassistant.py) when it first sees a device or a new metric of it, never per
reading. This room remembers what was told, so a reading of known metrics costs one set check, and
holds the news until the pipeline's fan-out task sends it (devices/telemetry/fanout.py); it knows
nothing of the channel layer.
"""

from __future__ import annotations

from typing import Any

from devices.telemetry.batching import Metrics

#: Group told when this process first sees a device or a new metric of it (never per reading):
#: ``{"type": "device.metrics", "devices": [{"device", "transport", "source", "metrics":
#: {name: "number" | "bool"}}]}``; Home Assistant discovery (conventions/homeassistant.py) listens.
DEVICE_METRICS_GROUP = "device-metrics"
#: Devices whose announced metric names are remembered; past it the memory starts over (a few
#: announcements repeat; listeners ignore what they already know).
ANNOUNCED_LIMIT = 100_000


class MetricAnnouncer:
    """Metric kinds told per device, the metric names told by (device, source), and what waits.

    One entry per known device, so it is kept small: a fleet's devices mostly report the same
    metrics, so the entries' values are shared, never mutated: 10,000 devices stay ~2 MiB.
    """

    def __init__(self) -> None:
        self._announced: dict[str, dict[str, str]] = {}  # device → {metric: kind} (shared)
        self._told: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}  # → (transport, names)
        self._waiting: dict[tuple[str, str], dict[str, Any]] = {}
        # One instance of each distinct value above: {metric: kind} by its items, told tuples.
        self._kinds: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
        self._tolds: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}

    def within(self, device_id: str, metrics: Metrics, cap: int) -> Metrics:
        """`metrics` without the names that would take the device past `cap` distinct metrics.

        Known names always pass; new ones pass while the device has room, in message order.
        """
        known = self._announced.get(device_id)
        have = 0 if known is None else len(known)
        if have + len(metrics) <= cap:
            return metrics  # the common case: nothing to look at
        room = cap - have
        kept: Metrics = {}
        for name, value in metrics.items():
            if known is not None and name in known:
                kept[name] = value
            elif room > 0:
                kept[name] = value
                room -= 1
        return kept

    def note(self, device_id: str, transport: str, metrics: Metrics, source: str) -> bool:
        """Queue the news of a device first seen, or of its new metrics; True if there was any.

        Empty `metrics` (a status) is news only for a device never seen.
        """
        known = self._announced.get(device_id)
        if known is not None and known.keys() >= metrics.keys():
            return False
        if known is None and len(self._announced) >= ANNOUNCED_LIMIT:
            self._announced.clear()
            self._told.clear()
            self._kinds.clear()
            self._tolds.clear()
        kinds = {n: "bool" if v is True or v is False else "number" for n, v in metrics.items()}
        merged = kinds if known is None else {**known, **kinds}
        self._announced[device_id] = self._kinds.setdefault(frozenset(merged.items()), merged)
        key = (device_id, source)
        _, names = self._told.get(key, (transport, ()))
        told = (transport, (*names, *(n for n in kinds if n not in names)))
        self._told[key] = self._tolds.setdefault(told, told)
        entry = self._waiting.get(key)
        if entry is None:
            entry = self._waiting[key] = {
                "device": device_id,
                "transport": transport,
                "source": source,
                "metrics": {},
            }
        entry["metrics"].update(kinds)
        return True

    def take(self) -> list[dict[str, Any]]:
        """The news not yet sent (the fan-out sends it in one message), forgotten here."""
        if not self._waiting:
            return []
        entries, self._waiting = list(self._waiting.values()), {}
        return entries

    def announcements(self) -> list[dict[str, Any]]:
        """Everything announced so far (a listener that joined late catches up)."""
        out = []
        for (device_id, source), (transport, names) in self._told.items():
            kinds = self._announced.get(device_id, {})
            metrics = {name: kinds[name] for name in names if name in kinds}
            out.append(
                {"device": device_id, "transport": transport, "source": source, "metrics": metrics}
            )
        return out
