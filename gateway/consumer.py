"""`BridgeConsumer`: what consumers of our own interface servers (`mqtt`, `serial`) share.

Like a WebSocket consumer, an instance has a channel name and may join groups (e.g.
`device.<id>`); unlike Channels' `AsyncConsumer` it makes no thread hop per event.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, ClassVar

from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import ChannelFull, StopConsumer
from channels.layers import get_channel_layer

from gateway.metrics import CHANNEL_MESSAGES_DROPPED

logger = logging.getLogger(__name__)

JOIN_TIMEOUT = 2.0  # a channel layer (Redis) slower than this to join is retried in the background
REJOIN_MAX = 30.0
#: Channel messages waiting while the instance handles an event; more are refused (ChannelFull).
CHANNEL_CAPACITY = 100


class BridgeConsumer(AsyncConsumer):
    """Joins its groups on the first event, leaves them however it ends; cheap dispatch."""

    #: Channel-layer groups this instance joins on start and leaves on stop.
    groups: ClassVar[list[str]] = []

    def get_groups(self) -> list[str]:
        """The groups to join; override to compute them from `self.scope`."""
        return list(self.groups)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the instance: events from `receive` and from its channel, one at a time.

        Channels' `AsyncConsumer` waits with `await_many_dispatch`: two standing receive
        tasks and an `asyncio.wait` per instance. A bridge runs one instance per device, so
        that was most of ~27 KB per idle device (docs/performance.md). Here the instance task
        is the only standing one: a layer that can `attach` a channel (ours, gateway/layers.py)
        hands its messages over as they are sent; any other layer gets one reader task.
        Either way, handlers never overlap: a channel message that arrives while the instance
        waits in `receive` is handled by a short-lived task the main loop waits for.
        """
        self.scope = scope
        self.base_send = send
        self._joined: tuple[str, ...] | None = None  # a tuple: 40 bytes less than a list
        self._rejoin: asyncio.Task[None] | None = None
        # Channel messages not yet handled (rare): a list only while there are some.
        self._inbox: list[dict[str, Any]] | None = None
        self._side: asyncio.Task[None] | None = None  # handling them while the loop waits
        self._waiting = False  # the main loop is in `await receive()`
        self._failure: BaseException | None = None  # raised by a channel message's handler
        self._main = asyncio.current_task()
        # The side task runs in this instance's context, not in the sender's (a web request's
        # thread-sensitive context must not carry the device's database calls).
        self._context = contextvars.copy_context()
        reader: asyncio.Task[None] | None = None
        layer = self.channel_layer = get_channel_layer(self.channel_layer_alias)
        if layer is not None:
            self.channel_name = await layer.new_channel()
            if hasattr(layer, "attach"):  # no local: this frame lives as long as the device
                layer.attach(self.channel_name, self._from_layer)
            else:
                reader = asyncio.create_task(self._read_layer(), name=f"{self.channel_name}.read")
        try:
            while True:
                self._waiting = True
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if self._failure is None:
                        raise
                    message = None
                finally:
                    self._waiting = False
                if self._side is not None:
                    await asyncio.shield(self._side)
                if self._failure is not None:
                    raise self._failure
                await self.dispatch(message)
                message = None  # not kept alive (payload and all) while the device is quiet
                while self._inbox:
                    await self.dispatch(self._inbox.pop(0))
                self._inbox = None
        except StopConsumer:
            pass
        finally:
            if layer is not None:
                detach = getattr(layer, "detach", None)
                if detach is not None:
                    detach(self.channel_name)
            for task in (reader, self._side, self._rejoin):
                if task is not None:
                    task.cancel()
            if self._joined:
                # Shielded: the server may be cancelling us after a retire grace period.
                await asyncio.shield(self._leave_groups())

    def _from_layer(self, message: dict[str, Any]) -> None:
        """A message on this instance's channel: handle it now if idle, else after the current
        event. Past the layer's capacity it is refused (`ChannelFull`), as a full queue is."""
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = []
        elif len(inbox) >= CHANNEL_CAPACITY:
            raise ChannelFull(self.channel_name)
        inbox.append(message)
        if self._waiting and self._side is None:
            self._side = asyncio.create_task(
                self._handle_inbox(), name=f"{self.channel_name}.side", context=self._context
            )

    async def _handle_inbox(self) -> None:
        """Handle channel messages while the main loop waits in `receive` (never overlapping)."""
        try:
            while self._inbox:
                await self.dispatch(self._inbox.pop(0))
            self._inbox = None
        except BaseException as exc:  # StopConsumer or a handler's error ends the instance
            self._failure = exc
            if self._waiting and self._main is not None:
                self._main.cancel()
        finally:
            self._side = None

    async def _read_layer(self) -> None:
        """For layers without `attach`: one task moving channel messages to `_from_layer`."""
        while True:
            message = await self.channel_layer.receive(self.channel_name)
            try:
                self._from_layer(message)
            except ChannelFull:
                CHANNEL_MESSAGES_DROPPED.labels(group="channel").inc()
                logger.warning("%s: channel backlog full; message dropped", self.channel_name)

    async def _leave_groups(self) -> None:
        for group in self._joined or ():
            await self.channel_layer.group_discard(group, self.channel_name)
        self._joined = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Call the handler for `message["type"]`, without Channels' per-message thread hop.

        `AsyncConsumer.dispatch` awaits `aclose_old_connections()` before every handler: a hop to
        a worker thread (~0.1 ms) to close stale database connections. These consumers never
        touch the database directly (readings go to the telemetry pipeline, which writes in
        batches from its own thread), so at thousands of messages per second that hop is pure
        cost. A subclass that does its own ORM calls must use `database_sync_to_async`.
        Groups are joined on the first event rather than on connect, because an instance can
        start with a message (MQTT) while the broker is down.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        if self._joined is None:
            self._joined = ()
            if self.channel_layer is not None:
                try:
                    async with asyncio.timeout(JOIN_TIMEOUT):
                        await self._join_groups()
                except Exception as exc:
                    # The layer (Redis) is down: the message is handled now, the groups later.
                    logger.warning(
                        "%s: joining groups failed (%r); retrying", self.channel_name, exc
                    )
                    self._rejoin = asyncio.create_task(
                        self._join_until_done(), name=f"bridge[{self.channel_name}].rejoin"
                    )
        await handler(message)

    async def _join_groups(self) -> None:
        for group in self.get_groups():
            if group not in self._joined:
                await self.channel_layer.group_add(group, self.channel_name)
                self._joined = (*self._joined, group)

    async def _join_until_done(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self._join_groups()
                return
            except Exception:
                delay = min(delay * 2, REJOIN_MAX)
