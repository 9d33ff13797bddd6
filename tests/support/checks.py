"""Looking at what the gateway did, from outside (retained messages, stored readings, counters,
what reached a channel), and holding its SQLite file the way another writer would (or breaking
the test database with SQL)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
from channels.db import database_sync_to_async
from django.db import connections
from prometheus_client import REGISTRY


async def first_message(port: int, topic: str, wait: float = 5.0) -> aiomqtt.Message:
    """What a brand-new subscriber to `topic` receives first (TimeoutError: nothing)."""
    identifier = f"probe-{secrets.token_hex(4)}"
    async with aiomqtt.Client("127.0.0.1", port, identifier=identifier, timeout=wait) as sub:
        await sub.subscribe(topic, qos=1)
        async with asyncio.timeout(wait):
            return await anext(sub.messages)


async def retained(port: int, topic: str, wait: float = 5.0) -> bytes:
    """The retained payload on `topic`, as a brand-new subscriber receives it first."""
    message = await first_message(port, topic, wait)
    assert message.retain, f"{topic}: a live message, not a retained one: {message.payload!r}"
    return bytes(message.payload)


def stored_numbers(db: Path, device: str, metric: str = "n") -> list[int]:
    """Stored values of `metric` for `device`, read straight from the gateway's SQLite file."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        rows = conn.execute(
            "SELECT value FROM devices_reading WHERE device_id = ? AND metric = ?",
            (device, metric),
        ).fetchall()
    return [int(value) for (value,) in rows]


def metric(name: str, **labels: str) -> float:
    """A sample of this process's Prometheus registry (0 when it has not been counted yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rejected(reason: str) -> float:
    """This process's `gateway_messages_rejected_total{reason}`."""
    return metric("gateway_messages_rejected_total", reason=reason)


@contextlib.contextmanager
def sqlite_locked(path: Path) -> Iterator[None]:
    """Another writer holding the SQLite file under an exclusive transaction (readers still
    read: the gateway's database is in WAL mode)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def nothing_came_before(layer: Any, channel: str) -> None:
    """Nothing has reached `channel`: a sentinel sent now is the first message it receives (a
    channel is first in, first out), so whatever ran before cannot have sent to it."""
    await layer.send(channel, {"type": "test.sentinel"})
    async with asyncio.timeout(5):
        first = await layer.receive(channel)
    assert first == {"type": "test.sentinel"}, f"{channel} received {first!r}"


async def dashboard_frame(
    layer: Any, channel: str, predicate: Callable[[dict], bool], wait: float = 10.0
) -> dict:
    """The first frame on a dashboard channel (``dashboard.events`` batches) that `predicate`
    accepts; the frames before it are skipped."""
    async with asyncio.timeout(wait):
        while True:
            message = await layer.receive(channel)
            assert message["type"] == "dashboard.events", message
            for frame in message["events"]:
                if predicate(frame):
                    return frame


async def sql(statement: str) -> None:
    """Run one SQL statement on the test database (to break or mend it under the gateway)."""

    def run() -> None:
        with connections["default"].cursor() as cursor:
            cursor.execute(statement)

    await database_sync_to_async(run)()
