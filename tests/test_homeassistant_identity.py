"""Home Assistant identity: ids that never collide, every device's document, dotted metrics.

Home Assistant's MQTT discovery docs ("Device discovery payload": ``identifiers``,
``unique_id``, ``value_template``; the topic ``<discovery_prefix>/<component>/[<node_id>/]
<object_id>/config``) say what must be unique and how a state is read. Every template is
rendered with Jinja2 against the payload the device really published; the particulate payload
is the shape Tasmota documents for a PMS5003 (Tasmota docs "PMS5003 Particle Concentration
Sensor": ``"PMS5003":{"CF1":…,"PM2.5":…}``), published here by a native device.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets

import aiomqtt
import pytest

from devices.conventions.homeassistant import (
    KnownDevice,
    device_document,
    encode,
    gateway_document,
    gateway_object_path,
    identifier,
    object_id,
)
from devices.telemetry.pipeline import current_pipeline
from tests.support.gateway import GatewayProcess
from tests.test_homeassistant import bridge, device, render, retained_documents, watching

__all__ = ["device"]  # the fixture, shared with tests/test_homeassistant.py


def every_id(document: dict) -> set[str]:
    """The identifiers and unique ids a document claims."""
    ids = set(document["dev"]["ids"])
    return ids | {c["uniq_id"] for c in document["cmps"].values()}


def test_device_and_gateway_identifiers_never_collide():
    gid = "gw1"
    gateway = gateway_document(gid)
    for device_id in ("gateway", f"{gid}_gateway", "gw1_gateway_status", "status"):
        known = KnownDevice(device_id, "native", {"status": "bool", "gateway": "number"})
        document = device_document(gid, device_id, known, mirrored=True)
        assert not every_id(document) & every_id(gateway), device_id
        assert document["dev"]["via_device"] == gateway["dev"]["ids"][0]
        # Their topics differ too: a device's object id is one level, the gateway's two.
        assert device_id.count("/") == 0 and gateway_object_path(gid).count("/") == 1


def test_unique_ids_are_injective():
    # The pair, and others an underscore-joined scheme merged.
    pairs = [
        (("env", "a_temp"), ("env_a", "temp")),
        (("a", "b.c"), ("a", "b_c")),
        (("a", "b_2ec"), ("a", "b.c")),
        (("a-b", "c"), ("a", "b-c")),
    ]
    for (d1, m1), (d2, m2) in pairs:
        assert identifier("gw", "device", d1, m1) != identifier("gw", "device", d2, m2)
        assert object_id(m1) != object_id(m2)
    names = ["a_b", "a.b", "a__b", "a_2eb", "a b", "a-b", "PM2.5", "PM2_5", "é", "_c3_a9"]
    assert len({encode(n) for n in names}) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", encode(n)) for n in names)  # topic-safe


@pytest.mark.django_db(transaction=True)
async def test_dotted_metric_names_render_in_home_assistant(mosquitto, layer, settings, device):
    gid, did = settings.GATEWAY["GATEWAY_ID"], device.device_id
    payload = json.dumps(
        {"PMS5003": {"CF1": 3, "CF2.5": 5, "CF10": 6, "PM1": 3, "PM2.5": 12, "PM10": 6}}
    ).encode()
    async with watching(mosquitto.port) as ha, bridge(mosquitto, gid):
        await device.publish(f"devices/{did}/telemetry", payload, qos=1)
        doc = await ha.until(did, lambda d: len(d["cmps"]) == 6)
    shown = {c["name"]: render(c, payload) for c in doc["cmps"].values()}
    assert shown == {
        "PMS5003.CF1": "3",
        "PMS5003.CF2.5": "5",
        "PMS5003.CF10": "6",
        "PMS5003.PM1": "3",
        "PMS5003.PM2.5": "12",
        "PMS5003.PM10": "6",
    }
    # A message without it leaves the state as it was (renders empty).
    pm25 = next(c for c in doc["cmps"].values() if c["name"] == "PMS5003.PM2.5")
    assert render(pm25, b'{"PMS5003": {"PM10": 7}}') == ""


@pytest.mark.timeout(180)
async def test_a_burst_of_2000_new_devices_gets_every_document(mosquitto):
    ids = [f"burst-{i:04d}" for i in range(2000)]
    seen: set[str] = set()
    # 2,000 devices never seen before: admit them all at once (the admission rate for new
    # devices is another story, tests/test_hostile_publishers.py).
    with GatewayProcess(mosquitto.url, env={"GATEWAY_NEW_DEVICES_PER_SECOND": "10000"}) as gw:
        async with (
            watching(mosquitto.port) as ha,
            aiomqtt.Client(
                "127.0.0.1", mosquitto.port, identifier=f"fleet-{secrets.token_hex(3)}"
            ) as c,
        ):
            # All at once, as a fleet powering up after an outage does (QoS 1, concurrently).
            await asyncio.gather(
                *(c.publish(f"devices/{d}/telemetry", b'{"temperature": 20.5}', qos=1) for d in ids)
            )
            async with asyncio.timeout(150):
                while not set(ids) <= seen:
                    seen.add((await ha.queue.get()).topic.value.split("/")[-2])
        assert gw.metric("gateway_channel_messages_dropped_total", 'group="device-metrics"') == 0
    documents = await retained_documents(mosquitto.port)
    assert all(documents[d]["cmps"]["temperature"]["p"] == "sensor" for d in ids)


@pytest.mark.django_db(transaction=True)
async def test_a_birth_message_fills_a_lost_announcement(mosquitto, layer, settings, device):
    gid, did = settings.GATEWAY["GATEWAY_ID"], device.device_id
    async with watching(mosquitto.port) as ha, bridge(mosquitto, gid):
        # The announcement never reaches discovery (as when a full channel refused it).
        async with asyncio.timeout(5):
            while not layer.groups.get("device-metrics"):  # noqa: ASYNC110 - joined on connect
                await asyncio.sleep(0.01)
        for channel in list(layer.groups["device-metrics"]):
            await layer.group_discard("device-metrics", channel)
        await device.publish(f"devices/{did}/telemetry", b'{"temperature": 20.5}', qos=1)
        await current_pipeline().flush()
        # Home Assistant (re)starts: its birth message brings the missing document.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as ha_client:
            await ha_client.publish("homeassistant/status", b"online")
        doc = await ha.until(did, lambda d: "temperature" in d["cmps"])
    assert render(doc["cmps"]["temperature"], b'{"temperature": 20.5}') == "20.5"
