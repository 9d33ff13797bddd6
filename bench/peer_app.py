"""The mqttasgi 2.0.0 peer: a minimal consumer that parses telemetry and group-sends it.

Runs only inside the bench's own virtualenv (``mqttasgi … bench.peer_app:PeerConsumer``), with
Django configured here (in-memory channel layer, no database). A listener channel in the
``dashboard`` group counts what arrives and prints ``progress <count> <epoch s>`` lines; the
bench reads them to compute the peer's rate.
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
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": "channels.layers.InMemoryChannelLayer",
                "CONFIG": {"capacity": 1_000_000, "expiry": 600},
            }
        },
    )
    django.setup()

from channels.layers import get_channel_layer  # noqa: E402
from mqttasgi.consumers import MqttConsumer  # noqa: E402

EXPECT = int(os.environ.get("BENCH_EXPECT", "0"))
QOS = int(os.environ.get("BENCH_QOS", "0"))
_listener: asyncio.Task | None = None


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
        """Subscribe and start the dashboard-group listener once."""
        global _listener
        if _listener is None:
            _listener = asyncio.get_running_loop().create_task(_listen())
        await self.subscribe("devices/+/telemetry", QOS)

    async def receive(self, mqtt_message: dict) -> None:
        """Parse the JSON payload and send it to the dashboard group, as a naive gateway would."""
        data = json.loads(mqtt_message["payload"])
        device = mqtt_message["topic"].split("/")[1]
        metrics = {k: v for k, v in data.items() if k != "ts"}
        frame = {"type": "telemetry", "device": device, "ts": data.get("ts"), "metrics": metrics}
        await self.channel_layer.group_send(
            "dashboard", {"type": "dashboard.events", "events": [frame]}
        )
