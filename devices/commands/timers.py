"""Command timers: one call_later per open command, recovered from the database on start.

A command is timed out exactly when it is due, with no polling: while pending at its hold TTL
(``expires_at``), once sent at ``sent_at + timeout``. One `CommandTimers` per event loop
(`get_timers()`); on first use it re-arms every open command in the database, so after a
restart overdue commands end ``timeout`` at once. A timer that fires early (clock) or for a
command sent again meanwhile re-arms for the new deadline; the transition itself is
conditional (devices/commands/states.py), so a timer racing an ack never ends a command twice.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from channels.db import database_sync_to_async
from django.utils import timezone

from devices.commands.states import announce, expire
from devices.models import FINAL_STATUSES, Command, CommandStatus
from gateway.loops import PerLoop

logger = logging.getLogger("devices.commands.service")  # logs as the command service


def _open_commands() -> list[Command]:
    return list(Command.objects.exclude(status__in=FINAL_STATUSES))


class CommandTimers:
    """Times out held and unacknowledged commands exactly when they are due (no polling)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._handles: dict[str, asyncio.TimerHandle] = {}
        self._recovered = self.loop.create_task(self._recover(), name="commands.recover")

    async def _recover(self) -> None:
        """After a (re)start: re-arm timers for every open command in the database."""
        try:
            for command in await database_sync_to_async(_open_commands)():
                if str(command.id) not in self._handles:
                    self.schedule(command)
        except Exception:
            logger.exception("could not recover open commands")

    def schedule(self, command: Command, within: float | None = None) -> None:
        """Arm the timer for the command's next deadline (hold TTL or ack timeout), or to
        check it `within` seconds if that is sooner."""
        if command.status == CommandStatus.SENT and command.sent_at:
            due: datetime = command.sent_at + timedelta(seconds=command.timeout)
        elif command.status == CommandStatus.PENDING:
            due = command.expires_at
        else:
            return
        key = str(command.id)
        self.cancel(key)
        delay = max(0.0, (due - timezone.now()).total_seconds()) + 0.01
        if within is not None:
            delay = min(delay, within + 0.01)
        self._handles[key] = self.loop.call_later(delay, self._fire, key)

    def cancel(self, key: str) -> None:
        """Disarm a command's timer (it has finished)."""
        if handle := self._handles.pop(key, None):
            handle.cancel()

    def _fire(self, key: str) -> None:
        self._handles.pop(key, None)
        self.loop.create_task(self._expire(key), name=f"commands.expire[{key}]")

    async def _expire(self, key: str) -> None:
        try:
            done, still_open = await database_sync_to_async(expire)(key)
            if done is not None:
                await announce(done)
            elif still_open is not None and key not in self._handles:
                self.schedule(still_open)  # fired early (clock) or re-sent: its new deadline
        except Exception:
            logger.exception("command %s: could not time out", key)

    def cancel_all(self) -> None:
        """Disarm every timer (shutdown, tests); the database keeps the deadlines."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
        self._recovered.cancel()


_timers: PerLoop[CommandTimers] = PerLoop(CommandTimers)


def current_timers() -> CommandTimers | None:
    """The running event loop's command timers if any were started (never starts them)."""
    return _timers.current()


def get_timers() -> CommandTimers:
    """The command timers of the running event loop, created (and recovered) on first use."""
    return _timers.get()
