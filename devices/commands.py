"""Commands: who may send them, their lifecycle, and how everyone hears of each change.

A command moves pending → sent → acked | failed | timeout (CONTRACT §6). Every transition is a
conditional UPDATE (``WHERE status = <expected>``), so two processes racing on one command —
two bridges, a timer and an ack — can never both win: a command is sent at most once and ends
exactly once. Each change is pushed to every dashboard and counted in
``gateway_commands_total{status}``.

The transport is someone else's business: a device consumer hands `deliver()` a coroutine that
puts the command on its wire (an MQTT publish, a serial line).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import orjson
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from devices.models import FINAL_STATUSES, Command, CommandStatus, Device
from devices.parsing import valid_device_id
from devices.pipeline import flush_if_pending
from gateway.exceptions import GatewayError
from gateway.metrics import COMMANDS

logger = logging.getLogger(__name__)

_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # an escaped NUL in orjson's output
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")  # \Z: "$" would let "reboot\n" through
MAX_ARGS_BYTES = 16 * 1024
TIMEOUT_RANGE = (0.1, 3600.0)
PERMISSION = "devices.send_command"
#: Default bound on commands held (pending) per device; `GATEWAY["COMMAND_HOLD_MAX"]` overrides.
HOLD_MAX = 100
#: Device ids per query when looking up held commands for many devices at once.
LOOKUP_CHUNK = 500

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


# -- transitions (sync ORM; each one a conditional UPDATE) --------------------------------


def _transition(command_id: Any, expected: Iterable[str], **changes: Any) -> Command | None:
    """Apply `changes` if the command is still in one of `expected`; the new row, or None."""
    updated = Command.objects.filter(pk=command_id, status__in=list(expected)).update(**changes)
    return Command.objects.get(pk=command_id) if updated else None


def _claim(command_id: Any) -> Command | None:
    return _transition(
        command_id, [CommandStatus.PENDING], status=CommandStatus.SENT, sent_at=timezone.now()
    )


def _release(command_id: Any) -> Command | None:
    return _transition(command_id, [CommandStatus.SENT], status=CommandStatus.PENDING, sent_at=None)


def _finish(command_id: Any, device_id: str | None, status: str, **fields: Any) -> Command | None:
    qs = Command.objects.filter(pk=command_id, status=CommandStatus.SENT)
    if device_id is not None:
        qs = qs.filter(device_id=device_id)
    if not qs.update(status=status, finished_at=timezone.now(), **fields):
        return None
    return Command.objects.get(pk=command_id)


def _expire(command_id: Any) -> tuple[Command | None, Command | None]:
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
    done = _transition(
        command_id, [command.status], status=CommandStatus.TIMEOUT, finished_at=now, error=error
    )
    return done, None


def _pending_ids(device_ids: list[str]) -> dict[str, list[Any]]:
    """The pending commands of each device, oldest first: one query per `LOOKUP_CHUNK` ids."""
    found: dict[str, list[Any]] = {device_id: [] for device_id in device_ids}
    for start in range(0, len(device_ids), LOOKUP_CHUNK):
        rows = (
            Command.objects.filter(
                device_id__in=device_ids[start : start + LOOKUP_CHUNK],
                status=CommandStatus.PENDING,
            )
            .order_by("created_at")
            .values_list("device_id", "pk")
        )
        for device_id, pk in rows:
            found[device_id].append(pk)
    return found


def _open_commands() -> list[Command]:
    return list(Command.objects.exclude(status__in=FINAL_STATUSES))


# -- delivery, acks, announcements (async) ------------------------------------------------

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
    for command_id in await _lookups().pending(device_id):
        outcome = await _deliver(command_id, send)
        if outcome == HELD:
            break
        sent += outcome == SENT
    return sent


class _PendingLookups:
    """Batches "which commands are held for device X" into one query for many devices.

    Every device instance asks when its device comes online, so a fleet (re)connecting at
    once asked thousands of times, one query and one sync-thread hop each (finding 5 in
    docs/performance.md). Requests made while a lookup runs wait for the next one, so there
    is at most one query in flight and never one per device under load; always a fresh
    query, so commands stored by any process are seen.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[list[Any]]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def pending(self, device_id: str) -> list[Any]:
        """The ids of `device_id`'s pending commands, oldest first."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(device_id, []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="commands.pending-lookups")
        return await future

    async def _run(self) -> None:
        batch: dict[str, list[asyncio.Future[list[Any]]]] = {}
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    found = await database_sync_to_async(_pending_ids)(list(batch))
                except Exception as exc:
                    _settle(batch, error=exc)
                    continue
                _settle(batch, found=found)
        finally:
            self._task = None
            for pending in (batch, self._waiting):  # cancelled (loop closing): nobody hangs
                _settle(pending)


def _settle(
    batch: dict[str, list[asyncio.Future[list[Any]]]],
    found: dict[str, list[Any]] | None = None,
    error: Exception | None = None,
) -> None:
    """Resolve each waiter with its device's ids, or `error`, or cancel it (neither given)."""
    for device_id, futures in batch.items():
        for future in futures:
            if future.done():
                continue
            if found is not None:
                future.set_result(found[device_id])
            elif error is not None:
                future.set_exception(error)
            else:
                future.cancel()


_pending_lookups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _PendingLookups] = (
    weakref.WeakKeyDictionary()
)


def _lookups() -> _PendingLookups:
    loop = asyncio.get_running_loop()
    lookups = _pending_lookups.get(loop)
    if lookups is None:
        lookups = _pending_lookups[loop] = _PendingLookups()
    return lookups


async def apply_ack(device_id: str, command_id: str, ok: bool, result: Any, error: str) -> bool:
    """Finish a sent command from the device's ack; False for an unknown or finished id."""
    try:
        key = uuid.UUID(str(command_id))
    except ValueError:
        return False
    if ok:
        fields: dict[str, Any] = {"result": result}
        status = CommandStatus.ACKED
    else:
        fields = {"error": (error or "the device reported failure")[:2000]}
        status = CommandStatus.FAILED
    command = await database_sync_to_async(_finish)(key, device_id, status, **fields)
    if command is None:
        return False
    get_timers().cancel(str(key))
    await announce(command)
    return True


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


# -- timers: one call_later per open command, recovered from the database on start ----------


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
            done, still_open = await database_sync_to_async(_expire)(key)
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


_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CommandTimers] = (
    weakref.WeakKeyDictionary()
)


def current_timers() -> CommandTimers | None:
    """The running event loop's command timers if any were started (never starts them)."""
    return _timers.get(asyncio.get_running_loop())


def get_timers() -> CommandTimers:
    """The command timers of the running event loop, created (and recovered) on first use."""
    loop = asyncio.get_running_loop()
    timers = _timers.get(loop)
    if timers is None:
        timers = _timers[loop] = CommandTimers()
    return timers
