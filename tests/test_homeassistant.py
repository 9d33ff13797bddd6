"""Home Assistant MQTT discovery (devices/conventions/homeassistant.py), as Home Assistant sees it.

A plain aiomqtt subscriber reads the discovery documents from a private mosquitto while real
devices publish to the gateway's MQTT bridge (MqttServer, pipeline, layer and database in this
loop; the serial case runs the real `rungateway` on a pseudo-terminal). Every `value_template`
is rendered with Jinja2's sandbox, as Home Assistant renders it, against the payload the
device really published on the document's state topic.

Long on purpose: the documents, a bridge restart, the birth storm and the off switch share
one broker and bridge set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from devices.conventions.homeassistant import (
    KnownDevice,
    convention_of,
    device_document,
    gateway_object_path,
    identifier,
    object_id,
    value_template,
)
from devices.routing import build_routes
from devices.telemetry.pipeline import current_pipeline
from firmware_sim.serial_device import SerialSimDevice, open_pty
from gateway.mqtt.routing import TopicRouter, topic
from gateway.mqtt.server import MqttServer
from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.timeout(60)

JINJA = ImmutableSandboxedEnvironment()


def render(component: dict[str, Any], payload: bytes) -> str:
    """What Home Assistant makes of `payload` on the component's state topic."""
    value = payload.decode()
    template = component.get("val_tpl")
    if template is None:
        return value
    try:
        value_json = json.loads(value)
    except ValueError:
        value_json = None
    return JINJA.from_string(template).render(value=value, value_json=value_json)


# --- templates and documents, no broker ---------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "payload", "shown"),
    [
        ("temperature", {"temperature": 21.5, "humidity": 40}, "21.5"),
        ("humidity", {"temperature": 21.5}, ""),  # not in this message: state kept
        ("env.pressure", {"env": {"pressure": 1013.2}}, "1013.2"),  # a device's nested object
        ("env.pressure", {"env.pressure": 1000.5, "ts": 1}, "1000.5"),  # the mirror's flat key
        ("env.pressure", {"env": 3}, ""),
        ("it's \\odd", {"it's \\odd": 7}, "7"),
        ("température", {"température": -3}, "-3"),
    ],
)
def test_value_template_finds_the_metric_or_renders_empty(metric, payload, shown):
    component = {"val_tpl": value_template(metric, boolean=False)}
    assert render(component, json.dumps(payload).encode()) == shown


def test_boolean_template_is_on_off_and_empty_when_absent():
    component = {"val_tpl": value_template("door", boolean=True)}
    assert render(component, b'{"door": true}') == "ON"
    assert render(component, b'{"door": false}') == "OFF"
    assert render(component, b'{"other": 1}') == ""


def test_object_ids_are_stable_and_topic_safe():
    assert object_id("temperature") == "temperature"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", object_id("env.pressure"))
    assert object_id("env.pressure") == object_id("env.pressure") != object_id("env_pressure")


def test_modbus_units_are_discovered_like_serial_devices_through_the_mirror():
    assert convention_of("modbus", "") == convention_of("serial", "") == "serial"


def test_serial_device_without_mirror_and_tasmota_are_not_published():
    known = KnownDevice("s1", "serial", {"t": "number"})
    assert device_document("gw", "s1", known, mirrored=False) is None
    mirrored = device_document("gw", "s1", known, mirrored=True)
    assert mirrored is not None and mirrored["stat_t"] == "devices/s1/telemetry"  # the mirror's
    assert list(mirrored["cmps"]) == ["t"] and mirrored["dev"]["mdl"] == "serial device"
    assert (
        device_document("gw", "p1", KnownDevice("p1", "tasmota", {"t": "number"}), mirrored=True)
        is None
    )
    assert (
        device_document("gw", "n1", KnownDevice("n1", None, {"t": "number"}), mirrored=True) is None
    )


# --- the bridge in this loop, a plain subscriber ------------------------------------------


@contextlib.asynccontextmanager
async def bridge(mosquitto: Any, gateway_id: str) -> AsyncIterator[MqttServer]:
    """The MQTT bridge with the routes as the settings say, on the private broker."""
    server = MqttServer(
        TopicRouter(build_routes()),
        url=mosquitto.url,
        client_id=f"gateway-{secrets.token_hex(3)}",
        status_topic=f"gateway/{gateway_id}/status",
    )
    task = asyncio.create_task(server.serve(), name="test.mqtt-bridge")
    await server.wait_connected(10)
    try:
        yield server
    finally:
        await server.shutdown(2.0)
        await asyncio.wait_for(task, 5)


class Watcher:
    """A plain subscriber on every discovery document: what Home Assistant receives."""

    def __init__(self, client: aiomqtt.Client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self.task = asyncio.create_task(self._collect(), name="test.ha-watcher")

    async def _collect(self) -> None:
        async for message in self.client.messages:
            await self.queue.put(message)

    async def next(self, device: str, wait: float = 10.0) -> tuple[dict[str, Any], bool]:
        """The next document published for `device` (others skipped): (document, retained)."""
        topic = f"{self.prefix}/device/{device}/config"
        async with asyncio.timeout(wait):
            while True:
                message = await self.queue.get()
                if message.topic.value == topic:
                    return json.loads(message.payload), message.retain

    async def until(self, device: str, check: Any, wait: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(wait):
            while True:
                document, _ = await self.next(device, wait)
                if check(document):
                    return document


@contextlib.asynccontextmanager
async def watching(port: int, prefix: str = "homeassistant") -> AsyncIterator[Watcher]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"ha-{secrets.token_hex(3)}") as c:
        await c.subscribe(f"{prefix}/device/+/config", qos=1)
        watcher = Watcher(c, prefix)
        try:
            yield watcher
        finally:
            watcher.task.cancel()


async def retained_documents(port: int, prefix: str = "homeassistant") -> dict[str, dict]:
    """Every retained discovery document on the broker, as a fresh Home Assistant gets them
    (a sentinel published after subscribing marks the end of the retained burst)."""
    sentinel = f"{prefix}/device/zz-sentinel-{secrets.token_hex(3)}/config"
    found: dict[str, dict] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"ha-{secrets.token_hex(3)}") as c:
        await c.subscribe(f"{prefix}/device/+/config", qos=1)
        await c.subscribe(f"{prefix}/device/+/+/config", qos=1)  # the gateway's (node id)
        await c.publish(sentinel, b"{}", qos=1)
        async with asyncio.timeout(10):
            async for message in c.messages:
                if message.topic.value == sentinel:
                    return found
                assert message.retain
                path = message.topic.value[len(f"{prefix}/device/") : -len("/config")]
                found[path] = json.loads(message.payload)
    return found


@pytest.fixture
async def device(mosquitto):
    """A native device's MQTT client with its Last Will, online (docs/interface.md §3)."""
    device_id = f"env-{secrets.token_hex(3)}"
    will = aiomqtt.Will(f"devices/{device_id}/status", b"offline", qos=1, retain=True)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=device_id, will=will) as c:
        await c.publish(f"devices/{device_id}/status", b"online", qos=1, retain=True)
        c.device_id = device_id
        yield c


@pytest.mark.django_db(transaction=True)
async def test_native_device_is_discovered_and_kept_up_to_date(mosquitto, layer, settings, device):
    gid = settings.GATEWAY["GATEWAY_ID"]
    did = device.device_id
    reading = {"temperature": 21.5, "humidity": 40, "door": True, "env": {"pressure": 1013.2}}
    payload = json.dumps(reading).encode()
    async with watching(mosquitto.port) as ha, bridge(mosquitto, gid):
        await device.publish(f"devices/{did}/telemetry", payload, qos=1)
        doc = await ha.until(did, lambda d: len(d["cmps"]) == 4)

        # One document for the device, with Home Assistant's device-discovery shape.
        assert doc["dev"]["ids"] == [identifier(gid, "device", did)] and doc["dev"]["name"] == did
        assert doc["dev"]["via_device"] == identifier(gid, "gateway")
        assert doc["o"]["name"] == "mqtt-channels-gateway" and doc["o"]["sw"]
        assert doc["avty_mode"] == "all"
        assert [a["t"] for a in doc["avty"]] == [f"gateway/{gid}/status", f"devices/{did}/status"]
        assert doc["stat_t"] == f"devices/{did}/telemetry"
        cmps = doc["cmps"]
        assert set(cmps) == {"temperature", "humidity", "door", object_id("env.pressure")}
        temperature, pressure = cmps["temperature"], cmps[object_id("env.pressure")]
        assert temperature["p"] == "sensor"
        assert temperature["uniq_id"] == identifier(gid, "device", did, "temperature")
        assert (temperature["dev_cla"], temperature["unit_of_meas"]) == ("temperature", "°C")
        assert (cmps["humidity"]["dev_cla"], cmps["humidity"]["unit_of_meas"]) == ("humidity", "%")
        assert (pressure["dev_cla"], pressure["unit_of_meas"]) == ("pressure", "hPa")
        assert cmps["door"]["p"] == "binary_sensor" and "unit_of_meas" not in cmps["door"]
        # Each template, rendered as Home Assistant does, finds its value in the real payload.
        shown = {name: render(c, payload) for name, c in cmps.items()}
        assert shown == {
            "temperature": "21.5",
            "humidity": "40",
            "door": "ON",
            object_id("env.pressure"): "1013.2",
        }

        # A new metric (per-metric topic) updates the document; the same metrics again do not:
        # the next document after three identical readings is the one with `co2`.
        for _ in range(3):
            await device.publish(f"devices/{did}/telemetry", payload, qos=1)
        await device.publish(f"devices/{did}/telemetry/co2", b"415", qos=1)
        doc, _ = await ha.next(did)
        assert set(doc["cmps"]) == set(cmps) | {"co2"}
        co2 = doc["cmps"]["co2"]
        assert co2["stat_t"] == f"devices/{did}/telemetry/co2" and "val_tpl" not in co2
        assert (co2["dev_cla"], co2["unit_of_meas"]) == ("carbon_dioxide", "ppm")

        # The gateway is a device too (the other devices' via_device), with its connectivity.
        gateway = (await retained_documents(mosquitto.port))[gateway_object_path(gid)]
        assert gateway["dev"]["ids"] == [identifier(gid, "gateway")]
        assert gateway["cmps"]["status"]["stat_t"] == f"gateway/{gid}/status"

        # Home Assistant restarts: its birth message brings every document again.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as ha_client:
            await ha_client.publish("homeassistant/status", b"offline")
            await ha_client.publish("homeassistant/status", b"online")
        again, retained = await ha.next(did)
        assert again == doc and retained is False  # a live publish, not the broker's replay

    # Retained: a Home Assistant that subscribes later gets the latest document.
    documents = await retained_documents(mosquitto.port)
    assert documents[did] == doc


@pytest.mark.django_db(transaction=True)
async def test_a_birth_storm_costs_one_republish_per_interval(mosquitto, layer, settings, device):
    """Fifty `online` births in a row: one republish at once, one more when the interval ends."""
    settings.GATEWAY = {**settings.GATEWAY, "HA_REPUBLISH_SECONDS": 1.5}
    did = device.device_id
    async with watching(mosquitto.port) as ha, bridge(mosquitto, "storm"):
        await device.publish(f"devices/{did}/telemetry", b'{"t": 1}', qos=1)
        await ha.until(did, lambda d: "t" in d["cmps"])
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as ha_client:
            for _ in range(50):
                await ha_client.publish("homeassistant/status", b"online", qos=1)
        started = asyncio.get_running_loop().time()
        await ha.next(did)  # the first birth: at once
        await ha.next(did)  # the other 49: one republish after the interval
        assert asyncio.get_running_loop().time() - started >= 1.0, "the second one waited"
        # Nothing more: once another interval has passed (the time a third would need), a new
        # metric's document is the next one.
        await asyncio.sleep(1.6)
        await device.publish(f"devices/{did}/telemetry", b'{"u": 1}', qos=1)
        document, _ = await ha.next(did)
        assert "u" in document["cmps"], "a republish came between"


@pytest.mark.django_db(transaction=True)
async def test_bridge_restart_republishes_from_the_database_and_skips_tasmota(
    mosquitto, layer, settings, device
):
    gid = settings.GATEWAY["GATEWAY_ID"]
    did = device.device_id
    plug = f"plug-{secrets.token_hex(3)}"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=plug) as tasmota:
        async with watching(mosquitto.port) as ha, bridge(mosquitto, gid):
            await tasmota.publish(f"tele/{plug}/LWT", b"Online", qos=1, retain=True)
            await tasmota.publish(f"tele/{plug}/SENSOR", b'{"AM2301":{"Temperature":21.3}}', qos=1)
            await device.publish(f"devices/{did}/telemetry", b'{"temperature": 20}', qos=1)
            await ha.next(did)
            await device.publish(f"devices/{did}/telemetry", b'{"battery": 90}', qos=1)
            before = await ha.until(did, lambda d: "battery" in d["cmps"])

        # The broker forgets every retained document (as one without persistence does when
        # it restarts); a new bridge process publishes again from the database, with every
        # metric it ever stored, before the device says anything.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as admin:
            for topic in (did, gateway_object_path(gid)):
                await admin.publish(f"homeassistant/device/{topic}/config", b"", retain=True)
        assert await retained_documents(mosquitto.port) == {}
        await current_pipeline().close()  # a new process: nothing announced yet
        async with watching(mosquitto.port) as ha, bridge(mosquitto, gid):
            after = await ha.until(did, lambda d: True)
            assert set(after["cmps"]) == {"temperature", "battery"} and after == before
        documents = await retained_documents(mosquitto.port)
        # No document for the Tasmota plug.
        assert set(documents) == {did, gateway_object_path(gid)}


@pytest.mark.django_db(transaction=True)
async def test_off_switch_publishes_nothing(mosquitto, layer, dashboard, settings, device):
    # Ingesting other devices' discovery (docs/conventions.md) is a switch of its own.
    off = {"HA_DISCOVERY": False, "HA_DISCOVERY_INGEST": False, "ZIGBEE2MQTT_BASE_TOPIC": ""}
    settings.GATEWAY = {**settings.GATEWAY, **off}
    router = TopicRouter(build_routes())
    assert "homeassistant/status" not in router.subscriptions and not router.static_matches
    did = device.device_id
    async with bridge(mosquitto, settings.GATEWAY["GATEWAY_ID"]) as server:
        await device.publish(f"devices/{did}/telemetry", b'{"temperature": 20}', qos=1)
        async with asyncio.timeout(10):  # the reading went through the gateway
            while not any(
                f["type"] == "telemetry" and f["device"] == did
                for f in (await layer.receive(dashboard))["events"]
            ):
                pass
        await current_pipeline().flush()
        assert server.instances == 1  # the device; no discovery instance
    assert await retained_documents(mosquitto.port) == {}


@pytest.mark.django_db(transaction=True)
async def test_custom_prefix(mosquitto, layer, settings, device):
    settings.GATEWAY = {**settings.GATEWAY, "HA_DISCOVERY_PREFIX": "ha-test"}
    did = device.device_id
    async with watching(mosquitto.port, "ha-test") as ha, bridge(mosquitto, "x"):
        await device.publish(f"devices/{did}/telemetry", b'{"temperature": 20}', qos=1)
        doc, retained = await ha.next(did)
        assert "temperature" in doc["cmps"]
    assert await retained_documents(mosquitto.port) == {}  # nothing under homeassistant/


# --- a serial device, through the real gateway process ------------------------------------


@pytest.mark.e2e
async def test_serial_device_is_discovered_through_its_mirror(mosquitto, tmp_path):
    link = tmp_path / "usb-sim-if00"
    master, slave, _ = open_pty(str(link))
    sim = SerialSimDevice(master, "weather-1", seed=1)
    try:
        gw = GatewayProcess(mosquitto.url, args=["--serial", f"{link}?device=weather-1"])
        with gw:
            gw.wait_for_log(r"serial port .* opened")
            async with (
                watching(mosquitto.port) as ha,
                aiomqtt.Client("127.0.0.1", mosquitto.port) as sub,
            ):
                await sub.subscribe("devices/weather-1/telemetry", qos=1)
                assert await sim.write(b'{"temperature": 19.5, "env": {"hum": 41}}\n', 5.0)
                doc = await ha.until("weather-1", lambda d: len(d["cmps"]) == 2)
                mirrored = await anext(sub.messages)  # what the mirror put on the broker
        gid = gw.gateway_id
        assert doc["dev"]["mdl"] == "serial device" and doc["stat_t"] == mirrored.topic.value
        assert [a["t"] for a in doc["avty"]] == [
            f"gateway/{gid}/status",
            "devices/weather-1/status",
        ]
        shown = {name: render(c, mirrored.payload) for name, c in doc["cmps"].items()}
        assert shown == {"temperature": "19.5", object_id("env.hum"): "41.0"}
    finally:
        import os

        os.close(master)
        os.close(slave)


# --- the protocol feature discovery rests on: a static route ------------------------------


def test_a_static_route_has_no_key():
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(ValueError, match="static"):
        topic("svc/{name}/ping", app, static=True)
    router = TopicRouter([topic("svc/ping", app, name="svc", static=True)])
    assert [m.instance_key for m in router.static_matches] == [("svc",)]
    assert router.resolve("svc/ping").instance_key == ("svc",)  # its messages go to it


async def test_static_instance_starts_on_connect_and_outlives_idleness(mosquitto):
    events: list[str] = []
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            events.append(event["type"])
            started.set()
            if event["type"] == "mqtt.retire":
                return

    keyed_retired = asyncio.Event()

    async def keyed(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "mqtt.retire":
            pass
        keyed_retired.set()

    server = MqttServer(
        TopicRouter(
            [
                topic("svc/ping", app, name="svc", static=True),
                topic("svc/{name}/ping", keyed, name="keyed"),
            ]
        ),
        url=mosquitto.url,
        client_id=f"static-{secrets.token_hex(3)}",
        idle_seconds=0.2,
    )
    task = asyncio.create_task(server.serve())
    await server.wait_connected(10)
    await asyncio.wait_for(started.wait(), 5)  # no message needed
    # Sentinel: a keyed instance, active later than the static one, retired when idle; the
    # pass that retired it found the static one idle longer.
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="static-sentinel") as pub:
        await pub.publish("svc/k1/ping", b"1", qos=1)
    await asyncio.wait_for(keyed_retired.wait(), 10)
    assert server.instances == 1 and events == ["mqtt.connect"]
    await server.shutdown(2.0)
    await asyncio.wait_for(task, 5)
    assert events == ["mqtt.connect", "mqtt.retire"]
