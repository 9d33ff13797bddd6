"""Fault: the database is locked or unreachable for a while, under a steady stream of readings.

The real gateway stores what a device publishes (QoS 1, a counter `n`); meanwhile another
process holds the SQLite file under ``BEGIN EXCLUSIVE``, or the PostgreSQL database refuses
connections. Readings wait in the telemetry pipeline's bounded buffer and are written once the
database is back, each exactly once. With a tiny buffer, what does not fit is dropped, counted
(``gateway_telemetry_dropped_total{reason="buffer_full"}``) and logged, never silently:
stored + dropped = published.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest

from tests.support.checks import sqlite_locked
from tests.support.gateway import (
    GatewayProcess,
    postgres_database,
)
from tests.support.publishers import NumberedPublisher
from tests.support.waiting import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = secrets.token_urlsafe(12)
DEVICE = "db-fault-1"
EVERY = 0.05  # 20 readings/s, one value each


def counting_device(port: int) -> NumberedPublisher:
    """The device: `{"n": 1}`, `{"n": 2}`, … at QoS 1, one every EVERY s, in the background."""
    return NumberedPublisher(port, DEVICE, every=EVERY, identifier="db-fault-device")


async def all_stored(gw: GatewayProcess, cookie: str, published: int) -> list[int]:
    """The stored counters once there are `published` of them (fails naming what is missing)."""
    try:
        return await until(
            lambda: (v := stored_values(gw, cookie)) and len(v) >= published and v,
            wait=30,
            what="every reading stored",
        )
    except AssertionError:
        absent = sorted(set(range(1, published + 1)) - set(stored_values(gw, cookie)))
        raise AssertionError(f"{len(absent)} readings never stored: {absent[:50]}") from None


def stored_values(gw: GatewayProcess, cookie: str) -> list[int]:
    return [int(v) for _, v in gw.history(cookie, DEVICE, "n")]


def sqlite_path(gw: GatewayProcess) -> Path:
    return Path(gw.database_url.removeprefix("sqlite:///"))


async def hold(seconds: float, gw: GatewayProcess) -> float:
    """Keep the fault for `seconds`; returns how far `gateway_telemetry_stored_total` moved."""
    before = gw.metric("gateway_telemetry_stored_total")
    await asyncio.sleep(seconds)
    return gw.metric("gateway_telemetry_stored_total") - before


async def test_sqlite_locked_for_seconds_then_every_reading_is_stored_once(mosquitto):
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        async with counting_device(mosquitto.port) as device:
            await until(lambda: stored_values(gw, cookie), what="the first reading stored")
            with sqlite_locked(sqlite_path(gw)):
                locked_at = device.last
                moved = await hold(6.0, gw)
                during = device.last - locked_at
            await asyncio.sleep(1.0)
        published = device.last

        values = await all_stored(gw, cookie, published)
        assert moved == 0, "the writer stored values through an exclusive lock?"
        assert during >= 60, f"only {during} readings published during the 6 s lock"
        assert sorted(values) == list(range(1, published + 1))
        assert gw.metric("gateway_telemetry_dropped_total", 'reason="buffer_full"') == 0
        print(f"\nSQLite locked 6 s: {during} readings buffered, all {published} stored once")


async def test_a_full_buffer_drops_the_oldest_counts_and_logs_them(mosquitto):
    limit = 20
    env = {"GATEWAY_TELEMETRY_BUFFER_LIMIT": str(limit)}
    with GatewayProcess(mosquitto.url, env=env) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        async with counting_device(mosquitto.port) as device:
            await until(lambda: stored_values(gw, cookie), what="the first reading stored")
            with sqlite_locked(sqlite_path(gw)):
                await hold(4.0, gw)
            await asyncio.sleep(1.0)
        published = device.last

        def settled() -> tuple[list[int], float] | None:
            values = stored_values(gw, cookie)
            dropped = gw.metric("gateway_telemetry_dropped_total", 'reason="buffer_full"')
            return (values, dropped) if len(values) + dropped >= published else None

        values, dropped = await until(settled, wait=30, what="stored + dropped = published")
        assert dropped > 0
        assert len(values) + dropped == published, "a reading vanished without being counted"
        assert len(set(values)) == len(values), "a reading stored twice"
        gw.wait_for_log(rf"telemetry buffer full \({limit} values\): dropped the \d+ oldest")
        # The oldest went: what is stored is a prefix written before the lock and the newest.
        missing = sorted(set(range(1, published + 1)) - set(values))
        assert missing == list(range(missing[0], missing[0] + len(missing))), missing
        print(f"\nbuffer of {limit} values, SQLite locked 4 s: {dropped:.0f} dropped (counted)")


@pytest.mark.postgres
async def test_postgresql_refusing_connections_then_every_reading_is_stored_once(mosquitto):
    import psycopg

    from tests.support.gateway import _dsn, postgres_admin_url

    with (
        postgres_database() as url,
        GatewayProcess(mosquitto.url, database_url=url) as gw,
    ):
        name = url.rsplit("/", 1)[1]
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        admin = psycopg.connect(_dsn(postgres_admin_url(), "postgres"), autocommit=True)
        try:
            async with counting_device(mosquitto.port) as device:
                await until(lambda: stored_values(gw, cookie), what="the first reading stored")
                # The database goes away: existing sessions cut, new ones refused.
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
                down_at = device.last
                await until(lambda: gw.http_get("/healthz")[0] == 503, what="/healthz 503")
                await asyncio.sleep(4.0)
                during = device.last - down_at
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                back = time.monotonic()
                await asyncio.sleep(1.0)
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.close()
        published = device.last

        values = await all_stored(gw, cookie, published)
        caught_up = time.monotonic() - back
        assert during >= 40, f"only {during} readings published while the database was away"
        assert sorted(values) == list(range(1, published + 1))
        assert gw.metric("gateway_telemetry_dropped_total", 'reason="buffer_full"') == 0
        gw.wait_for_log(r"telemetry write of \d+ values failed")
        await until(lambda: gw.http_get("/healthz")[0] == 200, what="/healthz 200 again")
        print(
            f"\nPostgreSQL refusing connections ~5 s: {during} readings buffered, all "
            f"{published} stored once, caught up within {caught_up:.1f} s"
        )
