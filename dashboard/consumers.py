"""The `/ws/dashboard/` consumer: a snapshot on connect, then live frames (docs/interface.md §6).

Every outgoing frame goes through a per-client bounded buffer drained by one writer task, so
a client whose socket cannot keep up never blocks the channel layer or other clients:

* Telemetry for a device that is still waiting in the buffer is merged into the waiting frame
  (latest value of each metric, newest ``ts``). Nothing waits on a timer: when the socket keeps
  up, each frame is written as soon as it arrives.
* When the buffer holds ``buffer_limit`` frames and another one comes, the client is too slow:
  the buffered frames are dropped and counted in ``gateway_ws_frames_dropped_total``, the
  consumer leaves the ``dashboard`` group and closes the socket with code 4008 (application
  range; daphne refuses 1013). The browser reconnects and resyncs from a fresh snapshot.

A client that opens with ``?batch=1`` (the browser does) gets the `telemetry` and `status`
frames waiting together in its buffer as one ``batch`` frame, so a loop turn's readings of many
devices cost one WebSocket message instead of one each; other clients get every frame on its own.

A client that asks for a view (a `view` frame, or view fields in the URL's query string) is
paged (dashboard/fleet.py): its snapshot and `view` frames carry one page of devices and the
fleet's counts, it gets `telemetry`/`status`/`rejection` frames only for the devices on its
page (a set lookup per frame), and fresh counts (a `fleet` frame) or a fresh page at most
every `REFRESH_SECONDS` while something changes. A client that asks for nothing gets every device.

Over 400 lines: one consumer whose three concerns (the bounded writer, commands, the paged
view and its refresh timers) share the same per-client state and message loop; the view's
data (index, filter, sort, page rows) lives in dashboard/fleet.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import orjson
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from dashboard.fleet import (
    VIEW_KEYS,
    BadView,
    View,
    fleet_index,
    merge_snapshot,
    page_rows,
    parse_view,
)
from dashboard.fleet import pending_devices as _pending_devices
from gateway.metrics import WS_CLIENTS, WS_FRAMES_DROPPED

logger = logging.getLogger(__name__)

GROUP = "dashboard"
CLOSE_SLOW_CLIENT = 4008
MAX_INBOUND_CHARS = 64 * 1024
MAX_REF_CHARS = 200
#: Frames a `batch` frame may carry: the types a script opting in must take from inside one.
BATCHED = frozenset(("telemetry", "status"))
#: Frames in one `batch` frame, at most (the rest go in the next one, written right after).
BATCH_MAX_FRAMES = 500
#: A paged client's fleet counts and page are re-read at most this often (seconds) while
#: frames say something changed: bounded work however fast the fleet reports.
REFRESH_SECONDS = 2.0

Frame = dict[str, Any]
#: Frames that may change a paged client's counts or page (a refresh follows, rate-bounded).
_FLEET_NEWS = frozenset(("telemetry", "status", "alert", "rejection"))


def encode_frame(frame: Frame) -> str:
    """One frame as strict JSON text (orjson writes NaN and ±Infinity as null)."""
    return orjson.dumps(frame, option=orjson.OPT_NON_STR_KEYS).decode()


@database_sync_to_async
def _stored_devices() -> list[dict[str, Any]]:
    from devices.models import Device

    return [d.as_dict() for d in Device.objects.all()]


def _query_view(scope: Mapping[str, Any]) -> tuple[View | None, str | None]:
    """The view the WebSocket URL's query string asks for (None: none asked), or its error."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    fields = {k: v[-1] for k, v in query.items() if k in VIEW_KEYS}
    if not fields and "view" not in query:
        return None, None
    try:
        return parse_view(fields), None
    except BadView as exc:
        return View(), str(exc)


def _wants_batches(scope: Mapping[str, Any]) -> bool:
    """Whether the client asked for `batch` frames (``batch=1`` in the URL's query string)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("batch", ["0"])[-1] in ("1", "true")


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("dashboard refresh could not be queued: %r", task.exception())


class DashboardConsumer(AsyncWebsocketConsumer):
    """One browser's live view: authenticated, snapshot first, then `dashboard.events` frames."""

    def __init__(self, buffer_limit: int | None = None, close_timeout: float = 5.0) -> None:
        super().__init__()
        if buffer_limit is None:
            buffer_limit = int(settings.GATEWAY.get("WS_BUFFER_FRAMES", 1000))
        self.buffer_limit = max(1, buffer_limit)
        self.close_timeout = close_timeout
        self._buffer: collections.deque[Frame] = collections.deque()
        self._waiting_telemetry: dict[str, Frame] = {}  # device → its frame still in _buffer
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._counted = False
        self._in_group = False
        self._too_slow = False
        self._sending = 0  # frames the writer is inside `send` with (the server may hold them)
        self._batches = False  # `batch` frames asked for (docs/interface.md §6.1)
        # A paged client (docs/interface.md §6.3 `view`): what it looks at, the ids on its page
        # (None: every device, the unpaged protocol), its last counts and page, the refresh.
        self._view: View | None = None
        self._visible: set[str] | None = None
        self._shown: tuple[tuple[str, ...], int] = ((), 0)
        self._counts: dict[str, Any] | None = None
        self._refresh: asyncio.TimerHandle | None = None
        self._refreshed_at = 0.0
        self._changed_at: float | None = None  # monotonic time of the oldest unshown change
        self._stale_timer: asyncio.TimerHandle | None = None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._teardown()

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Route by type, without Channels' per-message DB-connection thread hop.

        Only the snapshot touches the database and `database_sync_to_async` already closes
        stale connections around it (STYLE.md: the hop costs ~0.1 ms per message).
        """
        name = message["type"].replace(".", "_")
        handler = None if name.startswith("_") else getattr(self, name, None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']!r}")
        await handler(message)

    # --- connection lifecycle ---------------------------------------------------------------

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the server answers the handshake with 403
            return
        # Join first, so nothing that happens while we read the snapshot is missed.
        await self.channel_layer.group_add(GROUP, self.channel_name)
        self._in_group = True
        await self.accept()
        self._batches = _wants_batches(self.scope)
        WS_CLIENTS.inc()
        self._counted = True
        self._writer = asyncio.create_task(
            self._write_loop(), name=f"dashboard[{self.channel_name}].writer"
        )
        view, problem = _query_view(self.scope)
        if view is not None:
            self._view = view
            await self._send_view("snapshot")
            if problem is not None:
                self._error("bad_request", f"bad view in the URL ({problem}); showing the default")
            return
        await self._send_snapshot()

    async def _send_snapshot(self) -> None:
        """Every device (the unpaged protocol), as stored, with the values not written yet."""
        # Pending values first, then the DB: a value written in between is in the DB read, and
        # anything newer reaches us through the group we already joined.
        pending = _pending_devices()
        from devices.conventions.kinds import with_conventions

        devices = with_conventions(merge_snapshot(await _stored_devices(), pending))
        self._enqueue({"type": "snapshot", "devices": devices})

    async def _send_view(self, kind: str, ref: Any = None) -> None:
        """The view's page (a `snapshot` or `view` frame): its rows, total and the fleet counts.

        Runs inside the consumer's message loop, so no group frame is handled while it reads:
        frames newer than the read are handled after it, against the new page.
        """
        view = self._view
        assert view is not None
        if view.device is not None:  # a device page: its one device, known or not yet
            ids, total, offset, counts = [view.device], 1, 0, None
        else:
            fleet = await fleet_index().get(REFRESH_SECONDS)
            ids, total, offset = fleet.select(view)
            counts = fleet.counts()
            self._counts = counts
            self._arm_stale_timer(fleet.next_stale(time.time()))
        rows = await page_rows(ids)
        self._visible = set(ids)
        self._shown = (tuple(ids), total)
        frame: Frame = {
            "type": kind,
            "devices": rows,
            "view": {**view.as_dict(), "offset": offset, "total": total},
        }
        if counts is not None:
            frame["fleet"] = counts
        if ref is not None:
            frame["ref"] = ref
        self._enqueue(frame)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        await self._teardown()
        raise StopConsumer()

    async def _teardown(self) -> None:
        """Leave the group, stop the writer, uncount the client; safe to call twice."""
        for timer in (self._refresh, self._stale_timer):
            if timer is not None:
                timer.cancel()
        self._refresh = self._stale_timer = None
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        if self._in_group:
            self._in_group = False
            try:
                await self.channel_layer.group_discard(GROUP, self.channel_name)
            except Exception:  # the layer may be gone at shutdown; expiry cleans up
                logger.debug("group_discard failed", exc_info=True)
        if self._counted:
            self._counted = False
            WS_CLIENTS.dec()

    # --- server → client --------------------------------------------------------------------

    async def dashboard_events(self, message: dict[str, Any]) -> None:
        """A batch of frames from the pipeline or the command service, each sent on its own."""
        events = message.get("events")
        if not isinstance(events, list):
            logger.warning("dashboard.events without an events list: %r", message)
            return
        visible = self._visible
        for index, frame in enumerate(events):
            if not (isinstance(frame, dict) and isinstance(frame.get("type"), str)):
                logger.warning("dashboard.events: skipping a frame without a type: %r", frame)
                continue
            if frame["type"] == "rejection" and visible is None and not self._batches:
                continue  # a client that asks for nothing gets §6's frames and §8's alerts
            if visible is not None and frame["type"] in _FLEET_NEWS:
                self._mark_changed()
                if frame["type"] != "alert" and frame.get("device") not in visible:
                    continue  # not on this client's page: a set lookup, nothing sent
            if not self._enqueue(frame):
                WS_FRAMES_DROPPED.inc(len(events) - index - 1)  # the rest of this batch
                break
        if self._too_slow:
            await self._close_slow_client()

    async def dashboard_resync(self, message: dict[str, Any]) -> None:
        """The channel layer lost frames (Redis restarted): send a fresh snapshot to rebuild on."""
        if not self._counted or self._too_slow:
            return
        if self._view is not None:
            fleet_index().invalidate()
            await self._send_view("snapshot")
        else:
            await self._send_snapshot()

    # --- a paged client's counts and page, refreshed at a bounded rate ------------------------

    def _mark_changed(self) -> None:
        """Something in the fleet changed: refresh counts and page once `REFRESH_SECONDS` after
        the last refresh (a timer per client, armed only when something changed)."""
        if self._view is None or self._view.device is not None:
            return
        if self._changed_at is None:
            self._changed_at = time.monotonic()
        if self._refresh is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._refreshed_at + REFRESH_SECONDS - loop.time())
        self._refresh = loop.call_later(delay, self._post_refresh)

    def _arm_stale_timer(self, seconds: float | None) -> None:
        """Wake when the next silent online device turns stale, or a rejecting one stops
        rejecting (counts change with no frame)."""
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._stale_timer = loop.call_later(seconds + 0.5, self._mark_changed)

    def _post_refresh(self) -> None:
        # Through the consumer's own channel, so the refresh runs in order with group frames.
        self._refresh = None
        if self._counted and not self._too_slow:
            message = {"type": "dashboard.refresh"}
            task = asyncio.ensure_future(self.channel_layer.send(self.channel_name, message))
            task.add_done_callback(_log_failure)

    async def dashboard_refresh(self, message: dict[str, Any]) -> None:
        """New `fleet` counts if they changed; the page again if its devices or total did."""
        if self._view is None or self._view.device is not None or not self._counted:
            return
        self._refreshed_at = asyncio.get_running_loop().time()
        fleet = await fleet_index().get(REFRESH_SECONDS)
        if self._changed_at is not None and fleet.loaded < self._changed_at and not self._refresh:
            # The shared read predates the change: look again once it may be re-read.
            delay = fleet.loaded + REFRESH_SECONDS - time.monotonic() + 0.05
            self._refresh = asyncio.get_running_loop().call_later(delay, self._post_refresh)
        else:
            self._changed_at = None
        ids, total, _ = fleet.select(self._view)
        counts = fleet.counts()
        self._arm_stale_timer(fleet.next_stale(time.time()))
        if (tuple(ids), total) != self._shown:
            await self._send_view("view")  # carries the counts too
        elif counts != self._counts:
            self._counts = counts
            self._enqueue({"type": "fleet", "fleet": counts})

    def _enqueue(self, frame: Frame) -> bool:
        """Buffer a frame for the writer (or merge it); False (frame counted) once too slow."""
        if self._too_slow:
            WS_FRAMES_DROPPED.inc()
            return False
        if not self._counted:  # not accepted (yet) or already torn down
            return False
        device = frame.get("device")
        if frame["type"] == "telemetry" and isinstance(device, str):
            waiting = self._waiting_telemetry.get(device)
            if waiting is not None:
                waiting["metrics"].update(frame.get("metrics") or {})
                if frame.get("ts") is not None:
                    waiting["ts"] = frame["ts"]
                return True
            if len(self._buffer) < self.buffer_limit:
                # Merged into later: the layer gave this client its own copy of the frame.
                if not isinstance(frame.get("metrics"), dict):
                    frame = {**frame, "metrics": {}}
                self._waiting_telemetry[device] = frame
        elif isinstance(device, str):
            # A later frame for this device: merging past it would reorder the two.
            self._waiting_telemetry.pop(device, None)
        if len(self._buffer) >= self.buffer_limit:
            self._too_slow = True
            dropped = len(self._buffer) + 1
            self._buffer.clear()
            self._waiting_telemetry.clear()
            WS_FRAMES_DROPPED.inc(dropped)
            logger.warning(
                "dashboard client %s too slow: %d frames dropped, closing with %d",
                self.channel_name,
                dropped,
                CLOSE_SLOW_CLIENT,
            )
            return False
        self._buffer.append(frame)
        self._wakeup.set()
        return True

    async def _close_slow_client(self) -> None:
        """Stop feeding a client that fell behind and close it; it resyncs on reconnect."""
        if self._writer is not None:
            if self._sending:  # the frames the server is holding back never go out now
                WS_FRAMES_DROPPED.inc(self._sending)
                self._sending = 0
            self._writer.cancel()
            self._writer = None
        if self._in_group:
            self._in_group = False
            await self.channel_layer.group_discard(GROUP, self.channel_name)
        try:
            # The server may hold the close behind the full socket buffer; don't wait forever.
            await asyncio.wait_for(
                self.close(code=CLOSE_SLOW_CLIENT, reason="too slow"), self.close_timeout
            )
        except Exception:
            logger.info("closing slow client %s did not complete; leaving", self.channel_name)
            raise StopConsumer() from None

    async def _write_loop(self) -> None:
        """Write buffered frames in order; awaiting `send` is where socket backpressure lands."""
        try:
            while True:
                while not self._buffer:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                frame = self._take()
                carried = len(frame["frames"]) if frame["type"] == "batch" else 1
                try:
                    text = encode_frame(frame)
                except TypeError:
                    logger.exception("dropping frames that are not JSON: %r", frame)
                    WS_FRAMES_DROPPED.inc(carried)
                    continue
                self._sending = carried
                await self.send(text_data=text)
                self._sending = 0
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket went away; websocket.disconnect follows
            logger.debug("dashboard writer stopped", exc_info=True)

    def _pop(self) -> Frame:
        frame = self._buffer.popleft()
        device = frame.get("device")
        if isinstance(device, str) and self._waiting_telemetry.get(device) is frame:
            del self._waiting_telemetry[device]
        return frame

    def _take(self) -> Frame:
        """The next frame to write: for a client that asked for batches, the `telemetry` and
        `status` frames waiting in a row, as one `batch` frame when there are several."""
        frame = self._pop()
        buffer = self._buffer
        if not (self._batches and buffer and frame["type"] in BATCHED):
            return frame
        frames = [frame]
        while buffer and buffer[0]["type"] in BATCHED and len(frames) < BATCH_MAX_FRAMES:
            frames.append(self._pop())
        return {"type": "batch", "frames": frames} if len(frames) > 1 else frame

    # --- client → server --------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Client frames: a `command` goes to the command service; anything else gets an error."""
        if text_data is None:
            self._error("bad_request", "binary frames are not supported; send JSON text")
            return
        if len(text_data) > MAX_INBOUND_CHARS:
            self._error("bad_request", f"frame larger than {MAX_INBOUND_CHARS} characters")
            return
        try:
            content = orjson.loads(text_data)
        except orjson.JSONDecodeError:
            self._error("bad_request", "frame is not valid JSON")
            return
        if not isinstance(content, dict):
            self._error("bad_request", "frame must be a JSON object")
            return
        ref = content.get("ref")
        if not (isinstance(ref, (str, int, float)) and not isinstance(ref, bool)):
            ref = None
        elif isinstance(ref, str) and len(ref) > MAX_REF_CHARS:
            ref = None
        if content.get("type") == "command":
            await self.command(content, ref)
        elif content.get("type") == "view":
            await self.set_view(content, ref)
        else:
            kind = repr(content.get("type"))[:40]
            self._error(
                "bad_request", f"unknown frame type {kind}; expected 'command' or 'view'", ref
            )
        if self._too_slow:
            await self._close_slow_client()

    async def command(self, content: Frame, ref: Any) -> None:
        """Submit a `command` frame (`service.submit`). Its `pending` frame, echoing
        `ref`, reaches every dashboard, this one too; a refusal is an `error` frame here."""
        from devices.commands import service as commands

        device = content.get("device")
        if not isinstance(device, str) or not device:
            self._error("bad_request", "a command needs a device id", ref)
            return
        user = self.scope.get("user")
        # Checked first (has_perm may query the database): nothing reaches the device.
        if not await database_sync_to_async(commands.can_command)(user):
            self._error("forbidden", "you may not send commands", ref)
            return
        try:
            await commands.submit(user, device, content, ref=ref)
        except commands.CommandError as exc:
            self._error(exc.code, exc.message, ref)
        except Exception:
            logger.exception("command from %s failed", self.channel_name)
            self._error("internal", "the command could not be stored; try again", ref)

    async def set_view(self, content: Frame, ref: Any) -> None:
        """A `view` frame: from now on this client gets that page and only its devices' frames;
        a bad one is refused with an `error` frame and the current view stays."""
        try:
            view = parse_view(content)
        except BadView as exc:
            self._error("bad_request", f"bad view: {exc}", ref)
            return
        self._view = view
        await self._send_view("view", ref)

    def _error(self, code: str, message: str, ref: Any = None) -> None:
        frame: Frame = {"type": "error", "code": code, "message": message}
        if ref is not None:
            frame["ref"] = ref
        self._enqueue(frame)
