"""Helpers of the alert tests: a local HTTP receiver for Apprise ``json://`` notifications and
reading ``alert`` frames off a dashboard channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from tests.support.web import run_server


class Receiver:
    """An HTTP endpoint that records every JSON body POSTed to it (Apprise's json:// target)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self._arrived = asyncio.Condition()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.attempts += 1
        if self.status == 200:
            self.bodies.append(json.loads(raw))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        async with self._arrived:
            self._arrived.notify_all()

    async def wait_for(self, count: int, wait: float = 10.0) -> list[dict[str, Any]]:
        """Until `count` notifications arrived; returns them."""
        async with asyncio.timeout(wait):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.bodies) >= count)
        return self.bodies


@contextlib.asynccontextmanager
async def receiver(status: int = 200) -> AsyncIterator[tuple[Receiver, str]]:
    """A `Receiver` on a loopback port and its Apprise URL."""
    app = Receiver(status)
    async with run_server(app) as port:
        yield app, f"json://127.0.0.1:{port}/"


class AlertFrames:
    """The ``alert`` frames a dashboard channel receives, in order (other frames skipped)."""

    def __init__(self, layer: Any, channel: str) -> None:
        self.layer, self.channel = layer, channel
        self._waiting: list[dict[str, Any]] = []

    async def next(self, wait: float = 5.0) -> dict[str, Any]:
        """The next alert frame's ``alert``."""
        async with asyncio.timeout(wait):
            while not self._waiting:
                message = await self.layer.receive(self.channel)
                if message.get("type") == "dashboard.events":
                    self._waiting += [f["alert"] for f in message["events"] if f["type"] == "alert"]
        return self._waiting.pop(0)

    async def none_so_far(self) -> None:
        """No alert frame has reached the channel: a sentinel sent now comes back before any
        other message (a channel is first in, first out). For changes already emitted (after
        the evaluator's `flush`); a timer that must not fire wants a later timer as sentinel."""
        assert not self._waiting, f"unexpected alert frame {self._waiting[0]}"
        await self.layer.send(self.channel, {"type": "test.sentinel"})
        async with asyncio.timeout(5):
            while (message := await self.layer.receive(self.channel))["type"] != "test.sentinel":
                if message.get("type") == "dashboard.events":
                    alerts = [f["alert"] for f in message["events"] if f["type"] == "alert"]
                    assert not alerts, f"unexpected alert frame {alerts[0]}"
