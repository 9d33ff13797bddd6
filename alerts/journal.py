"""The evaluator's writes: transitions queued on the hot path, stored in order by one task.

The evaluator decides in memory and appends an operation here (sync, O(1)); the journal's task
applies everything queued in one thread hop (alerts/store.py: conditional transitions), then
emits what actually changed (alerts/outbox.py). While the database is away the operations wait
and are retried with backoff; past `LIMIT` waiting the oldest is dropped and counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import DatabaseError, connections

from alerts import store
from alerts.outbox import emit
from gateway.metrics import ALERT_DROPPED

logger = logging.getLogger(__name__)

LIMIT = 10_000
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
T = TypeVar("T")


class DatabaseThread:
    """The evaluator's own thread and database connection.

    Not Channels' shared thread (`database_sync_to_async`): a sync middleware holds that
    one while an async view awaits, so a view waiting for the evaluator would wait for itself.
    The connection is kept between calls and closed after a database error (the next call
    reconnects).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="alerts-db")

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` in the thread."""
        return await self.loop.run_in_executor(
            self._executor, functools.partial(self._call, func, *args)
        )

    @staticmethod
    def _call(func: Callable[..., T], *args: Any) -> T:
        try:
            return func(*args)
        except DatabaseError:
            connections.close_all()
            raise

    async def close(self) -> None:
        """Close the thread's connection and let the thread go."""
        try:
            await self.run(connections.close_all)
        except Exception:
            logger.debug("alerts: closing the database connection failed", exc_info=True)
        self._executor.shutdown(wait=False)


@dataclass(eq=False)
class Track:
    """One (rule, device) whose condition holds: pending (waiting out `for`) or active."""

    rule: Any  # CompiledRule
    device: str
    state: str  # "pending" | "active"
    since: float
    value: float | None
    id: int | None = None
    timer: asyncio.TimerHandle | None = None
    ended: bool = False


# An operation: (kind, track, value, at); kind is open | raise | cancel | clear.
Operation = tuple[str, Track, float | None, float]


def _apply(
    ops: list[Operation],
) -> tuple[int, list[store.Change], list[tuple[Track, int | None, str | None]]]:
    """Apply operations in order (writer thread): (how many done, changes, opened tracks)."""
    changes: list[store.Change] = []
    opened: list[tuple[Track, int | None, str | None]] = []
    done = 0
    for kind, track, value, at in ops:
        try:
            change = _apply_one(kind, track, value, at, opened)
        except DatabaseError as exc:  # away or locked: keep this and the rest for the retry
            logger.warning(
                "alert transitions: database error after %d of %d: %r", done, len(ops), exc
            )
            connections.close_all()
            break
        except Exception:  # a bug: retrying would loop forever
            logger.exception(
                "alert transition %s of %s/%s failed", kind, track.rule.id, track.device
            )
            change = None
        if change is not None:
            changes.append(change)
        done += 1
    return done, changes, opened


def _apply_one(
    kind: str,
    track: Track,
    value: float | None,
    at: float,
    opened: list[tuple[Track, int | None, str | None]],
) -> store.Change | None:
    if kind == "open":
        alert_id, state, change = store.open_alert(
            track.rule.id, track.device, track.state == "active", track.since, value, at
        )
        track.id = alert_id
        opened.append((track, alert_id, state))
        return change
    if track.id is None:
        return None  # its open failed for good (the rule is gone)
    if kind == "raise":
        change = store.raise_alert(track.id, value, at)
        if change is None:  # cancelled, cleared or raised by another process meanwhile
            opened.append((track, track.id, store.state_of(track.id)))
        return change
    if kind == "clear":
        return store.clear_alert(track.id, value, at)
    store.cancel_alert(track.id)
    return None


class Journal:
    """Queued transitions of one evaluator, stored and emitted by `run()`."""

    def __init__(
        self,
        database: DatabaseThread,
        on_opened: Callable[[Track, int | None, str | None], None],
    ) -> None:
        self._database = database
        self._ops: deque[Operation] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_opened = on_opened

    def add(self, kind: str, track: Track, value: float | None, at: float) -> None:
        """Queue one operation (sync, O(1)); the oldest is dropped and counted past `LIMIT`."""
        if len(self._ops) >= LIMIT:
            self._ops.popleft()
            ALERT_DROPPED.labels(reason="journal_full").inc()
        self._ops.append((kind, track, value, at))
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """The journal task: everything queued in one thread hop, then emit; retry on errors."""
        backoff = BACKOFF_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                ops = list(self._ops)
                done, changes, opened = await self._database.run(_apply, ops)
                for _ in range(done):
                    self._ops.popleft()
                for item in opened:
                    self._on_opened(*item)
                await emit(changes)
                if done < len(ops):
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                else:
                    backoff = BACKOFF_FIRST
            self._idle.set()

    async def flush(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """Wait until every queued operation is stored and emitted; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
