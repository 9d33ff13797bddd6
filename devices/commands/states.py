"""A command's state changes: each one a conditional UPDATE, each one heard by every dashboard.

A command moves pending → sent → acked | failed | timeout (docs/interface.md §6.4). Every transition
here is ``UPDATE … WHERE status = <expected>``, so two processes racing on one command (two bridges,
a timer and an ack) can never both win: a command is sent at most once and ends exactly once.
`announce()` pushes a change to group ``dashboard`` and counts it in
``gateway_commands_total{status}``. The transitions are sync ORM calls (run them in the database
thread); the command service (devices/commands/service.py) and the timers
(devices/commands/timers.py) drive them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from channels.layers import get_channel_layer
from django.utils import timezone

from devices.models import Command, CommandStatus
from gateway.metrics import COMMANDS

logger = logging.getLogger("devices.commands.service")  # logs as the command service


def transition(command_id: Any, expected: Iterable[str], **changes: Any) -> Command | None:
    """Apply `changes` if the command is still in one of `expected`; the new row, or None."""
    updated = Command.objects.filter(pk=command_id, status__in=list(expected)).update(**changes)
    return Command.objects.get(pk=command_id) if updated else None


def claim(command_id: Any) -> Command | None:
    """pending → sent, before it goes on the wire (so it is never sent twice)."""
    return transition(
        command_id, [CommandStatus.PENDING], status=CommandStatus.SENT, sent_at=timezone.now()
    )


def release(command_id: Any) -> Command | None:
    """sent → pending again: the transport could not take it."""
    return transition(command_id, [CommandStatus.SENT], status=CommandStatus.PENDING, sent_at=None)


def finish(command_id: Any, device_id: str | None, status: str, **fields: Any) -> Command | None:
    """sent → acked | failed, from the ack of `device_id` (any device when None)."""
    qs = Command.objects.filter(pk=command_id, status=CommandStatus.SENT)
    if device_id is not None:
        qs = qs.filter(device_id=device_id)
    if not qs.update(status=status, finished_at=timezone.now(), **fields):
        return None
    return Command.objects.get(pk=command_id)


def expire(command_id: Any) -> tuple[Command | None, Command | None]:
    """Time out a command whose hold TTL (pending) or ack deadline (sent) has passed.

    Returns (timed-out command, None), or (None, still-open command) when it is not due yet
    (re-armed by the caller), or (None, None) when it has finished.
    """
    now = timezone.now()
    command = Command.objects.filter(pk=command_id).first()
    if command is None:
        return None, None
    if command.status == CommandStatus.PENDING and command.expires_at <= now:
        hold = (command.expires_at - command.created_at).total_seconds()
        error = f"not delivered: the device stayed offline or the broker unreachable for {hold:g} s"
    elif (
        command.status == CommandStatus.SENT
        and command.sent_at
        and command.sent_at + timedelta(seconds=command.timeout) <= now
    ):
        error = f"no acknowledgement from the device within {command.timeout:g} s"
    elif command.status in (CommandStatus.PENDING, CommandStatus.SENT):
        return None, command
    else:
        return None, None
    done = transition(
        command_id, [command.status], status=CommandStatus.TIMEOUT, finished_at=now, error=error
    )
    return done, None


async def announce(command: Command, ref: Any = None) -> None:
    """Push the command's current state to every dashboard and count the transition."""
    COMMANDS.labels(status=command.status).inc()
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(
            "dashboard", {"type": "dashboard.events", "events": [command.as_frame(ref=ref)]}
        )
    except Exception:
        logger.exception("command %s: could not notify dashboards", command.id)
