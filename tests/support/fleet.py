"""A fleet of known devices seeded straight into a gateway's database, for fleet-scale tests.

`seed_fleet` bulk-creates `count` devices (ids ``<prefix>-00000``…) with two readings each,
online and seen now except every `offline_every`-th one, in one `manage.py shell` run: 10,000
devices take a few seconds instead of the minutes publishing them would.
"""

from __future__ import annotations

import json
from typing import Any

SCRIPT = """
import json, os
from datetime import UTC, datetime, timedelta
from devices.models import Device, Reading
spec = json.loads(os.environ["GW_FLEET"])
now = datetime.now(UTC)
devices, readings = [], []
for i in range(spec["count"]):
    device_id = f"{spec['prefix']}-{i:05d}"
    online = not (spec["offline_every"] and i % spec["offline_every"] == 0)
    metrics = {"temperature": 20.0 + i % 10, "humidity": 40.0 + i % 7}
    devices.append(Device(id=device_id, online=online, last_seen=now, metrics=metrics))
    for k in (1, 0):
        for name, value in metrics.items():
            readings.append(Reading(device_id=device_id, metric=name, value=value,
                                    ts=now - timedelta(seconds=60 * k)))
Device.objects.bulk_create(devices, batch_size=2000)
Reading.objects.bulk_create(readings, batch_size=5000)
"""


def seed_fleet(gw: Any, count: int, prefix: str = "fleet", offline_every: int = 0) -> list[str]:
    """Create the devices in `gw`'s database (a `GatewayProcess`); returns their ids."""
    spec = {"count": count, "prefix": prefix, "offline_every": offline_every}
    gw.env["GW_FLEET"] = json.dumps(spec)
    try:
        gw.manage("shell", "-c", SCRIPT, timeout=300)
    finally:
        gw.env.pop("GW_FLEET", None)
    return [f"{prefix}-{i:05d}" for i in range(count)]
