"""Thousands of devices, one process: what a live device instance costs and asks for.

A bridge keeps one application instance per device; at 10,000 devices each byte and each
first-contact query counts (docs/performance.md). These tests pin the behaviour that keeps
them small: one task per instance, channel messages handed over without a receive task,
never two handlers at once, and one held-commands query for a fleet coming online together.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import time
import tracemalloc
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull

from devices.commands import held as held_lookups
from devices.commands import service as commands
from devices.models import Device
from gateway import layers
from gateway.mqtt import instances
from gateway.mqtt.consumer import MqttConsumer
from gateway.mqtt.instances import InstancePool
from gateway.mqtt.routing import Match

#: Set by a sender (think: a web request's thread-sensitive context) around its group_send.
SENDER: contextvars.ContextVar[str | None] = contextvars.ContextVar("SENDER", default=None)


class Recorder(MqttConsumer):
    """Records what it handles; `slow.event` waits on `gate` so overlaps would show."""

    groups = ["lean.test"]
    log: list[tuple[str, str]] = []
    gate: asyncio.Event | None = None

    handled: asyncio.Queue | None = None  # gets each test.event's "n" once handled

    async def test_event(self, message: dict[str, Any]) -> None:
        self.log.append(("start", message["n"]))
        self.log.append(("end", message["n"]))
        if self.handled is not None:
            self.handled.put_nowait(message["n"])

    async def slow_event(self, message: dict[str, Any]) -> None:
        self.log.append(("start", message["n"]))
        assert self.gate is not None
        await self.gate.wait()
        self.log.append(("end", message["n"]))

    async def context_event(self, message: dict[str, Any]) -> None:
        self.log.append(("context", SENDER.get()))

    async def boom_event(self, message: dict[str, Any]) -> None:
        raise RuntimeError("handler failed")


def match(key: str) -> Match:
    return Match(
        route="device", pattern="x/{device_id}", params={"device_id": key},
        key_params={"device_id": key}, instance_key=("device", key),
    )  # fmt: skip


def pool_for(app: Any) -> InstancePool:
    async def send(event: dict[str, Any]) -> None:
        pass

    return InstancePool(
        app, {"type": "mqtt"}, send, limit=16, idle_seconds=0, retire_grace=0.5,
        connect_event=lambda: {"type": "test.event", "n": "connect"},
    )  # fmt: skip


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_an_attached_channel_gets_each_group_message_as_a_copy(layer):
    got: list[dict] = []
    channel = await layer.new_channel()
    layer.attach(channel, got.append)
    await layer.group_add("g", channel)
    message = {"type": "x", "body": {"n": 1}}
    await layer.group_send("g", message)
    await layer.send(channel, {"type": "y"})
    assert got == [message, {"type": "y"}]
    assert got[0]["body"] is not message["body"], "a copy, as queued messages are"
    assert channel not in layer.channels, "no queue for an attached channel"
    layer.detach(channel)
    await layer.group_send("g", message)
    assert len(got) == 2


async def test_a_full_sink_misses_a_group_message_and_the_other_members_do_not(layer):
    def full(message: dict) -> None:
        raise ChannelFull("full")

    got: list[dict] = []
    a, b = await layer.new_channel(), await layer.new_channel()
    layer.attach(a, full)
    layer.attach(b, got.append)
    for channel in (a, b):
        await layer.group_add("g", channel)
    await layer.group_send("g", {"type": "x"})
    assert got == [{"type": "x"}]
    with pytest.raises(ChannelFull):
        await layer.send(a, {"type": "x"})


async def test_group_memberships_are_walked_for_expiry_only_once_a_minute():
    """One membership per device: the walk over all of them must not run on every send."""
    layer = layers.ThrottledInMemoryChannelLayer(group_expiry=3600)
    channel = await layer.new_channel()
    await layer.group_add("g", channel)
    await layer.group_send("g", {"type": "x"})  # the first sweep, nothing expired
    layer.groups["g"][channel] = time.time() - 7200  # joined two hours ago: expired
    layer._next_clean = 0.0
    await layer.group_send("g", {"type": "x"})  # a channel sweep, not a group walk
    assert channel in layer.groups["g"]
    layer._next_clean = layer._next_group_sweep = 0.0
    await layer.group_send("g", {"type": "x"})
    assert channel not in layer.groups["g"]


async def test_an_instance_is_one_task_and_handles_group_messages_while_idle(layer):
    Recorder.log = []
    pool = pool_for(Recorder.as_asgi())
    before = len(asyncio.all_tasks())
    pool._create(match("a"))
    pool._create(match("b"))
    await settle()
    assert len(asyncio.all_tasks()) - before == 2, "no receive tasks beside the instance"
    assert ("end", "connect") in Recorder.log

    await layer.group_send("lean.test", {"type": "test.event", "n": "group"})
    await settle()
    assert Recorder.log.count(("end", "group")) == 2
    assert len(asyncio.all_tasks()) - before == 2, "the short-lived handler task is gone"
    await pool.close(1.0)
    assert "lean.test" not in layer.groups or not layer.groups["lean.test"], "groups left"
    assert not layer._sinks, "channels detached"


async def test_a_channel_message_never_overlaps_the_event_being_handled(layer):
    Recorder.log, Recorder.gate = [], asyncio.Event()
    pool = pool_for(Recorder.as_asgi())
    inst = pool._create(match("a"))
    await settle()
    inst.put({"type": "slow.event", "n": "mqtt"})
    await settle()
    await layer.group_send("lean.test", {"type": "test.event", "n": "group"})
    await settle()
    assert Recorder.log[-1] == ("start", "mqtt"), "the group message waits"
    Recorder.gate.set()
    await settle()
    assert Recorder.log[-3:] == [("end", "mqtt"), ("start", "group"), ("end", "group")]

    # And the other way round: an event from the server waits for a channel message's handler.
    Recorder.gate = asyncio.Event()
    await layer.group_send("lean.test", {"type": "slow.event", "n": "group2"})
    await settle()
    inst.put({"type": "test.event", "n": "mqtt2"})
    await settle()
    assert Recorder.log[-1] == ("start", "group2")
    Recorder.gate.set()
    await settle()
    assert Recorder.log[-3:] == [("end", "group2"), ("start", "mqtt2"), ("end", "mqtt2")]
    await pool.close(1.0)


async def test_a_channel_message_is_handled_in_the_instance_context_not_the_senders(layer):
    Recorder.log = []
    pool = pool_for(Recorder.as_asgi())
    pool._create(match("a"))
    await settle()
    token = SENDER.set("a web request")
    try:
        await layer.group_send("lean.test", {"type": "context.event"})
    finally:
        SENDER.reset(token)
    await settle()
    assert ("context", None) in Recorder.log
    await pool.close(1.0)


async def test_a_failing_channel_message_handler_ends_the_instance_and_it_is_replaced(layer):
    Recorder.log = []
    pool = pool_for(Recorder.as_asgi())
    inst = pool._create(match("a"))
    await settle()
    await layer.group_send("lean.test", {"type": "boom.event"})
    await settle()
    assert inst.task is not None and inst.task.done()
    assert isinstance(inst.task.exception(), RuntimeError)
    assert not layer._sinks and not layer.groups.get("lean.test"), "cleaned up"
    await pool.close(1.0)


async def test_a_live_device_instance_costs_a_few_kilobytes(layer, transactional_db):
    """10,000 devices must fit a Raspberry Pi: a bound per idle instance, by tracemalloc."""
    from gateway.asgi import application

    pool = InstancePool(
        application, {"type": "mqtt", "client_id": "t"}, lambda event: None, limit=256,
        idle_seconds=0, retire_grace=0.5,
        connect_event=lambda: {"type": "mqtt.connect", "session_present": False},
    )  # fmt: skip
    router = application.application_mapping["mqtt"]
    for i in range(20):  # warm up: imports, caches, the command timers
        pool._create(router.resolve(f"devices/warm-{i}/status"))
    await asyncio.sleep(0.1)
    count = 500
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(count):
            pool._create(router.resolve(f"devices/lean-{i:04d}/status"))
        await settle()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_instance = sum(s.size_diff for s in after.compare_to(before, "filename")) / count
    assert per_instance < 4_000, f"{per_instance:.0f} bytes per live device instance"
    await pool.close(1.0)


@pytest.mark.django_db(transaction=True)
async def test_a_fleet_coming_online_together_asks_for_held_commands_once(
    layer, django_user_model, monkeypatch
):
    ids = [f"fleet-{i}" for i in range(30)]
    await Device.objects.abulk_create([Device(id=i) for i in ids])
    staff = await django_user_model.objects.acreate(username="ops", is_staff=True)
    create = database_sync_to_async(commands.create_command)
    held = await create(staff, "fleet-7", {"name": "one"})
    later = await create(staff, "fleet-7", {"name": "two"})
    queries: list[list[str]] = []
    real = held_lookups._pending_ids

    def counted(device_ids: list[str]) -> dict:
        queries.append(device_ids)
        return real(device_ids)

    monkeypatch.setattr(held_lookups, "_pending_ids", counted)
    wires: dict[str, list[dict]] = {i: [] for i in ids}

    async def come_online(device_id: str) -> int:
        async def send(command: dict) -> None:
            wires[device_id].append(command)

        return await commands.deliver_pending(device_id, send)

    sent = await asyncio.gather(*(come_online(i) for i in ids))
    assert len(queries) == 1 and sorted(queries[0]) == sorted(ids), "one query for the fleet"
    assert sum(sent) == 2
    assert [c["id"] for c in wires["fleet-7"]] == [str(held.id), str(later.id)], "oldest first"
    assert all(not wires[i] for i in ids if i != "fleet-7")

    # A device heard again later gets a fresh answer (commands stored since are seen).
    newer = await create(staff, "fleet-3", {"name": "three"})
    assert await come_online("fleet-3") == 1
    assert wires["fleet-3"] == [{"id": str(newer.id), "name": "three", "args": {}}]
    assert len(queries) == 2


async def test_a_started_pool_lets_per_message_objects_die_young(layer):
    """The GC's young generation is collected less often (not below a process's own choice)."""
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        pool = pool_for(Recorder.as_asgi())
        pool.start()
        assert gc.get_threshold() == (instances.GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(50_000, 10, 10)
        pool.start()
        assert gc.get_threshold()[0] == 50_000
        await pool.close(0.5)
    finally:
        gc.set_threshold(*saved)


async def test_with_redis_an_instance_gets_group_messages_without_a_receive_task(redis_server):
    """channels-redis' pub/sub layer (ours): an attached channel, unsubscribed when it ends."""
    from channels.layers import channel_layers

    layer = layers.ResyncingRedisPubSubChannelLayer(hosts=[redis_server.url])
    previous = channel_layers.set("lean-redis", layer)

    class RedisRecorder(Recorder):
        channel_layer_alias = "lean-redis"

    try:
        Recorder.handled = handled = asyncio.Queue()
        pool = pool_for(RedisRecorder.as_asgi())
        pool._create(match("r"))
        assert await asyncio.wait_for(handled.get(), 5) == "connect"  # groups joined first
        assert not [t for t in asyncio.all_tasks() if t.get_name().endswith(".read")]
        await layer.group_send("lean.test", {"type": "test.event", "n": "redis"})
        assert await asyncio.wait_for(handled.get(), 5) == "redis"
        loop_layer = layer._get_layer()
        [channel] = loop_layer.channels
        shard = loop_layer._get_shard(channel)
        assert channel in shard._subscribed_to
        await pool.close(1.0)
        await asyncio.wait_for(asyncio.gather(*layers._unsubscribing), 5)
        assert channel not in shard._subscribed_to
        assert not loop_layer.channels and not loop_layer.groups
    finally:
        Recorder.handled = None
        await layer.flush()
        channel_layers.set("lean-redis", previous)


async def test_a_busy_instance_lets_the_event_loop_turn_every_few_events(layer):
    Recorder.log = []
    pool = pool_for(Recorder.as_asgi())
    inst = pool._create(match("a"))
    await settle()
    for n in range(100):
        inst.put({"type": "test.event", "n": n})
    await asyncio.sleep(0)  # one turn of the loop: the instance ran once meanwhile
    handled = sum(1 for entry in Recorder.log if entry[0] == "end" and entry[1] != "connect")
    assert 0 < handled < 100, "queued events go in streaks, then the loop turns"
    assert handled <= instances.STREAK
    await settle()
    assert sum(1 for entry in Recorder.log if entry[0] == "end") == 101
    await pool.close(1.0)
