"""The mqttasgi 2.0.0 peer: a minimal consumer that parses, stores and group-sends telemetry.

Runs only inside the bench's own virtualenv (``mqttasgi … bench.peer_app:PeerConsumer``), with
Django configured here (in-memory channel layer, a SQLite database in WAL mode as the
gateway's, at ``BENCH_PEER_DB``). Each message's values are stored (one transaction per
message, as a naive gateway would) before its frame goes to the ``dashboard`` group, so a
listener there counts readings stored *and* delivered, and prints
``progress <count> <epoch s>`` lines; the bench reads them to compute the peer's rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        INSTALLED_APPS=[],
        USE_TZ=True,
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": os.environ.get("BENCH_PEER_DB", "peer.sqlite3"),
                "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"},
            }
        },
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": "channels.layers.InMemoryChannelLayer",
                "CONFIG": {"capacity": 1_000_000, "expiry": 600},
            }
        },
    )
    django.setup()

from channels.db import database_sync_to_async  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from mqttasgi.consumers import MqttConsumer  # noqa: E402

EXPECT = int(os.environ.get("BENCH_EXPECT", "0"))
QOS = int(os.environ.get("BENCH_QOS", "0"))
_listener: asyncio.Task | None = None
_table = False


@database_sync_to_async
def _create_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS reading (device TEXT, metric TEXT, ts REAL, value REAL)"
        )


@database_sync_to_async
def _store(device: str, ts: float, metrics: dict) -> None:
    """One message's numeric values, in one transaction."""
    rows = [(device, k, ts, float(v)) for k, v in metrics.items() if isinstance(v, int | float)]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany("INSERT INTO reading VALUES (%s, %s, %s, %s)", rows)


async def _listen() -> None:
    """Count frames reaching the dashboard group; report progress twice a second."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("dashboard", channel)
    print("ready", flush=True)
    count, reported = 0, 0.0
    while True:
        message = await layer.receive(channel)
        count += len(message["events"])
        now = time.time()
        if count >= EXPECT or now - reported > 0.5:
            print(f"progress {count} {now}", flush=True)
            reported = now


class PeerConsumer(MqttConsumer):
    """Subscribes to all devices' telemetry; per message: parse, one group_send."""

    async def connect(self) -> None:
        """Create the table, subscribe and start the dashboard-group listener once."""
        global _listener, _table
        if not _table:
            await _create_table()
            _table = True
        if _listener is None:
            _listener = asyncio.get_running_loop().create_task(_listen())
        await self.subscribe("devices/+/telemetry", QOS)

    async def receive(self, mqtt_message: dict) -> None:
        """Parse the JSON payload, store it, send it to the dashboard group (a naive gateway)."""
        data = json.loads(mqtt_message["payload"])
        device = mqtt_message["topic"].split("/")[1]
        metrics = {k: v for k, v in data.items() if k != "ts"}
        await _store(device, data.get("ts") or time.time(), metrics)
        frame = {"type": "telemetry", "device": device, "ts": data.get("ts"), "metrics": metrics}
        await self.channel_layer.group_send(
            "dashboard", {"type": "dashboard.events", "events": [frame]}
        )
