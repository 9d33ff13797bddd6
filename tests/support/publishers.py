"""Devices for tests: one publishing numbered readings, for counting what was stored against what
the broker acknowledged (durability, faults, broker restarts); one that can vanish without a
DISCONNECT, so that the broker publishes its Last Will."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import orjson


class NumberedPublisher:
    """A device publishing `{"n": 1}`, `{"n": 2}`, … at QoS 1 on `devices/<device>/telemetry`,
    one every `every` s (on a schedule: a slow publish is caught up), in the background.

    `acked` holds, in order, each n the broker acknowledged (PUBACK). Stopped by a flag, not
    cancel(): aiomqtt may swallow a cancellation mid-publish (the task never ends), or land it
    after the broker took a reading but before it was counted here. With `reconnect`, a lost
    connection is opened again as devices do, and a publish never acknowledged is retried with
    the same n; without, a lost connection fails the publisher (and `stop`). `stamp` adds the
    time as `ts`.
    """

    def __init__(
        self,
        port: int,
        device: str,
        *,
        every: float = 0.01,
        identifier: str | None = None,
        reconnect: bool = False,
        stamp: bool = False,
    ) -> None:
        self.port, self.device, self.every = port, device, every
        self.identifier = identifier or f"pub-{device}"
        self.reconnect, self.stamp = reconnect, stamp
        self.acked: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def last(self) -> int:
        """The highest n the broker acknowledged (0 before the first)."""
        return self.acked[-1] if self.acked else 0

    async def _session(self) -> None:
        topic = f"devices/{self.device}/telemetry"
        timeout = 2 if self.reconnect else 10  # a device that reconnects notices a loss soon
        async with aiomqtt.Client(
            "127.0.0.1", self.port, identifier=self.identifier, timeout=timeout
        ) as client:
            started, sent = time.monotonic(), 0
            while not self._stop.is_set():
                body: dict[str, Any] = {"n": self.last + 1}
                if self.stamp:
                    body["ts"] = time.time()
                await client.publish(topic, orjson.dumps(body), qos=1)
                self.acked.append(body["n"])
                sent += 1
                ahead = started + sent * self.every - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(ahead, 0))

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._session()
            except aiomqtt.MqttError:
                if not self.reconnect:
                    raise
                await asyncio.sleep(0.05)

    def start(self) -> NumberedPublisher:
        self._task = asyncio.create_task(self._run(), name=f"publisher[{self.device}]")
        return self

    async def stop(self) -> list[int]:
        """Stop once the publish in flight is settled; what the broker acknowledged."""
        assert self._task is not None
        self._stop.set()
        await asyncio.wait_for(self._task, 10)  # a publisher that failed fails the test
        return self.acked

    async def __aenter__(self) -> NumberedPublisher:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


_VANISHING = """
import sys, time
import paho.mqtt.client as paho
port, device = int(sys.argv[1]), sys.argv[2]
c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device)
c.will_set(f"devices/{device}/status", "offline", qos=1, retain=True)
c.connect("127.0.0.1", port, keepalive=5)
c.loop_start()
c.publish(f"devices/{device}/status", "online", qos=1, retain=True).wait_for_publish(5)
print("ready", flush=True)
time.sleep(120)
"""


@contextlib.asynccontextmanager
async def vanishing_device(port: int, device: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A device in a process of its own, once it has published `online` (retained) with
    `offline` as its Last Will; `.kill()` it to make it vanish without a DISCONNECT."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _VANISHING, str(port), device, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 15) == b"ready\n"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
