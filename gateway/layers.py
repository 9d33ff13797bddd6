"""The in-memory channel layer, tuned for thousands of long-lived consumers.

Channels' `InMemoryChannelLayer` runs `_clean_expired()` — a walk over every channel and every
group membership — on each `send`, `receive` and `group_send`. With one consumer instance per
device that is O(devices) work per message: at 10,000 devices it was a quarter of the event
loop's time and the per-message cost grew from 99 to 1,317 µs (docs/performance.md). Expired
messages and memberships only need to go eventually, so we clean at most once a second.

`ResyncingRedisPubSubChannelLayer` (REDIS_URL set) tells local consumers when Redis came back,
since pub/sub drops what was published while it was away.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import msgpack
from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer
from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)
from channels_redis.utils import _wrap_close, create_pool
from redis import asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.metrics import CHANNEL_MESSAGES_DROPPED

CLEAN_INTERVAL = 1.0
GROUP_SWEEP_INTERVAL = 60.0
logger = logging.getLogger(__name__)


class ThrottledInMemoryChannelLayer(InMemoryChannelLayer):
    """`InMemoryChannelLayer` whose expiry sweep runs at most once per `CLEAN_INTERVAL` s,
    and whose channels can be `attach`ed: their messages go straight to a callback.

    `attach` is what lets a bridge instance (`gateway.consumer.BridgeConsumer`) have a channel
    and groups without a standing receive task and queue per device (docs/performance.md).
    Sends are synchronous underneath, so `group_send` makes no task per member either.
    """

    _next_clean = 0.0
    _next_group_sweep = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sinks: dict[str, Callable[[dict[str, Any]], None]] = {}

    def attach(self, channel: str, sink: Callable[[dict[str, Any]], None]) -> None:
        """Deliver every message for `channel` to `sink(message)` (a copy) as it is sent;
        `sink` may raise `ChannelFull` to refuse one."""
        self._sinks[channel] = sink

    def detach(self, channel: str) -> None:
        """Stop delivering to `channel`'s sink (its consumer has ended)."""
        self._sinks.pop(channel, None)

    async def flush(self) -> None:
        """Make the layer like new: no messages, groups or attached channels."""
        await super().flush()
        self._sinks = {}

    def _put(self, channel: str, copy: Callable[[], dict[str, Any]]) -> None:
        sink = self._sinks.get(channel)
        if sink is not None:
            sink(copy())
            return
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        if queue.full():
            raise ChannelFull(channel)
        queue.put_nowait((time.time() + self.expiry, copy()))

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send a message onto a channel (ChannelFull when its queue or sink is full)."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        self._put(channel, _copier(message))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every member of `group`; a full member misses it, the others do not."""
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        members = self.groups.get(group)
        if not members:
            return
        copy = _copier(message)
        for channel in list(members):
            try:
                self._put(channel, copy)
            except ChannelFull:
                _count_full(group, channel)

    def _clean_expired(self) -> None:
        """Drop expired messages (and their channels from groups) at most once a second;
        walk the group memberships (one per device) only every `GROUP_SWEEP_INTERVAL` s:
        they expire after days, and that walk was 3 % of the CPU at 10,000 devices."""
        now = time.monotonic()
        if now < self._next_clean:
            return
        self._next_clean = now + CLEAN_INTERVAL
        if now >= self._next_group_sweep:
            self._next_group_sweep = now + min(GROUP_SWEEP_INTERVAL, self.group_expiry / 2)
            super()._clean_expired()
            return
        wall = time.time()
        for channel, queue in list(self.channels.items()):
            expired = False
            while not queue.empty() and queue._queue[0][0] < wall:
                queue.get_nowait()
                expired = True
            if expired:
                self._remove_from_groups(channel)
                if queue.empty():
                    self.channels.pop(channel, None)


_next_full_log = 0.0


def _count_full(group: str, channel: str) -> None:
    """A member missed a group message: counted, and logged at most every 10 s."""
    global _next_full_log
    CHANNEL_MESSAGES_DROPPED.labels(group=group.split(".", 1)[0]).inc()
    now = time.monotonic()
    if now >= _next_full_log:
        _next_full_log = now + 10.0
        logger.warning("group %s: channel %s is full; a message dropped (counted)", group, channel)


def _copier(message: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Fresh copies of `message` for each receiver, made as channels-redis makes them (msgpack
    round trip: 4-5x faster than `deepcopy`, which cost ~15 µs per dashboard frame); a message
    msgpack cannot carry is deep-copied instead, so the in-memory layer stays permissive."""
    try:
        packed = msgpack.packb(message)
    except (TypeError, ValueError, OverflowError):
        return functools.partial(deepcopy, message)
    return functools.partial(msgpack.unpackb, packed, strict_map_key=False)


# --- Redis pub/sub: tell local consumers when the layer lost messages ---------------------


class ResyncingRedisPubSubChannelLayer(RedisPubSubChannelLayer):
    """channels-redis' pub/sub layer that tells local group members when Redis came back.

    Pub/sub keeps nothing for a subscriber that is away: what was published while the
    connection was down is gone (django/channels_redis#256). redis-py resubscribes when it
    reconnects; right after that, each local member of a group named in ``resync`` gets a
    message of the type given there (``{"dashboard": "dashboard.resync"}``), so it can rebuild
    its state instead of waiting for a reload.
    """

    def __init__(self, *args, resync: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resync = dict(resync or {})

    def attach(self, channel: str, sink: Callable[[dict[str, Any]], None]) -> None:
        """As `ThrottledInMemoryChannelLayer.attach`: messages for `channel` (subscribed by
        `new_channel`) go to `sink` as they arrive, with no queue and no receive task."""
        self._get_layer().channels[channel] = _Sink(channel, sink, self.deserialize)

    def detach(self, channel: str) -> None:
        """Stop delivering to `channel` and unsubscribe it (as a cancelled `receive` does)."""
        layer = self._get_layer()
        if isinstance(layer.channels.get(channel), _Sink):
            del layer.channels[channel]
            task = asyncio.get_running_loop().create_task(
                layer._get_shard(channel).unsubscribe(channel), name=f"{channel}.unsubscribe"
            )
            _unsubscribing.add(task)
            task.add_done_callback(_unsubscribing.discard)

    def _get_layer(self) -> RedisPubSubLoopLayer:
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = _ResyncingLoopLayer(
                *self._args, **self._kwargs, channel_layer=self
            )
            _wrap_close(self, loop)
        return layer


_unsubscribing: set[asyncio.Task[None]] = set()  # detach's unsubscriptions, kept referenced


class _Sink:
    """Stands in for an attached channel's queue: `put_nowait` hands the message over."""

    __slots__ = ("channel", "sink", "deserialize")

    def __init__(self, channel: str, sink: Callable[[dict[str, Any]], None], deserialize) -> None:
        self.channel, self.sink, self.deserialize = channel, sink, deserialize

    def put_nowait(self, data: bytes) -> None:
        try:
            self.sink(self.deserialize(data))
        except ChannelFull:
            CHANNEL_MESSAGES_DROPPED.labels(group="channel").inc()
            logger.warning("%s: channel backlog full; message dropped", self.channel)
        except Exception:  # never into the layer's receive loop (it would pause for 1 s)
            logger.exception("%s: could not hand a message over", self.channel)


class _ResyncingLoopLayer(RedisPubSubLoopLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shards = [_ResyncingShard(shard.host, self) for shard in self._shards]

    def resubscribed(self) -> None:
        """Queue each local member of a resync group its resync message (never raises)."""
        outer = self.channel_layer
        told = 0
        for group, message_type in outer.resync.items():
            data = outer.serialize({"type": message_type})
            for channel in self.groups.get(self._get_group_channel_name(group), ()):
                queue = self.channels.get(channel)
                if queue is not None:
                    queue.put_nowait(data)
                    told += 1
        logger.warning(
            "Redis channel layer reconnected and resubscribed; messages published while it "
            "was away are lost; %d local consumers asked to resync",
            told,
        )


class _ResyncingShard(RedisSingleShardConnection):
    """A shard whose subscriptions and publishes do not wait out a Redis that is known away.

    While the subscriber connection is down, a subscription (a consumer's new channel, a
    group_add) is only recorded, and redis-py replays it on reconnect; a publish fails at once
    (the caller counts it). So a device first heard during the outage is handled right away.
    """

    def _away(self) -> bool:
        conn = self._pubsub.connection if self._pubsub is not None else None
        return conn is not None and not conn.is_connected

    async def publish(self, channel, message) -> None:
        if self._away():
            raise RedisConnectionError("Redis is away (the subscriber connection is down)")
        await super().publish(channel, message)

    async def subscribe(self, channel) -> None:
        async with self._lock:
            if channel in self._subscribed_to:
                return
            self._ensure_redis()
            self._ensure_receiver()
            if not self._away():
                try:
                    await self._pubsub.subscribe(channel)
                    self._subscribed_to.add(channel)
                    return
                except (RedisConnectionError, RedisTimeoutError):
                    if self._pubsub.connection is None:
                        raise  # never connected: nothing would replay it
            # Recorded as redis-py records a subscription, so its on_connect replays it.
            self._pubsub.channels.update(self._pubsub._normalize_keys({channel: None}))
            self._subscribed_to.add(channel)

    async def unsubscribe(self, channel) -> None:
        if self._away():  # forget it, so the reconnect does not replay it
            async with self._lock:
                key = next(iter(self._pubsub._normalize_keys({channel: None})))
                self._pubsub.channels.pop(key, None)
                self._subscribed_to.discard(channel)
            return
        await super().unsubscribe(channel)

    def _ensure_redis(self) -> None:
        if self._redis is None:
            pool = create_pool(self.host)
            self._redis = aioredis.Redis(connection_pool=pool)
            self._pubsub = _NotifyingPubSub(pool, self.channel_layer.resubscribed)


class _NotifyingPubSub(PubSub):
    """A PubSub that calls `on_resubscribed()` after redis-py replayed its subscriptions."""

    def __init__(self, pool, on_resubscribed) -> None:
        super().__init__(pool)
        self._on_resubscribed = on_resubscribed

    async def on_connect(self, connection) -> None:
        await super().on_connect(connection)
        if self.channels or self.patterns:  # a reconnect (the first connect has none yet)
            # The idle publish connections died with the server too, and a PUBLISH written to
            # one can vanish without an error (seen: the first frame after a restart).
            await self.connection_pool.disconnect(inuse_connections=False)
            try:
                self._on_resubscribed()
            except Exception:
                logger.exception("Redis layer: resync notification failed")
