"""The project's in-memory channel layer: long-lived group memberships, throttled sweeps."""

import asyncio
import time

import pytest
from channels.layers import get_channel_layer

from gateway import layers


async def test_a_membership_older_than_a_day_still_receives_group_messages(layer):
    assert isinstance(layer, layers.ThrottledInMemoryChannelLayer)
    channel = await layer.new_channel()
    await layer.group_add("device.d1", channel)
    layer.groups["device.d1"][channel] = time.time() - 3 * 86400  # joined three days ago
    layer._next_clean = 0.0  # let the next call sweep
    await layer.group_send("device.d1", {"type": "device.command", "id": "x"})
    assert (await asyncio.wait_for(layer.receive(channel), 2))["id"] == "x"


async def test_expired_messages_are_swept_at_most_once_a_second(monkeypatch):
    layer = get_channel_layer()
    await layer.flush()
    monkeypatch.setattr(layers, "CLEAN_INTERVAL", 3600.0)
    layer._next_clean = 0.0
    stale = await layer.new_channel()
    await layer.send(stale, {"type": "x"})
    await layer.group_send("nobody", {"type": "y"})  # sweeps (nothing expired yet)
    layer.channels[stale]._queue[0] = (time.time() - 1, {"type": "x"})  # now expired
    await layer.group_send("nobody", {"type": "y"})  # within the interval: no sweep
    assert stale in layer.channels
    layer._next_clean = 0.0
    await layer.group_send("nobody", {"type": "y"})
    assert stale not in layer.channels
    await layer.flush()


@pytest.fixture(autouse=True)
def fresh_sweep():
    yield
    get_channel_layer()._next_clean = 0.0
