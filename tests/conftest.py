"""Fixtures shared by the whole suite: real brokers and Redis on free loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from channels.layers import get_channel_layer

from tests.support.runtime import stop_loop_services
from tests.support.servers import Mosquitto, Redis


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test fails: every test drives a real component that CI must install."""
    report = yield
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI ({reason}): install what it needs in bin/setup"
    return report


@pytest.fixture(scope="session", autouse=True)
def _test_database_leftovers():
    """Remove the SQLite test file's WAL companions Django leaves behind after destroying it."""
    yield
    from django.conf import settings

    name = settings.DATABASES["default"].get("TEST", {}).get("NAME")
    if name:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{name}{suffix}").unlink(missing_ok=True)


@pytest.fixture
def mosquitto():
    """A private mosquitto for one test; `.stop()`/`.start()` restart it on the same port."""
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def redis_server():
    """A private redis-server for one test; `.stop()`/`.start()` restart it on the same port."""
    with Redis() as server:
        yield server


@pytest.fixture
async def layer():
    """The process's in-memory channel layer, empty, for one test in its own event loop.

    On the way out it stops what the test's loop started lazily (the telemetry pipeline,
    command timers), so nothing of one test's loop leaks into the next.
    """
    channel_layer = get_channel_layer()
    await channel_layer.flush()
    yield channel_layer
    await stop_loop_services(channel_layer)


@pytest.fixture
async def dashboard(layer):
    """A channel in group `dashboard`, as one browser's consumer would be."""
    channel = await layer.new_channel()
    await layer.group_add("dashboard", channel)
    return channel
