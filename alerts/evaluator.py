"""The alert evaluator: rules judged on the ingest path, in memory, one evaluator per loop.

The telemetry pipeline calls `observe_reading` / `observe_status` (sync, never blocking, never
raising) for every admitted message. The evaluator keeps the enabled rules compiled
(alerts/rules.py), indexed by metric and cached per device, where the rules without an open
alert are summed up as one quiet band (a reading inside it costs one comparison whatever the
number of rules; docs/alerts.md "Cost"), and one `Track` per (rule, device) whose condition
holds: ``pending`` while waiting out the rule's `for` (a ``loop.call_later`` timer, no
polling), then ``active`` until the condition ends. Transitions go to the `Journal` (stored in
order off the hot path, then emitted).

- Rules are read from the database when the evaluator starts and again whenever one changes
  (``alert.rules`` on group `EVALUATORS_GROUP`, sent on every save or delete, from any
  process).
- Several evaluators (bridges of a shared subscription) share the database: opening is guarded
  by the one-open-alert constraint and every transition is conditional, so one alert is raised
  and notified once; each change is also sent to every evaluator (``alert.changed``) so one
  that did not make it adopts or forgets the alert.
- Restart: open alerts are read back; a pending one's timer is re-armed for what is left of its
  `for`, an active one stays active, so nothing is raised (or notified) twice.
- Until the rules are loaded, observations wait in a buffer of `BUFFER_LIMIT` (oldest dropped
  and counted): a device's retained Last Will, replayed at subscribe time, is not lost.
- An evaluator exists only where something started it (alerts/hooks.py `start_evaluator()`:
  the MQTT bridge's alert publisher and `runserial` do); elsewhere the pipeline's hooks
  return at once.

Just over 400 lines: one evaluator, its per-rule state machine and its timers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from channels.layers import get_channel_layer

from alerts import store
from alerts.journal import DatabaseThread, Journal, Track
from alerts.models import Op
from alerts.outbox import EVALUATORS_GROUP
from alerts.rules import Band, CompiledRule, quiet_band
from gateway.metrics import ALERT_DROPPED

logger = logging.getLogger(__name__)

BUFFER_LIMIT = 10_000
RETRY_FIRST, RETRY_MAX = 0.5, 10.0

Key = tuple[int, str]
#: One metric's rules covering one device: (the `quiet_band` of the untracked ones, the
#: (key, rule) pairs with an open alert, those without).
Judged = tuple[Band, tuple[tuple[Key, CompiledRule], ...], tuple[tuple[Key, CompiledRule], ...]]


class Evaluator:
    """One loop's rules, tracks and timers (see the module docstring)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.ready = False
        self.database = DatabaseThread(self.loop)
        self.journal = Journal(self.database, self._opened)
        self.tracks: dict[Key, Track] = {}
        self._by_metric: dict[str, list[CompiledRule]] = {}
        # device → metric → `Judged`: that metric's rules covering that device, made on first
        # use and again whenever one of the device's alerts opens or ends (`_tracks_changed`).
        self._matching: dict[str, dict[str, Judged]] = {}
        self._offline: list[CompiledRule] = []
        self._nodata: list[CompiledRule] = []
        # device → (track key, rule) of the nodata rules covering it (like `_matching`).
        self._nodata_for: dict[str, tuple[tuple[Key, CompiledRule], ...]] = {}
        self._rules: dict[int, CompiledRule] = {}
        self._presence_open: dict[str, int] = {}  # device → its open offline/nodata tracks
        self._last_seen: dict[str, float] = {}
        self._offline_now: set[str] = set()  # devices whose last status was offline
        self._silence: dict[Key, asyncio.TimerHandle] = {}
        self._buffer: deque[tuple[Any, ...]] = deque()
        self._started_at = time.time()
        self._loaded = asyncio.Event()
        self._channel: str | None = None
        self._rules_changed = asyncio.Event()  # set (and replaced) after every load
        self._reload = asyncio.Event()
        self._tasks = [
            self.loop.create_task(self.journal.run(), name="alerts.journal"),
            self.loop.create_task(self._rules_task(), name="alerts.rules"),
        ]

    # -- observations (sync, never raise) --------------------------------------------------

    def reading(self, device: str, ts: float, metrics: dict[str, float | bool]) -> None:
        """A device's telemetry: judge its metrics; it is online and not silent."""
        if not self.ready:
            self._buffered(("reading", device, ts, metrics))
            return
        now = time.time()
        self._last_seen[device] = now
        self._offline_now.discard(device)
        if device in self._presence_open:
            self._presence_ends(device, None)
        nodata = self._nodata_for.get(device)
        if nodata is None:
            nodata = self._nodata_for[device] = tuple(
                ((r.id, device), r) for r in self._nodata if r.matches(device)
            )
        for key, rule in nodata:
            if key not in self._silence:
                self._arm_silence(rule, device, rule.for_seconds)
        by_metric = self._by_metric
        if not by_metric:
            return  # no metric rules: nothing to remember per device either
        matching = self._matching.get(device)
        if matching is None:
            matching = self._matching[device] = {}
        for name, value in metrics.items():
            if name not in by_metric:
                continue
            judged = matching.get(name)
            if judged is None:  # first reading of this metric from this device since a change
                judged = matching[name] = self._judged(by_metric[name], device)
            (lo, hi, equal), tracked, untracked = judged
            value = float(value)
            for key, rule in tracked:  # an alert is open: each judges whether it ends
                self._judge(rule, key, device, value, now)
            if untracked and not (lo <= value <= hi and value not in equal):
                for key, rule in untracked:
                    self._judge(rule, key, device, value, now)

    def _judged(self, rules: list[CompiledRule], device: str) -> Judged:
        """The rules of one metric covering `device`: the band where those without an open
        alert all stay quiet, the (key, rule) pairs with an open alert, and those without."""
        pairs = [((r.id, device), r) for r in rules if r.matches(device)]
        tracked = tuple(p for p in pairs if p[0] in self.tracks)
        untracked = tuple(p for p in pairs if p[0] not in self.tracks)
        return quiet_band(r for _, r in untracked), tracked, untracked

    def _tracks_changed(self, device: str) -> None:
        """An alert of `device` opened or ended: its metric rules are sorted again."""
        self._matching.pop(device, None)

    def status(self, device: str, online: bool, ts: float) -> None:
        """A device's online/offline status (e.g. its MQTT Last Will)."""
        if not self.ready:
            self._buffered(("status", device, online, ts))
            return
        if online:
            self._offline_now.discard(device)
            if device in self._presence_open:
                self._presence_ends(device, Op.OFFLINE)
            return
        self._offline_now.add(device)
        now = time.time()
        for rule in self._offline:
            if (rule.id, device) not in self.tracks and rule.matches(device):
                self._start(rule, device, None, now)

    def _buffered(self, event: tuple[Any, ...]) -> None:
        if len(self._buffer) >= BUFFER_LIMIT:
            self._buffer.popleft()
            ALERT_DROPPED.labels(reason="not_ready").inc()
        self._buffer.append(event)

    # -- the lifecycle ---------------------------------------------------------------------

    def _judge(self, rule: CompiledRule, key: Key, device: str, value: float, now: float) -> None:
        track = self.tracks.get(key)
        verdict = rule.check(value, track is not None)
        if verdict is True:
            if track is None:
                self._start(rule, device, value, now)
            elif track.state == "pending":
                track.value = value
        elif verdict is False and track is not None:
            self._end(track, value, now)

    def _start(self, rule: CompiledRule, device: str, value: float | None, now: float) -> None:
        immediate = rule.for_seconds <= 0 or rule.op == Op.NODATA
        track = Track(rule, device, "active" if immediate else "pending", now, value)
        self.tracks[(rule.id, device)] = track
        self._tracks_changed(device)
        if rule.op in (Op.OFFLINE, Op.NODATA):
            self._presence_open[device] = self._presence_open.get(device, 0) + 1
        self.journal.add("open", track, value, now)
        if not immediate:
            track.timer = self.loop.call_later(rule.for_seconds, self._due, track)

    def _due(self, track: Track) -> None:
        """A pending track held for its rule's `for`: raise it."""
        track.timer = None
        if track.ended or track.state != "pending":
            return
        track.state = "active"
        self.journal.add("raise", track, track.value, time.time())

    def _end(self, track: Track, value: float | None, now: float) -> None:
        """The condition ended: a pending track is cancelled, an active one cleared."""
        self._forget(track)
        self.journal.add("cancel" if track.state == "pending" else "clear", track, value, now)

    def _forget(self, track: Track) -> None:
        """Stop tracking (timer, presence count); the database is someone else's business."""
        track.ended = True
        if self.tracks.get((track.rule.id, track.device)) is track:
            del self.tracks[(track.rule.id, track.device)]
            self._tracks_changed(track.device)
        if track.timer is not None:
            track.timer.cancel()
            track.timer = None
        if track.rule.op in (Op.OFFLINE, Op.NODATA):
            left = self._presence_open.get(track.device, 1) - 1
            if left > 0:
                self._presence_open[track.device] = left
            else:
                self._presence_open.pop(track.device, None)

    def _adopt(
        self, rule: CompiledRule, device: str, state: str, since: float, alert_id: int
    ) -> Track:
        """Track an alert opened elsewhere (the database, another process)."""
        track = Track(rule, device, state, since, None, id=alert_id)
        self.tracks[(rule.id, device)] = track
        self._tracks_changed(device)
        if rule.op in (Op.OFFLINE, Op.NODATA):
            self._presence_open[device] = self._presence_open.get(device, 0) + 1
        return track

    def _presence_ends(self, device: str, op: str | None) -> None:
        """The device spoke (or came online): its offline (and, on data, nodata) tracks end."""
        now = time.time()
        for track in [t for t in self.tracks.values() if t.device == device]:
            if track.rule.op == Op.OFFLINE or (op is None and track.rule.op == Op.NODATA):
                self._end(track, None, now)

    def _opened(self, track: Track, alert_id: int | None, state: str | None) -> None:
        """The journal stored `track`'s alert, or found it changed by someone else: follow
        what the database says (gone or cleared: forget it; raised elsewhere: active)."""
        if track.ended:
            return
        if alert_id is None or state not in ("pending", "active"):
            self._forget(track)
        elif state == "active" and track.state == "pending":
            track.state = "active"
            if track.timer is not None:
                track.timer.cancel()
                track.timer = None

    def _heard(self, alert: Any) -> None:
        """Another process (or this one) changed an alert: adopt or forget it to match."""
        if not isinstance(alert, dict):
            return
        key = (alert.get("rule"), alert.get("device"))
        track = self.tracks.get(key)  # type: ignore[arg-type]
        state = alert.get("state")
        if state == "cleared":
            if track is not None and track.id == alert.get("id"):
                self._forget(track)
        elif state == "active":
            rule = self._rules.get(key[0])  # type: ignore[arg-type]
            if track is None and rule is not None and isinstance(key[1], str):
                self._adopt(rule, key[1], "active", time.time(), alert["id"])
            elif track is not None and track.id == alert.get("id"):
                self._opened(track, track.id, "active")

    # -- no data ---------------------------------------------------------------------------

    def _arm_silence(self, rule: CompiledRule, device: str, delay: float) -> None:
        key = (rule.id, device)
        self._silence[key] = self.loop.call_later(max(0.0, delay), self._silent, rule, device)

    def _silent(self, rule: CompiledRule, device: str) -> None:
        """A nodata timer: raise if the device said nothing for `for`, else wait the rest."""
        key = (rule.id, device)
        self._silence.pop(key, None)
        if self._rules.get(rule.id) is not rule or self.closed:
            return
        now = time.time()
        last = max(self._last_seen.get(device, self._started_at), self._started_at)
        left = last + rule.for_seconds - now
        if left > 0.001:
            self._arm_silence(rule, device, left)
        elif key not in self.tracks:
            self._start(rule, device, None, now)

    # -- rules -----------------------------------------------------------------------------

    async def _rules_task(self) -> None:
        """Load rules and open alerts, then reload the rules whenever one changes."""
        layer = get_channel_layer()
        if layer is not None:
            self._channel = await layer.new_channel("alerts.rules.")
            await layer.group_add(EVALUATORS_GROUP, self._channel)
            self._tasks.append(
                self.loop.create_task(self._listen(layer, self._channel), name="alerts.listen")
            )
        await self._load(first=True)
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self._load(first=False)

    async def _listen(self, layer: Any, channel: str) -> None:
        while True:
            message = await layer.receive(channel)
            kind = message.get("type")
            if kind == "alert.rules":
                self._reload.set()
            elif kind == "alert.changed" and self.ready:
                try:
                    self._heard(message.get("alert"))
                except Exception:
                    logger.exception("alerts: an alert.changed message failed: %r", message)

    async def _load(self, first: bool) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                rules = await self.database.run(store.load_rules)
                if first:
                    open_rows = await self.database.run(store.load_open)
                    devices = await self.database.run(store.load_devices)
                break
            except Exception as exc:
                logger.warning("alert rules not loaded (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        self._install([CompiledRule.from_model(r) for r in rules])
        if first:
            for device, (at, online) in devices.items():
                if at is not None:
                    self._last_seen.setdefault(device, at)
                if not online:
                    self._offline_now.add(device)
            self._resume(open_rows)
            self.ready = True
            buffered, self._buffer = self._buffer, deque()
            for kind, *args in buffered:
                getattr(self, kind)(*args)
            self._loaded.set()
        self._arm_all_silences()
        self._offline_already()
        self._rules_changed.set()
        self._rules_changed = asyncio.Event()
        logger.info("alerts: %d rules, %d open", len(self._rules), len(self.tracks))

    def _install(self, rules: list[CompiledRule]) -> None:
        self._rules = {r.id: r for r in rules}
        self._by_metric = {}
        self._matching = {}
        for rule in rules:
            if rule.op in (Op.ABOVE, Op.BELOW, Op.OUTSIDE, Op.EQUALS):
                self._by_metric.setdefault(rule.metric, []).append(rule)
        self._offline = [r for r in rules if r.op == Op.OFFLINE]
        self._nodata = [r for r in rules if r.op == Op.NODATA]
        self._nodata_for = {}
        now = time.time()
        for track in list(self.tracks.values()):
            rule = self._rules.get(track.rule.id)
            if rule is None:  # deleted or disabled: its open alert ends
                self._end(track, None, now)
            else:
                track.rule = rule
        # Silence timers hold the rule objects they were armed with: re-armed after the load.
        for handle in self._silence.values():
            handle.cancel()
        self._silence.clear()

    def _resume(self, rows: list[tuple[int, int, str, str, float, float | None]]) -> None:
        """Open alerts from the database: re-arm pending timers for what is left of `for`."""
        now = time.time()
        for alert_id, rule_id, device, state, since, value in rows:
            rule = self._rules.get(rule_id)
            if rule is None or (rule_id, device) in self.tracks:
                continue
            track = self._adopt(rule, device, state, since, alert_id)
            track.value = value
            if state == "pending":
                delay = max(0.0, since + rule.for_seconds - now)
                track.timer = self.loop.call_later(delay, self._due, track)

    def _offline_already(self) -> None:
        """Offline rules hold for devices already offline (a new rule, a restart)."""
        now = time.time()
        for rule in self._offline:
            for device in self._offline_now:
                if (rule.id, device) not in self.tracks and rule.matches(device):
                    self._start(rule, device, None, now)

    def _arm_all_silences(self) -> None:
        for rule in self._nodata:
            for device, at in self._last_seen.items():
                if (rule.id, device) not in self._silence and rule.matches(device):
                    start = max(at, self._started_at)
                    self._arm_silence(rule, device, start + rule.for_seconds - time.time())

    # -- control ---------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until the rules and open alerts are loaded (tests, startup)."""
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def rules_loaded(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until the rules are loaded again (after a rule changed; tests)."""
        await asyncio.wait_for(self._rules_changed.wait(), timeout)

    async def reload(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Load the rules again now and wait for it (the API, after a rule is created here)."""
        if self.closed or not self.ready:
            return
        loaded = self._rules_changed
        self._reload.set()
        await asyncio.wait_for(loaded.wait(), timeout)

    def rule_ids(self) -> set[int]:
        """The ids of the rules being evaluated."""
        return set(self._rules)

    async def flush(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """Wait until every transition decided so far is stored and emitted."""
        return await self.journal.flush(timeout)

    async def close(self) -> None:
        """Store what is queued (briefly), then stop timers and tasks."""
        if self.closed:
            return
        if self.ready:
            await self.journal.flush(2.0)
        self.closed = True
        for handle in self._silence.values():
            handle.cancel()
        for track in self.tracks.values():
            if track.timer is not None:
                track.timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.database.close()
        layer = get_channel_layer()
        if self._channel is not None and layer is not None:
            try:
                await layer.group_discard(EVALUATORS_GROUP, self._channel)
            except Exception:  # the layer may be gone at shutdown
                logger.debug("alerts: group_discard failed", exc_info=True)
