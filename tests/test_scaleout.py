"""Scale-out: several MQTT bridges (one shared subscription group) and several web workers on
one Redis and one PostgreSQL, all real processes on loopback.

The story: two `runmqtt --shared-group g` bridges split the devices' messages; each one is
stored exactly once; dashboards on either of two uvicorn workers see every device; a command
sent through one worker reaches its device whichever bridge serves it, and its ack reaches
both workers' dashboards; one bridge killed, the other takes all the traffic. Before that, the
parts that make two bridges agree: the device row upsert and the device consumers' state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiomqtt
import pytest
from channels.db import database_sync_to_async

from devices.models import Device
from devices.store import DeviceUpdate, write_batch
from tests.support.gateway import GatewayProcess, postgres_available, postgres_database

TS = 1_764_214_000.0


# --- two writers, batches committed in either order -----------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_an_older_batch_committed_later_never_overwrites_newer_values():
    write = database_sync_to_async(write_batch)
    # Bridge B's batch (newer) commits first ...
    await write([], {"d": DeviceUpdate("mqtt", True, TS + 2, {"t": 22.0}, TS + 2)})
    # ... then bridge A's older one: it only fills in the metric the row lacks.
    await write([], {"d": DeviceUpdate("mqtt", True, TS + 1, {"t": 21.0, "h": 40.0}, TS + 1)})
    device = await Device.objects.aget(pk="d")
    assert device.metrics == {"t": 22.0, "h": 40.0}
    assert device.last_seen.timestamp() == TS + 2

    # A Last Will heard before the newest reading (another bridge was slower) is old news ...
    await write([], {"d": DeviceUpdate("mqtt", False, None, {}, TS + 1.5)})
    assert (await Device.objects.aget(pk="d")).online is True
    # ... one heard after it is not.
    await write([], {"d": DeviceUpdate("mqtt", False, None, {}, TS + 3)})
    device = await Device.objects.aget(pk="d")
    assert device.online is False and device.last_seen.timestamp() == TS + 2

    # Newer values still win as before.
    await write([], {"d": DeviceUpdate("mqtt", True, TS + 4, {"t": 23.0}, TS + 4)})
    device = await Device.objects.aget(pk="d")
    assert (device.online, device.metrics) == (True, {"t": 23.0, "h": 40.0})
