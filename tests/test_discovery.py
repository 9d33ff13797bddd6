"""Self-describing devices (devices/conventions/discovery/): real-format Home Assistant
discovery documents, ESPHome nodes and a Zigbee2MQTT bridge, driven through MqttCommunicator
against the real pipeline, channel layer, command service and database.

Payload sources (cited again where each is used):
- HA: home-assistant/home-assistant.io source/_integrations/mqtt.markdown (discovery examples:
  the ``~`` light, the device-level ``cmps`` document, the garden motion sensor) and
  home-assistant/core homeassistant/components/mqtt/abbreviations.py (the key names).
- ESPHome: esphome/esphome esphome/components/mqtt/mqtt_component.cpp (send_discovery_: topic
  ``<prefix>/<type>/<node>/<object_id>/config``, ``dev.ids`` the MAC as a string, ``avty_t``
  ``<node>/status``, ``uniq_id`` ``ESP<type><object_id>``, state ``<node>/<type>/<id>/state``,
  commands ``…/command``).
- Zigbee2MQTT: Koenkk/zigbee2mqtt.io docs/guide/usage/mqtt_topics_and_messages.md
  (bridge/devices, FRIENDLY_NAME, /availability, /set) and docs/guide/usage/exposes.md.

Long on purpose: one story per documented mapping of docs/conventions.md, each against the
real-format document it cites.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from channels.db import database_sync_to_async

from devices.commands import service as commands
from devices.conventions.discovery import consumer as discovery
from devices.conventions.homeassistant import identifier
from devices.models import Command, Device, Reading
from devices.routing import build_routes
from devices.telemetry.pipeline import current_pipeline
from gateway.metrics import DISCOVERY_REFUSED
from gateway.mqtt.routing import TopicRouter
from gateway.mqtt.testing import MqttCommunicator
from tests.support.checks import dashboard_frame, rejected

pytestmark = pytest.mark.django_db(transaction=True)

# ESPHome node "livingroom" (mqtt_component.cpp send_discovery_ + mqtt_sensor.cpp /
# mqtt_switch.cpp): abbreviated keys, device identifiers = the MAC as one string.
ESP_DEVICE = {
    "ids": "a4cf12f1e2d3",
    "name": "livingroom",
    "sw": "2024.11.0 (config hash 0x9c1a2b3d)",
    "mdl": "esp32dev",
    "mf": "Espressif",
    "cns": [["mac", "a4cf12f1e2d3"]],
}
ESP_SENSOR = {
    "dev_cla": "temperature",
    "unit_of_meas": "°C",
    "stat_cla": "measurement",
    "name": "Temperature",
    "stat_t": "livingroom/sensor/temperature/state",
    "avty_t": "livingroom/status",
    "uniq_id": "ESPsensortemperature",
    "dev": ESP_DEVICE,
}
ESP_SWITCH = {
    "name": "Relay",
    "stat_t": "livingroom/switch/relay/state",
    "cmd_t": "livingroom/switch/relay/command",
    "avty_t": "livingroom/status",
    "uniq_id": "ESPswitchrelay",
    "dev": ESP_DEVICE,
}
# A second ESPHome node with the same firmware: only its name, MAC and topics differ.
ESP_BEDROOM_SWITCH = {
    **ESP_SWITCH,
    "stat_t": "bedroom/switch/relay/state",
    "cmd_t": "bedroom/switch/relay/command",
    "avty_t": "bedroom/status",
    "dev": {
        **ESP_DEVICE,
        "ids": "a4cf12f1e2d4",
        "name": "bedroom",
        "cns": [["mac", "a4cf12f1e2d4"]],
    },
}
# HA docs, "Using abbreviations and base topic" (mqtt.markdown): a JSON-schema light.
HA_TILDE_LIGHT = {
    "~": "homeassistant/light/kitchen",
    "name": "Kitchen",
    "uniq_id": "kitchen_light",
    "cmd_t": "~/set",
    "stat_t": "~/state",
    "schema": "json",
    "brightness": True,
}
# HA docs, "Device discovery payload" (mqtt.markdown).
HA_DEVICE_DOC = {
    "dev": {
        "ids": "ea334450945afc",
        "name": "Kitchen",
        "mf": "Bla electronics",
        "mdl": "xya",
        "sw": "1.0",
        "sn": "ea334450945afc",
        "hw": "1.0rev2",
    },
    "o": {"name": "bla2mqtt", "sw": "2.1", "url": "https://bla2mqtt.example.com/support"},
    "cmps": {
        "some_unique_component_id1": {
            "p": "sensor",
            "device_class": "temperature",
            "unit_of_measurement": "°C",
            "value_template": "{{ value_json.temperature}}",
            "unique_id": "temp01ae_t",
        },
        "some_unique_id2": {
            "p": "sensor",
            "device_class": "humidity",
            "unit_of_measurement": "%",
            "value_template": "{{ value_json.humidity}}",
            "unique_id": "temp01ae_h",
        },
    },
    "state_topic": "sensorBedroom/state",
    "qos": 2,
}
# HA docs, the garden motion sensor example (mqtt.markdown, "Motion detection").
HA_MOTION = {
    "name": None,
    "device_class": "motion",
    "state_topic": "homeassistant/binary_sensor/garden/state",
    "unique_id": "motion01ad",
    "device": {"identifiers": ["01ad"], "name": "Garden"},
}


def doc(data: dict) -> bytes:
    return orjson.dumps(data)


def refused(reason: str) -> float:
    return DISCOVERY_REFUSED.labels(reason=reason)._value.get()


class Bridge:
    """The discovery routes as the MQTT server runs them: one `MqttCommunicator` per instance
    key (the config instance, then one per entity topic), created on a topic's first message;
    a topic no route takes is dropped, as the server drops it (`no_route`)."""

    def __init__(self) -> None:
        self.router = TopicRouter(build_routes())
        self.instances: dict[object, MqttCommunicator] = {}

    async def start(self) -> None:
        for match in self.router.static_matches:
            if match.route == "discovery":
                await self._instance(match)

    async def _instance(self, match) -> MqttCommunicator:
        comm = self.instances.get(match.instance_key)
        if comm is None:
            comm = MqttCommunicator(self.router, route=match.route, kwargs=match.key_params)
            self.instances[match.instance_key] = comm
            await comm.connect()
        return comm

    async def send_message(self, topic: str, payload: bytes, **kwargs):
        match = self.router.resolve(topic)
        if match is None:
            return None
        comm = await self._instance(match)
        return await comm.send_message(topic, payload, **kwargs)

    async def outputs(self, wait: float = 10.0) -> list[dict]:
        """Everything the instances sent (not yet taken) for the messages sent to them so far,
        taken once each has handled those messages (`MqttCommunicator.handled`), not after a
        quiet spell: `== []` proves that nothing was sent. A command reaches the config
        instance over the channel layer, which the marker does not follow: for those, wait
        for a later command's publish or the command's final status."""
        events: list[dict] = []
        for comm in list(self.instances.values()):
            await comm.handled(wait)
            while not comm.output_queue.empty():
                events.append(comm.output_queue.get_nowait())
        return events

    async def receive_publish(self, wait: float = 1.0) -> dict:
        async with asyncio.timeout(wait):
            while True:
                for comm in self.instances.values():
                    if not comm.output_queue.empty():
                        event = comm.output_queue.get_nowait()
                        assert event["type"] == "mqtt.publish", event
                        return event
                await asyncio.sleep(0.01)

    async def retire(self) -> None:
        keys = sorted(self.instances, key=lambda k: k == ("discovery",))  # config one last
        for key in keys:
            await self.instances.pop(key).retire()


async def outputs(bridge: Bridge) -> list[dict]:
    return await bridge.outputs()


def topics(events: list[dict], kind: str) -> set[str]:
    return {e["topic"] for e in events if e["type"] == kind}


async def readings(device_id: str) -> list[tuple[str, float]]:
    await current_pipeline().flush()
    return await database_sync_to_async(
        lambda: list(
            Reading.objects.filter(device_id=device_id)
            .order_by("ts", "metric")
            .values_list("metric", "value")
        )
    )()


async def finished(command_id, wait: float = 10.0) -> Command:
    async with asyncio.timeout(wait):
        while True:
            command = await database_sync_to_async(Command.objects.get)(id=command_id)
            if command.status in ("acked", "failed", "timeout"):
                return command
            await asyncio.sleep(0.02)


@pytest.fixture
async def gw(layer):
    """The discovery routes, connected; the router subscribes the config topics."""
    bridge = Bridge()
    assert {
        "homeassistant/+/+/config",
        "homeassistant/+/+/+/config",
        "zigbee2mqtt/bridge/devices",
    } <= set(bridge.router.subscriptions)
    await bridge.start()
    assert await bridge.outputs() == []
    yield bridge
    await bridge.retire()


@pytest.fixture
async def staff(django_user_model):
    return await database_sync_to_async(django_user_model.objects.create_user)(
        "ops", password="pw-ops-12345", is_staff=True
    )


# --- routing ---------------------------------------------------------------------------------


def test_the_discovery_route_is_last_and_takes_only_its_own_topics():
    router = TopicRouter(build_routes())
    assert "#" not in router.subscriptions  # the catch-all pattern is never subscribed
    config = router.resolve("homeassistant/sensor/livingroom/temperature/config")
    assert config.instance_key == ("discovery",)
    assert router.resolve("homeassistant/status").route == "homeassistant"
    assert router.resolve("zigbee2mqtt/bridge/devices").instance_key == ("discovery",)
    assert router.resolve("livingroom/sensor/temperature/state") is None  # not subscribed yet
    assert router.resolve("devices/x/telemetry").route == "device"


# --- Home Assistant discovery ------------------------------------------------------------------


async def test_esphome_node_appears_with_its_name_unit_and_readings(gw, layer, dashboard):
    # esphome/components/mqtt/mqtt_component.cpp: one retained document per entity.
    await gw.send_message(
        "homeassistant/sensor/livingroom/temperature/config", doc(ESP_SENSOR), qos=1, retain=True
    )
    await gw.send_message(
        "homeassistant/switch/livingroom/relay/config", doc(ESP_SWITCH), qos=1, retain=True
    )
    subscribed = topics(await outputs(gw), "mqtt.subscribe")
    assert subscribed == {
        "livingroom/sensor/temperature/state",
        "livingroom/status",
        "livingroom/switch/relay/state",
    }
    device = await database_sync_to_async(Device.objects.get)(id="a4cf12f1e2d3")
    assert device.name == "livingroom"

    await gw.send_message("livingroom/status", b"online", qos=1, retain=True)
    online = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert (online["device"], online["online"]) == ("a4cf12f1e2d3", True)
    await gw.send_message("livingroom/sensor/temperature/state", b"21.50")
    reading = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert reading["metrics"] == {"temperature": 21.5}
    await gw.send_message("livingroom/switch/relay/state", b"ON")
    relay = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert relay["metrics"] == {"relay": True}

    described = {e["metric"]: e for e in discovery.describe()[0]["entities"]}
    assert described["temperature"]["unit"] == "°C"
    assert described["temperature"]["name"] == "Temperature"
    assert described["temperature"]["device_class"] == "temperature"
    assert described["relay"]["commandable"] is True
    assert await readings("a4cf12f1e2d3") == [("temperature", 21.5), ("relay", 1.0)]

    await gw.send_message("livingroom/status", b"offline", qos=1, retain=True)
    offline = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert offline["online"] is False


async def test_tilde_base_topic_and_json_light(gw, layer, dashboard):
    # HA docs (mqtt.markdown), "Using abbreviations and base topic".
    await gw.send_message("homeassistant/light/kitchen/config", doc(HA_TILDE_LIGHT), retain=True)
    assert topics(await outputs(gw), "mqtt.subscribe") == {"homeassistant/light/kitchen/state"}
    await gw.send_message("homeassistant/light/kitchen/state", b'{"state":"ON","brightness":128}')
    light = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    # No `dev`: the unique_id names the device.
    assert light["device"] == "kitchen_light"
    assert light["metrics"] == {"kitchen": True, "kitchen_brightness": 128.0}


async def test_device_level_document_with_templates_and_shared_state_topic(gw, layer, dashboard):
    # HA docs (mqtt.markdown), "Device discovery payload": cmps, value_json templates.
    await gw.send_message("homeassistant/device/0AFFD2/config", doc(HA_DEVICE_DOC), retain=True)
    assert topics(await outputs(gw), "mqtt.subscribe") == {"sensorBedroom/state"}
    await gw.send_message("sensorBedroom/state", b'{"temperature": 23.2, "humidity": 43.7}')
    both = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert both["device"] == "ea334450945afc"
    assert both["metrics"] == {"some_unique_component_id1": 23.2, "some_unique_id2": 43.7}
    device = await database_sync_to_async(Device.objects.get)(id="ea334450945afc")
    assert device.name == "Kitchen"
    units = {e["metric"]: e["unit"] for e in discovery.describe()[0]["entities"]}
    assert units == {"some_unique_component_id1": "°C", "some_unique_id2": "%"}


async def test_binary_sensor_on_off_and_removal_by_empty_config(gw, layer, dashboard):
    # HA docs (mqtt.markdown): the garden motion sensor; removal = empty retained config.
    config = "homeassistant/binary_sensor/garden/config"
    await gw.send_message(config, doc(HA_MOTION), retain=True)
    await outputs(gw)
    await gw.send_message("homeassistant/binary_sensor/garden/state", b"ON")
    motion = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert (motion["device"], motion["metrics"]) == ("01ad", {"garden": True})
    before = rejected("bad_value")
    await gw.send_message("homeassistant/binary_sensor/garden/state", b"MAYBE")
    await gw.send_message("homeassistant/binary_sensor/garden/state", b"OFF")
    still = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert still["metrics"] == {"garden": False}
    assert rejected("bad_value") == before + 1
    await current_pipeline().flush()  # the discovered device's rejection record
    record = await database_sync_to_async(
        Device.objects.values_list("rejected", "last_rejection_reason", "last_rejection").get
    )(id="01ad")
    assert record == (1, "bad_value", "garden: 'MAYBE' is not on/off")

    await gw.send_message(config, b"", retain=True)
    assert topics(await outputs(gw), "mqtt.unsubscribe") == {
        "homeassistant/binary_sensor/garden/state"
    }
    assert discovery.describe() == []
    await gw.send_message("homeassistant/binary_sensor/garden/state", b"ON")
    assert await outputs(gw) == []  # handled (if routed at all) before the pipeline's flush
    assert await readings("01ad") == [("garden", 1.0), ("garden", 0.0)]


async def test_the_gateways_own_documents_are_never_ingested(gw, settings):
    # docs/interface.md §3.4: the document this gateway publishes for a native device.
    gw_id = settings.GATEWAY["GATEWAY_ID"]
    own = {
        "dev": {
            "ids": [identifier(gw_id, "device", "env-1")],
            "name": "env-1",
            "mdl": "MQTT device",
        },
        "o": {"name": "mqtt-channels-gateway", "sw": "0.1.0"},
        "stat_t": "devices/env-1/telemetry",
        "cmps": {"temperature": {"p": "sensor", "name": "temperature", "val_tpl": "{{ 1 }}"}},
    }
    await gw.send_message("homeassistant/device/env-1/config", doc(own), retain=True)
    assert await outputs(gw) == []
    # Known by its identifiers too, whatever origin a copy of it claims.
    no_origin = {k: v for k, v in own.items() if k != "o"}
    await gw.send_message("homeassistant/device/env-2/config", doc(no_origin), retain=True)
    assert await outputs(gw) == []
    assert discovery.describe() == []


async def test_unsupported_entities_are_listed_with_the_reason(
    gw, layer, dashboard, django_user_model
):
    doc_ = {
        **HA_DEVICE_DOC,
        "cmps": {
            "ok": {"p": "sensor", "val_tpl": "{{ value_json.temperature }}"},
            "recursive": {"p": "sensor", "val_tpl": "{% macro f() %}{{ f() }}{% endmacro %}"},
            "climate": {"p": "climate", "mode_cmd_t": "x/mode"},
        },
    }
    before = refused("unsupported")
    await gw.send_message("homeassistant/device/mixed/config", doc(doc_), retain=True)
    await outputs(gw)
    assert refused("unsupported") == before + 2
    entities = {e["metric"]: e for e in discovery.describe()[0]["entities"]}
    assert entities["ok"]["unsupported"] is None
    assert "macros" in entities["recursive"]["unsupported"]
    assert "climate" in entities["climate"]["unsupported"]
    await gw.send_message("sensorBedroom/state", b'{"temperature": 19.5}')
    ok = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert ok["metrics"] == {"ok": 19.5}

    # The admin's device page lists them too, escaped.
    def admin_page() -> str:
        from django.test import Client

        admin_user = django_user_model.objects.create_superuser("root", password="pw-12345678")
        client = Client()
        client.force_login(admin_user)
        response = client.get("/admin/devices/device/ea334450945afc/change/")
        assert response.status_code == 200
        return response.content.decode()

    page = await database_sync_to_async(admin_page)()
    assert "ok (ok, sensor)" in page
    assert "recursive (recursive, sensor) — unsupported: value_template: macros" in page


async def test_hostile_documents_and_templates_are_refused_and_counted(gw, layer, dashboard):
    sensor = "homeassistant/sensor/node/t/config"
    cases = [
        (b'{"stat_t": "a", ' + b'"x": "' + b"y" * (2 * 1024 * 1024) + b'"}', "too_large"),
        (b"{not json", "bad_json"),
        (b"[1, 2, 3]", "not_object"),
    ]
    for payload, reason in cases:
        before = rejected(reason)
        await gw.send_message(sensor, payload, retain=True)
        assert await outputs(gw) == []
        assert rejected(reason) == before + 1, reason
    many = {
        "dev": {"ids": "x"},
        "cmps": {f"c{i}": {"p": "sensor", "stat_t": "t"} for i in range(300)},
    }
    before = rejected("too_large")
    await gw.send_message("homeassistant/device/many/config", doc(many))
    assert await outputs(gw) == []
    assert rejected("too_large") == before + 1
    assert discovery.describe() == []

    # A template that loops for too long fails that message (counted); the next one arrives.
    looping = {**ESP_SENSOR, "val_tpl": "{% for i in range(10000000) %}{% endfor %}{{ value }}"}
    await gw.send_message("homeassistant/sensor/livingroom/temperature/config", doc(looping))
    await outputs(gw)
    before = rejected("bad_value")
    await gw.send_message("livingroom/sensor/temperature/state", b"20.0")
    await gw.send_message("homeassistant/sensor/livingroom/temperature/config", doc(ESP_SENSOR))
    await outputs(gw)
    await gw.send_message("livingroom/sensor/temperature/state", b"20.5")
    good = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert good["metrics"] == {"temperature": 20.5}
    assert rejected("bad_value") == before + 1


async def test_thousands_of_entities_stop_at_the_bound(layer, settings):
    settings.GATEWAY = {**settings.GATEWAY, "DISCOVERY_MAX_ENTITIES": 1000}
    comm = Bridge()
    await comm.start()
    before = refused("too_many_entities")
    for n in range(5):  # 5 devices × 250 components: the fifth passes the bound
        cmps = {f"s{i}": {"p": "sensor", "stat_t": f"flood/{n}/{i}"} for i in range(250)}
        await comm.send_message(
            f"homeassistant/device/flood{n}/config",
            doc({"dev": {"ids": f"flood{n}"}, "cmps": cmps}),
        )
    await outputs(comm)
    assert refused("too_many_entities") == before + 1
    assert sum(len(d["entities"]) for d in discovery.describe()) == 1000
    await comm.retire()


async def test_restart_with_retained_configs_stores_no_duplicates(layer, dashboard):
    async def run(state_retained: bool) -> None:
        comm = Bridge()
        await comm.start()
        config = "homeassistant/sensor/livingroom/temperature/config"
        await comm.send_message(config, doc(ESP_SENSOR), qos=1, retain=True)
        await outputs(comm)
        await comm.send_message("livingroom/status", b"online", retain=True)
        await comm.send_message(
            "livingroom/sensor/temperature/state", b"21.5", retain=state_retained
        )
        assert await outputs(comm) == []  # no command was waiting for it
        await comm.retire()

    await run(state_retained=False)  # heard live: stored
    await run(state_retained=True)  # the broker's retained copy after a restart: not again
    assert await readings("a4cf12f1e2d3") == [("temperature", 21.5)]
    device = await database_sync_to_async(Device.objects.get)(id="a4cf12f1e2d3")
    assert (device.name, device.online) == ("livingroom", True)


# --- commands --------------------------------------------------------------------------------


async def test_switch_command_lifecycle_acked_by_the_matching_state(gw, layer, staff):
    await gw.send_message("homeassistant/switch/livingroom/relay/config", doc(ESP_SWITCH))
    await outputs(gw)
    await gw.send_message("livingroom/status", b"online", retain=True)
    command = await commands.submit(
        staff, "a4cf12f1e2d3", {"name": "relay", "args": {"value": True}}
    )
    sent = await gw.receive_publish(5)
    assert (sent["topic"], sent["payload"], sent["qos"]) == (
        "livingroom/switch/relay/command",
        b"ON",
        1,
    )
    await gw.send_message("livingroom/switch/relay/state", b"OFF")  # not the answer
    await gw.send_message("livingroom/switch/relay/state", b"ON")
    done = await finished(command.id)
    assert (done.status, done.result) == ("acked", {"state": "ON"})

    bad = await commands.submit(staff, "a4cf12f1e2d3", {"name": "relay", "args": {"value": 7}})
    assert (await finished(bad.id)).status == "failed"
    unknown = await commands.submit(staff, "a4cf12f1e2d3", {"name": "nope", "args": {}})
    failed = await finished(unknown.id)
    assert failed.status == "failed" and "no such entity" in failed.error
    # Marked failed after they would have gone out: neither did, nor a second "ON".
    assert await outputs(gw) == []


async def test_commands_wait_while_the_device_is_offline(gw, staff):
    await gw.send_message("homeassistant/switch/livingroom/relay/config", doc(ESP_SWITCH))
    await gw.send_message("homeassistant/switch/bedroom/relay/config", doc(ESP_BEDROOM_SWITCH))
    await outputs(gw)
    await gw.send_message("livingroom/status", b"offline", retain=True)
    await gw.send_message("bedroom/status", b"online", retain=True)
    assert await outputs(gw) == []
    command = await commands.submit(
        staff, "a4cf12f1e2d3", {"name": "relay", "args": {"value": False}}
    )
    # Sentinel: the online node's command, submitted next, reaches the same discovery instance
    # on the same channel after it. Its publish comes first, so the offline node's was held.
    await commands.submit(staff, "a4cf12f1e2d4", {"name": "relay", "args": {"value": True}})
    sent = await gw.receive_publish(5)
    assert (sent["topic"], sent["payload"]) == ("bedroom/switch/relay/command", b"ON")
    assert await outputs(gw) == []
    held = await database_sync_to_async(Command.objects.get)(id=command.id)
    assert held.status == "pending"

    await gw.send_message("livingroom/status", b"online")
    sent = await gw.receive_publish(5)
    assert (sent["topic"], sent["payload"]) == ("livingroom/switch/relay/command", b"OFF")
    await gw.send_message("livingroom/switch/relay/state", b"OFF")
    assert (await finished(command.id)).status == "acked"


# --- Zigbee2MQTT -------------------------------------------------------------------------------

# docs/guide/usage/mqtt_topics_and_messages.md (bridge/devices) with exposes from
# docs/guide/usage/exposes.md; a friendly name with "/" (the same page's tip).
Z2M_DEVICES = [
    {
        "ieee_address": "0x00124b00120144ae",
        "type": "Coordinator",
        "friendly_name": "Coordinator",
        "definition": None,
    },
    {
        "ieee_address": "0x00158d00018255df",
        "type": "Router",
        "network_address": 29159,
        "supported": True,
        "friendly_name": "kitchen/my_plug",
        "definition": {
            "model": "ZNCZ02LM",
            "vendor": "Xiaomi",
            "description": "Mi power plug ZigBee",
            "options": [],
            "exposes": [
                {
                    "type": "switch",
                    "features": [
                        {
                            "type": "binary",
                            "name": "state",
                            "property": "state",
                            "value_on": "ON",
                            "value_off": "OFF",
                            "value_toggle": "TOGGLE",
                            "access": 7,
                        }
                    ],
                },
                {"type": "numeric", "name": "power", "property": "power", "unit": "W", "access": 5},
            ],
        },
        "power_source": "Mains (single phase)",
        "interviewing": False,
        "interview_completed": True,
    },
    {
        "ieee_address": "0x00158d0001a2b3c4",
        "type": "EndDevice",
        "supported": True,
        "friendly_name": "bedroom_climate",
        "definition": {
            "model": "WSDCGQ11LM",
            "vendor": "Xiaomi",
            "description": "Aqara temperature, humidity and pressure sensor",
            "exposes": [
                {
                    "type": "numeric",
                    "name": "temperature",
                    "property": "temperature",
                    "unit": "°C",
                    "access": 1,
                },
                {
                    "type": "numeric",
                    "name": "humidity",
                    "property": "humidity",
                    "unit": "%",
                    "access": 1,
                },
                {
                    "type": "binary",
                    "name": "occupancy",
                    "property": "occupancy",
                    "value_on": True,
                    "value_off": False,
                    "access": 1,
                },
                {
                    "type": "enum",
                    "name": "action",
                    "property": "action",
                    "values": ["single"],
                    "access": 1,
                },
            ],
        },
    },
    {
        "ieee_address": "0x00169a00022256da",
        "type": "Router",
        "friendly_name": "my_sensor",
        "definition": None,
    },
]


async def test_zigbee2mqtt_devices_state_availability_and_set(gw, layer, dashboard, staff):
    await gw.send_message("zigbee2mqtt/bridge/devices", doc(Z2M_DEVICES), qos=1, retain=True)
    assert topics(await outputs(gw), "mqtt.subscribe") == {
        "zigbee2mqtt/kitchen/my_plug",
        "zigbee2mqtt/kitchen/my_plug/availability",
        "zigbee2mqtt/bedroom_climate",
        "zigbee2mqtt/bedroom_climate/availability",
    }
    names = {d["device"]: d["name"] for d in discovery.describe()}
    assert names == {
        "0x00158d00018255df": "kitchen/my_plug",
        "0x00158d0001a2b3c4": "bedroom_climate",
    }

    await gw.send_message("zigbee2mqtt/bedroom_climate/availability", b'{"state":"online"}')
    online = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert (online["device"], online["online"]) == ("0x00158d0001a2b3c4", True)
    await gw.send_message(
        "zigbee2mqtt/bedroom_climate",
        b'{"temperature":27.34,"humidity":44.72,"occupancy":true,"action":"single","linkquality":120}',
    )
    climate = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "telemetry")
    assert climate["metrics"] == {"temperature": 27.34, "humidity": 44.72, "occupancy": True}

    await gw.send_message("zigbee2mqtt/kitchen/my_plug/availability", b"online")  # legacy form
    await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status" and f["online"])
    command = await commands.submit(
        staff, "0x00158d00018255df", {"name": "state", "args": {"value": True}}
    )
    sent = await gw.receive_publish(5)
    assert (sent["topic"], orjson.loads(sent["payload"])) == (
        "zigbee2mqtt/kitchen/my_plug/set",
        {"state": "ON"},
    )
    await gw.send_message("zigbee2mqtt/kitchen/my_plug", b'{"state":"ON","power":12.5}')
    done = await finished(command.id)
    assert (done.status, done.result) == ("acked", {"state": "ON"})

    # The device leaves: the list is republished without it, its topics are dropped.
    await gw.send_message("zigbee2mqtt/bridge/devices", doc(Z2M_DEVICES[:2]), retain=True)
    assert topics(await outputs(gw), "mqtt.unsubscribe") == {
        "zigbee2mqtt/bedroom_climate",
        "zigbee2mqtt/bedroom_climate/availability",
    }


async def test_availability_list_with_mode_all_and_custom_payloads(gw, layer, dashboard):
    # HA docs (mqtt.markdown, "availability" list, availability_mode "all"), abbreviated.
    config = {
        "name": "Power",
        "stat_t": "plug7/power",
        "unit_of_meas": "W",
        "avty": [
            {"t": "bridge7/state"},
            {"t": "plug7/lwt", "pl_avail": "Up", "pl_not_avail": "Down"},
        ],
        "avty_mode": "all",
        "dev": {"ids": ["plug7"], "name": "Plug 7"},
    }
    await gw.send_message("homeassistant/sensor/plug7/power/config", doc(config), retain=True)
    assert topics(await outputs(gw), "mqtt.subscribe") == {
        "plug7/power",
        "bridge7/state",
        "plug7/lwt",
    }
    await gw.send_message("bridge7/state", b"online")  # one of two: not yet available
    first = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert (first["device"], first["online"]) == ("plug7", False)
    await gw.send_message("plug7/lwt", b"Down")
    await gw.send_message("plug7/lwt", b"Up")  # now both are available
    online = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert (online["device"], online["online"]) == ("plug7", True)
    await gw.send_message("bridge7/state", b"offline")
    offline = await dashboard_frame(layer, dashboard, lambda f: f["type"] == "status")
    assert offline["online"] is False


async def test_a_state_topic_cannot_shadow_a_config_topic(gw):
    sneaky = {**ESP_SENSOR, "stat_t": "homeassistant/switch/livingroom/relay/config"}
    await gw.send_message("homeassistant/sensor/livingroom/temperature/config", doc(sneaky))
    await outputs(gw)
    await gw.send_message("homeassistant/switch/livingroom/relay/config", doc(ESP_SWITCH))
    await outputs(gw)
    metrics = {e["metric"] for e in discovery.describe()[0]["entities"]}
    assert metrics == {"temperature", "relay"}  # the config was read as a config
