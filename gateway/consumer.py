"""`BridgeConsumer`: what consumers of our own interface servers (`mqtt`, `serial`) share.

Like a WebSocket consumer, an instance has a channel name and may join groups (e.g.
`device.<id>`); unlike Channels' `AsyncConsumer` it makes no thread hop per event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from channels.consumer import AsyncConsumer, get_handler_name

logger = logging.getLogger(__name__)

JOIN_TIMEOUT = 2.0  # a channel layer (Redis) slower than this to join is retried in the background
REJOIN_MAX = 30.0


class BridgeConsumer(AsyncConsumer):
    """Joins its groups on the first event, leaves them however it ends; cheap dispatch."""

    #: Channel-layer groups this instance joins on start and leaves on stop.
    groups: ClassVar[list[str]] = []

    def get_groups(self) -> list[str]:
        """The groups to join; override to compute them from `self.scope`."""
        return list(self.groups)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the instance, leaving its groups whatever way it ends."""
        self._joined: list[str] | None = None
        self._rejoin: asyncio.Task[None] | None = None
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._rejoin is not None:
                self._rejoin.cancel()
            if self._joined:
                # Shielded: the server may be cancelling us after a retire grace period.
                await asyncio.shield(self._leave_groups())

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
            self._joined = []
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
                self._joined.append(group)

    async def _join_until_done(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self._join_groups()
                return
            except Exception:
                delay = min(delay * 2, REJOIN_MAX)
