"""The fleet as the dashboard pages it: a view (filter, sort, page), its rows, the fleet's counts.

A browser looks at one page of devices, never the whole fleet (docs/interface.md §6.3 `view`).
Every client of a process shares one `FleetIndex` per event loop: a light row per device (id,
name, presence, convention, alerting, latest rejection), read from the database with this
loop's pending values overlaid, at most once per `max_age` however many clients ask
(concurrent asks share one read).
Filtering, sorting and paging 10,000 light rows in Python takes a few milliseconds; the visible
page's full rows (latest values) are then read fresh for just those ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async

from gateway.loops import PerLoop

logger = logging.getLogger(__name__)

#: A device that says it is online but has sent nothing for this long is shown as "stale".
#: Simulated and typical devices report every 1-60 s; two minutes tolerates a missed report
#: or two without hiding a device whose firmware hung while its MQTT session stayed up.
STALE_SECONDS = 120
PRESENCES = ("online", "stale", "offline")
PRESENCE_FILTERS = ("all", "problems", "alerting", "rejecting", *PRESENCES)
CONVENTIONS = ("native", "tasmota", "discovery", "zigbee2mqtt", "serial", "modbus")
#: `problems`: alerting first, then rejecting, stale, offline, then online; ties by id.
#: Rejecting ranks right after alerting: the device is talking, yet what it says is lost now,
#: which an operator can act on; an offline device is often off on purpose.
SORTS = ("problems", "id", "name", "last_seen")
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_QUERY_CHARS = 100
#: View keys a client may send (frame fields, or the WebSocket URL's query string).
VIEW_KEYS = ("q", "presence", "convention", "sort", "offset", "limit", "device")
_RANK = {"alerting": 0, "rejecting": 1, "stale": 2, "offline": 3, "online": 4}


class BadView(ValueError):
    """A view the server cannot serve; the message says which field and what is allowed."""


@dataclass(frozen=True)
class View:
    """What one client looks at: `device` alone (a device page), or a filtered, sorted page."""

    q: str = ""
    presence: str = "all"
    convention: str = "all"
    sort: str = "problems"
    offset: int = 0
    limit: int = DEFAULT_LIMIT
    device: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The view as echoed in `snapshot` and `view` frames."""
        out = dataclasses.asdict(self)
        if self.device is None:
            del out["device"]
        return out


def _int(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadView(f"{key} must be an integer from {low} to {high}")
    return value


def _choice(data: Mapping[str, Any], key: str, allowed: Iterable[str], default: str) -> str:
    value = data.get(key, default)
    allowed = tuple(allowed)
    if value not in allowed:
        raise BadView(f"{key} must be one of {', '.join(allowed)}")
    return value


def parse_view(data: Mapping[str, Any]) -> View:
    """A `View` from a `view` frame or a query string's fields; `BadView` says what is wrong."""
    q = data.get("q", "")
    if not isinstance(q, str) or len(q) > MAX_QUERY_CHARS:
        raise BadView(f"q must be a string of at most {MAX_QUERY_CHARS} characters")
    device = data.get("device")
    if device is not None and not (isinstance(device, str) and 0 < len(device) <= 64):
        raise BadView("device must be a device id (1-64 characters)")
    return View(
        q=q.strip().lower(),
        presence=_choice(data, "presence", PRESENCE_FILTERS, "all"),
        convention=_choice(data, "convention", ("all", *CONVENTIONS), "all"),
        sort=_choice(data, "sort", SORTS, "problems"),
        offset=_int(data, "offset", 0, 0, 10_000_000),
        limit=_int(data, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        device=device,
    )


@dataclass(slots=True)
class Light:
    """One device as the index keeps it: enough to filter, sort and count, no values."""

    id: str
    name: str
    online: bool
    last_seen: float | None
    convention: str
    text: str  # lower-case "name id", what a search matches
    rejected_at: float | None = None  # its latest rejected message (epoch s)

    def presence(self, now: float) -> str:
        """``online``, ``stale`` or ``offline`` (as `presence()` in live.js)."""
        if not self.online:
            return "offline"
        if self.last_seen is not None and now - self.last_seen > STALE_SECONDS:
            return "stale"
        return "online"


def rejecting_seconds() -> float:
    """How recent a device's latest rejected message must be for it to be ``rejecting``."""
    from django.conf import settings

    return float(settings.GATEWAY["REJECTING_SECONDS"])


@dataclass
class Fleet:
    """The index at one moment: every device's light row and the ids with an active alert."""

    rows: list[Light]
    alerting: frozenset[str]
    loaded: float  # monotonic time of the read
    by_id: dict[str, Light] = dataclasses.field(default_factory=dict)
    window: float = dataclasses.field(default_factory=rejecting_seconds)

    def __post_init__(self) -> None:
        self.by_id = {row.id: row for row in self.rows}

    def rejecting(self, row: Light, now: float) -> bool:
        """Whether the row's latest rejected message is within the window."""
        return row.rejected_at is not None and now - row.rejected_at <= self.window

    def state(self, row: Light, now: float) -> str:
        """The row's problem state: ``alerting``, then ``rejecting``, before its presence."""
        if row.id in self.alerting:
            return "alerting"
        return "rejecting" if self.rejecting(row, now) else row.presence(now)

    def counts(self, now: float | None = None) -> dict[str, Any]:
        """The fleet's counts: by presence, by convention, alerting, with problems."""
        now = time.time() if now is None else now
        presence = dict.fromkeys(PRESENCES, 0)
        conventions = dict.fromkeys(CONVENTIONS, 0)
        problems = rejecting = 0
        for row in self.rows:
            state = row.presence(now)
            presence[state] += 1
            conventions[row.convention] = conventions.get(row.convention, 0) + 1
            bad = self.rejecting(row, now)
            rejecting += bad
            if bad or state != "online" or row.id in self.alerting:
                problems += 1
        alerting = sum(1 for device in self.alerting if device in self.by_id)
        return {
            "total": len(self.rows),
            "presence": presence,
            "conventions": conventions,
            "alerting": alerting,
            "rejecting": rejecting,
            "problems": problems,
        }

    def next_stale(self, now: float) -> float | None:
        """Seconds until the next device changes state with no message: an online one turns
        stale if it stays silent, a rejecting one stops rejecting (None: never)."""
        due = [
            row.last_seen + STALE_SECONDS - now
            for row in self.rows
            if row.online and row.last_seen is not None and now - row.last_seen <= STALE_SECONDS
        ]
        due += [
            row.rejected_at + self.window - now for row in self.rows if self.rejecting(row, now)
        ]
        return max(0.0, min(due)) if due else None

    def select(self, view: View, now: float | None = None) -> tuple[list[str], int, int]:
        """The view's page: (ids in order, matching total, offset clamped to the last page)."""
        now = time.time() if now is None else now
        if view.device is not None:
            ids = [view.device] if view.device in self.by_id else []
            return ids, len(ids), 0
        rows: Iterable[Light] = self.rows
        if view.q:
            rows = [r for r in rows if view.q in r.text]
        if view.convention != "all":
            rows = [r for r in rows if r.convention == view.convention]
        if view.presence == "problems":
            rows = [r for r in rows if self.state(r, now) != "online"]
        elif view.presence == "alerting":
            rows = [r for r in rows if r.id in self.alerting]
        elif view.presence == "rejecting":
            rows = [r for r in rows if self.rejecting(r, now)]
        elif view.presence != "all":
            rows = [r for r in rows if r.presence(now) == view.presence]
        rows = list(rows)
        if view.sort == "problems":
            rows.sort(key=lambda r: (_RANK[self.state(r, now)], r.id))
        elif view.sort == "name":
            rows.sort(key=lambda r: (r.name.lower(), r.id))
        elif view.sort == "last_seen":
            rows.sort(key=lambda r: (-(r.last_seen or 0.0), r.id))
        # "id": the index is kept in id order already.
        total = len(rows)
        offset = view.offset
        if offset >= total:
            offset = max(0, (total - 1) // view.limit * view.limit)
        return [r.id for r in rows[offset : offset + view.limit]], total, offset


def pending_devices() -> dict[str, dict[str, Any]]:
    """Values this loop's telemetry pipeline has not written to the DB yet (never starts one)."""
    try:
        from devices.telemetry.pipeline import current_pipeline
    except ImportError:  # the pipeline room is not installed in this process
        return {}
    try:
        pipeline = current_pipeline()
        return dict(pipeline.pending_devices()) if pipeline is not None else {}
    except Exception:  # a snapshot without the overlay beats no snapshot
        logger.exception("pending_devices() failed; snapshot from the database only")
        return {}


def merge_snapshot(
    devices: list[dict[str, Any]], pending: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Stored devices overlaid with the pipeline's pending (newer) values, sorted by id."""
    if not pending:
        return devices
    from devices.telemetry.pipeline import merge_pending

    return merge_pending(devices, pending)


@database_sync_to_async
def _read() -> tuple[list[dict[str, Any]], list[str]]:
    from alerts.models import Alert, AlertState
    from devices.models import Device

    fields = ("id", "name", "online", "last_seen", "transport", "metrics", "last_rejected_at")
    devices = [
        {
            "id": i,
            "name": n or i,
            "online": o,
            "last_seen": s.timestamp() if s else None,
            "transport": t,
            "metrics": m,
            "last_rejected_at": r.timestamp() if r else None,
        }
        for i, n, o, s, t, m, r in Device.objects.order_by("id").values_list(*fields)
    ]
    alerting = list(
        Alert.objects.filter(state=AlertState.ACTIVE).values_list("device", flat=True).distinct()
    )
    return devices, alerting


async def load_fleet() -> Fleet:
    """Every device's light row, from the database with this loop's pending values over it."""
    from devices.conventions.kinds import with_conventions

    pending = pending_devices()  # before the read: anything written in between is in the read
    devices, alerting = await _read()
    rows = [
        Light(
            id=d["id"],
            name=d["name"] or d["id"],
            online=bool(d.get("online")),
            last_seen=d.get("last_seen"),
            convention=d["convention"],
            text=f"{d['name'] or ''} {d['id']}".lower(),
            rejected_at=d.get("last_rejected_at"),
        )
        for d in with_conventions(merge_snapshot(devices, pending))
    ]
    return Fleet(rows, frozenset(alerting), time.monotonic())


class FleetIndex:
    """The loop's shared `Fleet`, re-read when older than the caller's `max_age`."""

    def __init__(self) -> None:
        self._fleet: Fleet | None = None
        self._loading: asyncio.Future[Fleet] | None = None

    async def get(self, max_age: float) -> Fleet:
        """A fleet read at most `max_age` seconds ago; concurrent callers share one read."""
        fleet = self._fleet
        if fleet is not None and time.monotonic() - fleet.loaded <= max_age:
            return fleet
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        return await asyncio.shield(self._loading)

    async def _load(self) -> Fleet:
        try:
            self._fleet = await load_fleet()
            return self._fleet
        finally:
            self._loading = None

    def invalidate(self) -> None:
        """Forget the cached read (tests; a device renamed or deleted)."""
        self._fleet = None


_indexes: PerLoop[FleetIndex] = PerLoop(FleetIndex)


def fleet_index() -> FleetIndex:
    """The running loop's `FleetIndex`."""
    return _indexes.get()


@database_sync_to_async
def _stored_rows(ids: list[str]) -> list[dict[str, Any]]:
    from devices.models import Device

    return [d.as_dict() for d in Device.objects.filter(id__in=ids)]


async def page_rows(ids: list[str]) -> list[dict[str, Any]]:
    """The full rows (§5.2 shape) of `ids`, in that order, with this loop's pending values."""
    if not ids:
        return []
    from devices.conventions.kinds import with_conventions

    wanted = set(ids)
    pending = {k: v for k, v in pending_devices().items() if k in wanted}
    rows = with_conventions(merge_snapshot(await _stored_rows(ids), pending))
    by_id = {row["id"]: row for row in rows}
    return [by_id[i] for i in ids if i in by_id]
