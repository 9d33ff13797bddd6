"""Fixtures shared by the whole suite: real brokers and Redis on free loopback ports."""

from __future__ import annotations

import pytest

from tests.support.servers import Mosquitto, Redis


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
