"""The command service: who may send a command, and the calls that drive it to its end.

A command moves pending → sent → acked | failed | timeout (docs/interface.md §6.4). This module
checks a request (permission, input, the user's rate, the device's hold), stores it pending, then
drives it: `submit()`, `deliver()`, `deliver_pending()`, `apply_ack()`. Its neighbours in
`devices/commands/`: the conditional transitions (`states`), the deadline timers (`timers`) and
the batched held-command lookup (`held`); import their names from there.

The transport is someone else's business: a device consumer hands `deliver()` a coroutine that
puts the command on its wire (an MQTT publish, a serial line).
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from devices.commands.held import held_commands
from devices.commands.states import announce
from devices.commands.states import claim as _claim
from devices.commands.states import finish as _finish
from devices.commands.states import release as _release
from devices.commands.timers import get_timers
from devices.models import Command, CommandStatus, Device
from devices.storable import storable
from devices.telemetry.parsing import valid_device_id
from devices.telemetry.pipeline import flush_if_pending
from gateway.exceptions import GatewayError

__all__ = [
    "HOLD_MAX",
    "MAX_ARGS_BYTES",
    "NAME_RE",
    "PERMISSION",
    "TIMEOUT_RANGE",
    "CommandError",
    "SendCommand",
    "Unavailable",
    "apply_ack",
    "can_command",
    "create_command",
    "deliver",
    "deliver_pending",
    "parse_request",
    "submit",
]

logger = logging.getLogger(__name__)

_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # an escaped NUL in orjson's output
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")  # \Z: "$" would let "reboot\n" through
MAX_ARGS_BYTES = 16 * 1024
TIMEOUT_RANGE = (0.1, 3600.0)
PERMISSION = "devices.send_command"
#: Default bound on commands held (pending) per device; `GATEWAY["COMMAND_HOLD_MAX"]` overrides.
HOLD_MAX = 100

#: What a transport's send coroutine raises when it cannot deliver now (broker down, port
#: closed): the command goes back to pending and is re-driven later.
Unavailable = (ConnectionError, OSError)


class CommandError(GatewayError):
    """A command request refused; `code` is the WebSocket error code, `status` the HTTP one.

    `retry_after` (seconds) is set when waiting helps (rate limited).
    """

    def __init__(
        self, code: str, message: str, status: int = 400, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
        self.retry_after = retry_after


def can_command(user: Any) -> bool:
    """Whether `user` may send commands: staff, superusers, or the `send_command` permission."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    return bool(user.is_staff or user.is_superuser or user.has_perm(PERMISSION))


def parse_request(data: Any) -> tuple[str, dict, float | None]:
    """Validate `{"name": …, "args": {…}, "timeout"?: s}` into (name, args, timeout)."""
    if not isinstance(data, dict):
        raise CommandError("bad_request", "a command is a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CommandError("bad_request", "name must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    args = data.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError("bad_request", "args must be a JSON object")
    try:
        encoded = orjson.dumps(args)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise CommandError("bad_request", "args must be plain JSON") from exc
    if len(encoded) > MAX_ARGS_BYTES:
        raise CommandError("bad_request", f"args larger than {MAX_ARGS_BYTES} bytes")
    if _NUL.search(encoded):  # PostgreSQL's jsonb cannot store U+0000: a 400, not a 500
        raise CommandError("bad_request", "args must not contain NUL (U+0000) characters")
    timeout = data.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise CommandError("bad_request", "timeout must be a number of seconds")
        if not TIMEOUT_RANGE[0] <= timeout <= TIMEOUT_RANGE[1]:
            raise CommandError("bad_request", "timeout must be between 0.1 and 3600 seconds")
        timeout = float(timeout)
    return name, args, timeout


# -- creating ----------------------------------------------------------------------------


def _rate_limit() -> tuple[int, float]:
    return settings.GATEWAY["COMMAND_RATE_COUNT"], settings.GATEWAY["COMMAND_RATE_SECONDS"]


def _check_rate(user: Any, now: datetime) -> None:
    """Refuse a user's command past `COMMAND_RATE_COUNT` per `COMMAND_RATE_SECONDS`."""
    count, window = _rate_limit()
    recent = Command.objects.filter(
        created_by=user, created_at__gte=now - timedelta(seconds=window)
    ).order_by("-created_at")
    times = list(recent.values_list("created_at", flat=True)[:count])
    if len(times) >= count:
        # The oldest of the last `count` commands leaves the window first.
        wait = (times[-1] + timedelta(seconds=window) - now).total_seconds()
        wait = max(1.0, float(math.ceil(wait)))
        raise CommandError(
            "rate_limited",
            f"rate limit: at most {count} commands per {window:g} s; try again in {wait:g} s",
            status=429,
            retry_after=wait,
        )


def _check_held(device_id: str) -> None:
    """Refuse a command when the device already has `COMMAND_HOLD_MAX` waiting (the bound)."""
    limit = int(settings.GATEWAY.get("COMMAND_HOLD_MAX", HOLD_MAX))
    held = Command.objects.filter(device_id=device_id, status=CommandStatus.PENDING).count()
    if held >= limit:
        raise CommandError(
            "rate_limited",
            f"device {device_id!r} already has {held} commands waiting to be delivered; "
            "try again when it is back online",
            status=429,
            retry_after=float(settings.GATEWAY["COMMAND_TIMEOUT"]),
        )


def create_command(user: Any, device_id: str, data: Any) -> Command:
    """Check permission, input, the user's rate and the device's hold, then store it pending."""
    if not can_command(user):
        raise CommandError("forbidden", "you may not send commands", status=403)
    name, args, timeout = parse_request(data)
    user = getattr(user, "_wrapped", user)  # a request's/scope's lazy user object
    with transaction.atomic():  # SQLite: IMMEDIATE, so count-then-insert is serialised
        now = timezone.now()
        _check_rate(user, now)
        # An invalid id is never a device (and a NUL in it would break a PostgreSQL query).
        if not valid_device_id(device_id) or not Device.objects.filter(pk=device_id).exists():
            raise CommandError("unknown_device", f"no device {device_id!r}", status=404)
        _check_held(device_id)
        hold = settings.GATEWAY["COMMAND_HOLD_SECONDS"]
        return Command.objects.create(
            id=uuid.uuid4(),
            device_id=device_id,
            name=name,
            args=args,
            created_by=user,
            created_at=now,
            timeout=timeout if timeout is not None else settings.GATEWAY["COMMAND_TIMEOUT"],
            expires_at=now + timedelta(seconds=hold),
        )


async def submit(user: Any, device_id: str, data: Any, ref: Any = None) -> Command:
    """Create a command and start it on its way: dashboards hear `pending` (echoing `ref`),
    its hold timer is armed, and the device's consumer (group ``device.<id>``) gets a
    ``device.command`` to deliver now or when it can. CommandError when refused."""
    try:
        command = await database_sync_to_async(create_command)(user, device_id, data)
    except CommandError as exc:
        # A device heard a moment ago may still wait in this process's telemetry pipeline
        # (batched writes): write it, then try once more.
        if exc.code != "unknown_device" or not await flush_if_pending(device_id):
            raise
        command = await database_sync_to_async(create_command)(user, device_id, data)
    await announce(command, ref=ref)
    # Checked first one ack timeout from now (then re-armed for its real deadline): if the
    # bridge that sends it dies before that deadline, this process still times it out.
    get_timers().schedule(command, within=command.timeout)
    layer = get_channel_layer()
    if layer is not None:
        try:
            await layer.group_send(
                f"device.{device_id}", {"type": "device.command", "id": str(command.id)}
            )
        except Exception:  # stored and held: the consumer picks it up when the device shows up
            logger.exception("command %s: could not reach the device's consumer", command.id)
    return command


# -- delivery and acks (async) ------------------------------------------------

SendCommand = Callable[[dict[str, Any]], Awaitable[None]]
SENT, SKIPPED, HELD = "sent", "skipped", "held"


async def _deliver(command_id: Any, send: SendCommand) -> str:
    """One delivery attempt: SENT; SKIPPED (not pending: another took it, or it ended);
    HELD (the transport is unavailable, the command is pending again)."""
    command = await database_sync_to_async(_claim)(command_id)
    if command is None:
        return SKIPPED
    try:
        await send({"id": str(command.id), "name": command.name, "args": command.args})
    except Exception as exc:
        if isinstance(exc, Unavailable):
            logger.info("command %s held: %s", command.id, exc or type(exc).__name__)
        else:
            logger.exception("command %s: transport failed; held", command.id)
        released = await database_sync_to_async(_release)(command_id)
        if released is not None:
            get_timers().schedule(released)  # its hold TTL may have passed while claimed
        return HELD
    await announce(command)
    get_timers().schedule(command)
    return SENT


async def deliver(command_id: Any, send: SendCommand) -> bool:
    """Claim a pending command and put it on the wire with `send`; True if it was sent.

    Claimed first (pending → sent), so it is never sent twice; if `send` raises, it goes back
    to pending (its hold TTL still running) for the next try.
    """
    return await _deliver(command_id, send) == SENT


async def deliver_pending(device_id: str, send: SendCommand) -> int:
    """Send every pending command of a device, oldest first; how many went out.

    One query for the list, then one claim per command; stops at the first one the transport
    cannot take (the rest stay held). Also starts this loop's timers (restart recovery).
    """
    get_timers()
    sent = 0
    for command_id in await held_commands(device_id):
        outcome = await _deliver(command_id, send)
        if outcome == HELD:
            break
        sent += outcome == SENT
    return sent


async def apply_ack(device_id: str, command_id: str, ok: bool, result: Any, error: str) -> bool:
    """Finish a sent command from the device's ack; False for an unknown or finished id."""
    try:
        key = uuid.UUID(str(command_id))
    except ValueError:
        return False
    if ok:
        fields: dict[str, Any] = {"result": storable(result)}
        status = CommandStatus.ACKED
    else:
        fields = {"error": storable((error or "the device reported failure")[:2000])}
        status = CommandStatus.FAILED
    command = await database_sync_to_async(_finish)(key, device_id, status, **fields)
    if command is None:
        return False
    get_timers().cancel(str(key))
    await announce(command)
    return True
