"""Hostile or broken publishers cannot stall, exhaust or poison the gateway (docs/reliability.md).

Each story replays an attack through a real mosquitto into a real `rungateway` process while an
unaffected device keeps publishing one reading every 50 ms: its readings must keep reaching a
logged-in dashboard within a second (stretched by the load per core on a busy machine,
tests/support/timing.py), all of them must be stored, every refused message is counted by reason,
nothing permanent is left behind for the refused input, and the process's memory stays within the
bound docs/reliability.md states.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import aiomqtt
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.hostile import (
    Probe,
    births,
    invalid_ids,
    invented_metrics,
    new_ids,
    publish_all,
    rejected,
    rss,
)
from tests.support.timing import allowance
from tests.support.waiting import until

pytestmark = pytest.mark.e2e

PASSWORD = secrets.token_urlsafe(12)


@pytest.fixture
def gateway(mosquitto):
    with GatewayProcess(mosquitto.url) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        yield gw, gw.login("operator", PASSWORD)


async def under_attack(
    gw: GatewayProcess, port: int, cookie: str, messages: list, reason: str, refused: int
) -> tuple[Probe, float, int]:
    """Publish `messages` while the probe runs, until `refused` of them are counted under
    `reason`; (the probe, its p99 meanwhile, the RSS growth)."""
    before = rejected(gw, reason)
    async with Probe(gw, port, cookie).running() as probe:
        await asyncio.sleep(1.0)
        rss_before = rss(gw)
        await publish_all(port, "hostile", messages)
        await until(lambda: rejected(gw, reason) - before >= refused, what=f"{reason} counted")
        await asyncio.sleep(1.0)  # the probe keeps timing once the attack is handled
        growth = rss(gw) - rss_before
        latency = probe.p99()
    # Sentinel: the attack's last message once more, from the same client, is counted next;
    # the attack itself was counted by then, each message past the bound once.
    await publish_all(port, "hostile", messages[-1:])
    await until(lambda: rejected(gw, reason) - before > refused, what="the sentinel counted")
    assert rejected(gw, reason) - before == refused + 1, "every message past the bound, no more"
    return probe, latency, growth


async def test_invalid_device_ids_cost_no_instance_and_no_memory(mosquitto, gateway):
    """5,000 QoS 1 publishes to 60,000-character ids: refused before any instance exists."""
    gw, cookie = gateway
    attack = invalid_ids(5000, 60_000)
    probe, latency, growth = await under_attack(
        gw, mosquitto.port, cookie, attack, "bad_device_id", 5000
    )
    assert growth < 20 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB (bound: 20 MiB)"
    assert latency < allowance(1.0), f"p99 {latency:.3f} s while attacked"
    await probe.all_stored()
    status, devices = gw.http_get("/api/devices/", cookie)
    assert status == 200 and [d["id"] for d in devices] == ["probe"], "no rows for refused ids"


async def test_a_flood_of_new_device_ids_is_admitted_at_the_configured_rate(mosquitto):
    """2,000 new valid ids at once: a bucket of ten seconds' worth, then the rate; the rest
    refused and counted, no row for them, and the unaffected device keeps its pace."""
    env = {"GATEWAY_NEW_DEVICES_PER_SECOND": "10"}
    with GatewayProcess(mosquitto.url, env=env) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        cookie = gw.login("operator", PASSWORD)
        before = rejected(gw, "not_admitted")
        async with Probe(gw, mosquitto.port, cookie).running() as probe:
            await asyncio.sleep(0.5)
            started = time.monotonic()
            await publish_all(mosquitto.port, "flood", new_ids(2000, "flood"))
            await until(
                lambda: rejected(gw, "not_admitted") - before >= 1500, what="the flood refused"
            )
            elapsed = time.monotonic() - started
            await asyncio.sleep(1.0)
            latency = probe.p99()
        await probe.all_stored()
        status, devices = gw.http_get("/api/devices/", cookie)
        flood_rows = sum(1 for d in devices if d["id"].startswith("flood-"))
        refused = rejected(gw, "not_admitted") - before
    assert flood_rows + refused == 2000, (flood_rows, refused)
    # The probe took one token; ten seconds' worth (100) plus 10 per second since.
    assert 90 <= flood_rows <= 100 + 10 * (elapsed + 2), (flood_rows, elapsed)
    assert latency < allowance(1.0), f"p99 {latency:.3f} s while flooded"


async def test_the_known_policy_admits_only_devices_created_beforehand(mosquitto):
    with GatewayProcess(mosquitto.url, env={"GATEWAY_DEVICE_ADMISSION": "known"}) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        gw.manage(
            "shell", "-c", "from devices.models import Device; Device.objects.create(id='made-1')"
        )
        gw.stop()
        gw.start(migrate=False)  # the registry is read before subscribing
        cookie = gw.login("operator", PASSWORD)
        before = rejected(gw, "not_admitted")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="pub") as pub:
            await pub.publish("devices/stranger/telemetry", b'{"t": 1}', qos=1)
            await pub.publish("devices/made-1/telemetry", b'{"t": 2}', qos=1)
        await until(lambda: gw.history(cookie, "made-1", "t"), what="made-1 stored")
        assert rejected(gw, "not_admitted") - before == 1
        status, devices = gw.http_get("/api/devices/", cookie)
        assert [d["id"] for d in devices] == ["made-1"]


async def test_a_device_inventing_metric_names_is_bounded(mosquitto, gateway):
    """200 messages of 256 new 185-character names each, to one device: it keeps 500."""
    gw, cookie = gateway
    attack = invented_metrics(200, 256)
    probe, latency, growth = await under_attack(
        gw, mosquitto.port, cookie, attack, "too_many_metrics", 199
    )
    await probe.all_stored()
    status, devices = gw.http_get("/api/devices/", cookie)
    inventor = next(d for d in devices if d["id"] == "inventor")
    assert len(inventor["metrics"]) == 500, "the first 500 names, no more"
    assert growth < 60 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB (bound: 60 MiB)"
    assert latency < allowance(1.0), f"p99 {latency:.3f} s while attacked"


async def test_a_birth_storm_does_not_delay_other_devices(mosquitto):
    """262 Home Assistant births (QoS 1) with 2,000 known devices: readings keep flowing."""
    env = {"GATEWAY_NEW_DEVICES_PER_SECOND": "10000"}
    with GatewayProcess(mosquitto.url, env=env) as gw:
        gw.create_user("operator", PASSWORD, staff=True)
        await birth_storm(gw, gw.login("operator", PASSWORD), mosquitto.port)


async def birth_storm(gw: GatewayProcess, cookie: str, port: int) -> None:
    await publish_all(port, "fleet", new_ids(2000, "known"))
    await until(lambda: len(gw.http_get("/api/devices/", cookie)[1]) >= 2000, what="2,000 devices")
    async with Probe(gw, port, cookie).running() as probe:
        await asyncio.sleep(0.5)
        await publish_all(port, "storm", births(262))
        await asyncio.sleep(3.0)
        latency = probe.p99()
    await probe.all_stored()
    assert latency < allowance(1.0), f"p99 {latency:.3f} s during the birth storm"
