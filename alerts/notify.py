"""Alert notifications through Apprise, off the ingest path: a bounded queue, retries, counts.

`get_notifier().submit(change)` is sync and never blocks: the change waits in a queue of
`QUEUE_LIMIT` (when full the oldest is dropped and counted in
``gateway_alert_dropped_total{reason="notify_queue_full"}``); one task per event loop sends
them in order, to the rule's URLs and ``GATEWAY_ALERT_NOTIFY_URLS``, retrying a failed send
`RETRIES` times with backoff; results are counted in
``gateway_alert_notifications_total{result="sent"|"failed"}``. Apprise is imported on the
first notification only (it costs a process ~40 MiB).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from django.conf import settings

from alerts.store import Change
from gateway.loops import PerLoop
from gateway.metrics import ALERT_DROPPED, ALERT_NOTIFICATIONS

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 1000
RETRIES = 3
BACKOFF_FIRST = 1.0


def message(change: Change) -> tuple[str, str, str]:
    """(title, body, Apprise notify type) of a change."""
    import apprise

    alert = change.alert
    verb = {"raised": "raised", "cleared": "cleared", "acknowledged": "acknowledged"}[change.kind]
    title = f"[{alert['severity']}] {alert['rule_name']} {verb} on {alert['device']}"
    value = "" if alert["value"] is None else f" (value {alert['value']:g})"
    body = f"Alert {alert['id']}: rule {alert['rule_name']!r} {verb} on {alert['device']}{value}."
    kind = apprise.NotifyType.SUCCESS if change.kind == "cleared" else apprise.NotifyType.FAILURE
    if change.kind == "raised" and alert["severity"] == "info":
        kind = apprise.NotifyType.INFO
    elif change.kind == "raised" and alert["severity"] == "warning":
        kind = apprise.NotifyType.WARNING
    return title, body, kind


class Notifier:
    """One loop's notification queue and its sending task."""

    def __init__(self) -> None:
        self.closed = False
        self._queue: deque[Change] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.backoff_first = BACKOFF_FIRST

    def submit(self, change: Change) -> None:
        """Queue a raised or cleared alert for its rule's and the global URLs (sync, O(1))."""
        urls = [*change.notify_urls, *settings.GATEWAY["ALERT_NOTIFY_URLS"]]
        if self.closed or not urls:
            return
        if len(self._queue) >= QUEUE_LIMIT:
            self._queue.popleft()
            ALERT_DROPPED.labels(reason="notify_queue_full").inc()
        self._queue.append(Change(change.kind, change.alert, urls))
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="alerts.notify")

    async def _run(self) -> None:
        while True:
            while self._queue:
                await self._send(self._queue.popleft())
            self._idle.set()
            self._wake.clear()
            await self._wake.wait()

    async def _send(self, change: Change) -> None:
        """Notify each URL on its own, so a failing target is retried without repeating the
        notification to the targets that already have it."""
        import apprise  # here, not at import: ~40 MiB that only a notifying process needs

        title, body, kind = message(change)
        for url in dict.fromkeys(change.notify_urls):
            target = apprise.Apprise()
            if not target.add(url):
                ALERT_NOTIFICATIONS.labels(result="failed").inc()
                logger.warning("alert notification: not an Apprise URL: %.80s", url)
                continue
            delay = self.backoff_first
            for attempt in range(RETRIES + 1):
                try:
                    ok = await target.async_notify(body=body, title=title, notify_type=kind)
                except Exception:
                    logger.exception("alert notification raised")
                    ok = False
                if ok:
                    ALERT_NOTIFICATIONS.labels(result="sent").inc()
                    break
                if attempt < RETRIES:
                    await asyncio.sleep(delay)
                    delay *= 2
            else:
                ALERT_NOTIFICATIONS.labels(result="failed").inc()
                logger.warning(
                    "alert %s: notification failed after %d tries", change.alert["id"], RETRIES + 1
                )

    async def flush(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """Wait until the queue is sent; False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop sending; what is still queued is dropped and counted."""
        self.closed = True
        if self._queue:
            ALERT_DROPPED.labels(reason="shutdown").inc(len(self._queue))
            self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        _notifiers.discard(asyncio.get_running_loop(), self)


_notifiers: PerLoop[Notifier] = PerLoop(Notifier, stale=lambda n: n.closed)


def get_notifier() -> Notifier:
    """The running loop's notifier, made on first use."""
    return _notifiers.get()


def current_notifier() -> Any:
    """The running loop's notifier if one was made (None otherwise)."""
    return _notifiers.current()
