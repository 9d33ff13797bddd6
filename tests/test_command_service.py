"""The command service (`devices.commands.service`) on the real database and in-memory layer."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.utils import timezone

from devices.commands import service as commands
from devices.commands.timers import get_timers
from devices.models import Command, Device
from gateway.metrics import COMMANDS
from tests.support.checks import dashboard_frame

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff(django_user_model):
    Device.objects.create(id="d1")
    return django_user_model.objects.create_user("ops", password="pw-ops-12345", is_staff=True)


@pytest.fixture
def gateway_settings(settings):
    """Change `settings.GATEWAY` keys for one test."""

    def change(**values):
        settings.GATEWAY = {**settings.GATEWAY, **values}

    return change


async def command_frame(layer, channel, status: str, wait: float = 5.0) -> dict:
    """The next `command` frame with this status on a dashboard channel."""
    return await dashboard_frame(
        layer, channel, lambda f: f["type"] == "command" and f["status"] == status, wait
    )


class Wire:
    """A transport's send coroutine that records what it put on the wire (or fails)."""

    def __init__(self, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.sent: list[dict] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, command: dict) -> None:
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.sent.append(command)


def count(status: str) -> float:
    return COMMANDS.labels(status=status)._value.get()


# --- creating: permission, input, rate, device ----------------------------------------------


def test_permission_staff_superuser_or_send_command(django_user_model):
    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-123")
    assert not commands.can_command(viewer)
    viewer.user_permissions.add(Permission.objects.get(codename="send_command"))
    viewer = django_user_model.objects.get(pk=viewer.pk)  # fresh permission cache
    assert commands.can_command(viewer)
    root = django_user_model.objects.create_superuser("root", password="pw-root-12345")
    assert commands.can_command(root)
    assert not commands.can_command(None)


def test_forbidden_user_stores_nothing(django_user_model):
    Device.objects.create(id="d1")
    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-123")
    with pytest.raises(commands.CommandError) as err:
        commands.create_command(viewer, "d1", {"name": "ping"})
    assert (err.value.code, err.value.status) == ("forbidden", 403)
    assert Command.objects.count() == 0


@pytest.mark.parametrize(
    "data",
    [
        [],
        {},
        {"name": ""},
        {"name": "bad name"},
        {"name": "x" * 65},
        {"name": "ping", "args": [1]},
        {"name": "ping", "args": "x"},
        {"name": "ping", "timeout": "5"},
        {"name": "ping", "timeout": True},
        {"name": "ping", "timeout": 0},
        {"name": "ping", "timeout": 10_000},
        {"name": "ping", "args": {"blob": "x" * 20_000}},
    ],
)
def test_bad_requests_are_refused(staff, data):
    with pytest.raises(commands.CommandError) as err:
        commands.create_command(staff, "d1", data)
    assert (err.value.code, err.value.status) == ("bad_request", 400)
    assert Command.objects.count() == 0


def test_stored_pending_with_defaults_and_override(staff, gateway_settings):
    gateway_settings(COMMAND_TIMEOUT=10.0, COMMAND_HOLD_SECONDS=300.0)
    plain = commands.create_command(staff, "d1", {"name": "ping"})
    assert (plain.status, plain.args, plain.timeout, plain.created_by) == (
        "pending",
        {},
        10.0,
        staff,
    )
    assert plain.expires_at - plain.created_at == timedelta(seconds=300)
    quick = commands.create_command(staff, "d1", {"name": "ping", "args": None, "timeout": 0.5})
    assert quick.timeout == 0.5 and quick.args == {}


def test_unknown_device_is_404(staff):
    with pytest.raises(commands.CommandError) as err:
        commands.create_command(staff, "nope", {"name": "ping"})
    assert (err.value.code, err.value.status) == ("unknown_device", 404)


def test_rate_limit_per_user_with_retry_after(staff, django_user_model, gateway_settings):
    gateway_settings(COMMAND_RATE_COUNT=3, COMMAND_RATE_SECONDS=60.0)
    for _ in range(3):
        commands.create_command(staff, "d1", {"name": "ping"})
    with pytest.raises(commands.CommandError) as err:
        commands.create_command(staff, "d1", {"name": "ping"})
    assert (err.value.code, err.value.status) == ("rate_limited", 429)
    assert "at most 3 commands per 60 s" in err.value.message
    assert 1 <= err.value.retry_after <= 60
    other = django_user_model.objects.create_user("ops2", password="pw", is_staff=True)
    commands.create_command(other, "d1", {"name": "ping"})  # the limit is per user
    # Commands older than the window no longer count.
    Command.objects.filter(created_by=staff).update(
        created_at=timezone.now() - timedelta(seconds=61)
    )
    commands.create_command(staff, "d1", {"name": "ping"})


def test_held_commands_per_device_are_bounded(staff, gateway_settings):
    gateway_settings(COMMAND_HOLD_MAX=2)
    commands.create_command(staff, "d1", {"name": "a"})
    commands.create_command(staff, "d1", {"name": "b"})
    with pytest.raises(commands.CommandError) as err:
        commands.create_command(staff, "d1", {"name": "c"})
    assert err.value.status == 429 and "2 commands waiting" in err.value.message


# --- delivery -------------------------------------------------------------------------------


async def test_submit_announces_pending_with_ref_and_reaches_the_device_group(
    staff, layer, dashboard
):
    device = await layer.new_channel()
    await layer.group_add("device.d1", device)
    command = await commands.submit(staff, "d1", {"name": "ping"}, ref="r-1")
    frame = await command_frame(layer, dashboard, "pending")
    assert frame == {
        "type": "command",
        "id": str(command.id),
        "device": "d1",
        "name": "ping",
        "status": "pending",
        "ref": "r-1",
    }
    async with asyncio.timeout(5):
        assert await layer.receive(device) == {"type": "device.command", "id": str(command.id)}


async def test_two_concurrent_deliveries_send_once(staff, layer, dashboard):
    command = await database_sync_to_async(commands.create_command)(staff, "d1", {"name": "x"})
    wire = Wire(delay=0.05)
    before = count("sent")
    results = await asyncio.gather(
        commands.deliver(command.id, wire), commands.deliver(command.id, wire)
    )
    assert sorted(results) == [False, True]
    assert wire.sent == [{"id": str(command.id), "name": "x", "args": {}}]
    assert count("sent") - before == 1
    stored = await Command.objects.aget(pk=command.id)
    assert stored.status == "sent"
    assert stored.created_at <= stored.sent_at <= timezone.now()


async def test_unavailable_transport_holds_then_delivers(staff, layer, dashboard):
    command = await database_sync_to_async(commands.create_command)(staff, "d1", {"name": "x"})
    assert not await commands.deliver(command.id, Wire(fail=ConnectionError("broker down")))
    stored = await Command.objects.aget(pk=command.id)
    assert (stored.status, stored.sent_at) == ("pending", None)
    wire = Wire()
    assert await commands.deliver(command.id, wire)
    assert len(wire.sent) == 1
    assert not await commands.deliver(command.id, wire), "never sent twice"


async def test_deliver_pending_in_order_skips_taken_stops_when_held(staff, layer, dashboard):
    create = database_sync_to_async(commands.create_command)
    first = await create(staff, "d1", {"name": "one"})
    taken = await create(staff, "d1", {"name": "two"})
    third = await create(staff, "d1", {"name": "three"})
    # Another bridge already sent the middle one.
    assert await commands.deliver(taken.id, Wire())
    wire = Wire()
    assert await commands.deliver_pending("d1", wire) == 2
    assert [c["id"] for c in wire.sent] == [str(first.id), str(third.id)]

    fourth = await create(staff, "d1", {"name": "four"})
    await create(staff, "d1", {"name": "five"})
    calls = Wire(fail=ConnectionError("gone"))
    assert await commands.deliver_pending("d1", calls) == 0
    held = await Command.objects.filter(status="pending").acount()
    assert held == 2, "both stay held; the first failure stops the round"
    assert (await Command.objects.aget(pk=fourth.id)).status == "pending"


# --- acks -----------------------------------------------------------------------------------


async def test_ack_ok_and_failed_and_unknown(staff, layer, dashboard):
    create = database_sync_to_async(commands.create_command)
    good = await create(staff, "d1", {"name": "set"})
    bad = await create(staff, "d1", {"name": "nope"})
    await commands.deliver_pending("d1", Wire())

    assert await commands.apply_ack("d1", str(good.id), True, {"seconds": 5}, "")
    frame = await command_frame(layer, dashboard, "acked")
    assert (frame["id"], frame["result"]) == (str(good.id), {"seconds": 5})
    assert await commands.apply_ack("d1", str(bad.id), False, None, "unknown command: 'nope'")
    frame = await command_frame(layer, dashboard, "failed")
    assert (frame["id"], frame["error"]) == (str(bad.id), "unknown command: 'nope'")

    stored = await Command.objects.aget(pk=good.id)
    assert (stored.status, stored.result) == ("acked", {"seconds": 5})
    assert stored.sent_at <= stored.finished_at <= timezone.now()
    # A second ack, an unknown id, a malformed id, another device's command: all ignored.
    assert not await commands.apply_ack("d1", str(good.id), False, None, "late")
    assert not await commands.apply_ack("d1", str(uuid.uuid4()), True, None, "")
    assert not await commands.apply_ack("d1", "not-a-uuid", True, None, "")
    await database_sync_to_async(Device.objects.create)(id="d2")
    other = await create(staff, "d2", {"name": "x"})
    await commands.deliver(other.id, Wire())
    assert not await commands.apply_ack("d1", str(other.id), True, None, "")
    assert (await Command.objects.aget(pk=good.id)).status == "acked"
    assert (await Command.objects.aget(pk=other.id)).status == "sent"


async def test_ack_for_a_pending_command_is_ignored(staff, layer, dashboard):
    command = await database_sync_to_async(commands.create_command)(staff, "d1", {"name": "x"})
    assert not await commands.apply_ack("d1", str(command.id), True, None, "")
    assert (await Command.objects.aget(pk=command.id)).status == "pending"


# --- timers ---------------------------------------------------------------------------------


async def test_no_ack_within_the_timeout_times_out(staff, layer, dashboard):
    data = {"name": "x", "timeout": 0.3}
    command = await database_sync_to_async(commands.create_command)(staff, "d1", data)
    assert await commands.deliver(command.id, Wire())
    frame = await command_frame(layer, dashboard, "timeout")
    assert frame["id"] == str(command.id)
    assert frame["error"] == "no acknowledgement from the device within 0.3 s"
    assert not await commands.apply_ack("d1", str(command.id), True, None, ""), "too late"


async def test_held_past_its_ttl_times_out_with_a_reason(staff, layer, dashboard, gateway_settings):
    gateway_settings(COMMAND_HOLD_SECONDS=0.3)
    command = await commands.submit(staff, "d1", {"name": "x"})
    frame = await command_frame(layer, dashboard, "timeout")
    assert frame["id"] == str(command.id)
    assert "not delivered" in frame["error"] and "0.3 s" in frame["error"]
    assert not await commands.deliver(command.id, Wire()), "a timed-out command is never sent"


async def test_release_after_the_ttl_passed_times_out(staff, layer, dashboard, gateway_settings):
    gateway_settings(COMMAND_HOLD_SECONDS=0.2)
    command = await commands.submit(staff, "d1", {"name": "x"})
    # The transport is stuck past the hold TTL and then fails: the command is not lost.
    assert not await commands.deliver(command.id, Wire(fail=ConnectionError(), delay=0.4))
    frame = await command_frame(layer, dashboard, "timeout")
    assert frame["id"] == str(command.id)


def _overdue_rows(user) -> tuple[Command, Command, Command]:
    now = timezone.now()
    common = {"device_id": "d1", "created_by": user, "timeout": 1.0}
    sent = Command.objects.create(
        id=uuid.uuid4(),
        name="was-sent",
        status="sent",
        created_at=now - timedelta(seconds=30),
        sent_at=now - timedelta(seconds=29),
        expires_at=now + timedelta(seconds=270),
        **common,
    )
    expired = Command.objects.create(
        id=uuid.uuid4(),
        name="held-too-long",
        created_at=now - timedelta(seconds=400),
        expires_at=now - timedelta(seconds=100),
        **common,
    )
    waiting = Command.objects.create(
        id=uuid.uuid4(),
        name="still-held",
        created_at=now,
        expires_at=now + timedelta(seconds=300),
        **common,
    )
    return sent, expired, waiting


async def test_timers_recover_open_commands_from_the_database(staff, layer, dashboard):
    """A fresh process (here: this test's loop) times out what was overdue while it was down."""
    sent, expired, waiting = await database_sync_to_async(_overdue_rows)(staff)
    get_timers()
    got = {}
    async with asyncio.timeout(5):
        while len(got) < 2:
            frame = await command_frame(layer, dashboard, "timeout")
            got[frame["id"]] = frame["error"]
    assert set(got) == {str(sent.id), str(expired.id)}
    assert "acknowledgement" in got[str(sent.id)]
    assert "not delivered" in got[str(expired.id)]
    assert (await Command.objects.aget(pk=waiting.id)).status == "pending"
    # The still-held one goes out when its device shows up.
    wire = Wire()
    assert await commands.deliver_pending("d1", wire) == 1
    assert wire.sent[0]["name"] == "still-held"
