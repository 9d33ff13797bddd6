"""Which convention a device speaks (docs/interface.md §5.2) and the command buttons the
dashboard offers for it: only what the device is known to accept."""

from __future__ import annotations

import json

import pytest

from devices.conventions import modbus_units
from devices.conventions.discovery import consumer as discovery
from devices.conventions.discovery import zigbee2mqtt
from devices.conventions.discovery.documents import ConfigTopic, entities_of
from devices.conventions.kinds import command_buttons, convention, is_diagnostic, with_conventions
from gateway.modbus.config import BusConfig, UnitConfig
from gateway.modbus.profile import load_profile

# A Tasmota STATE and SENSOR as `tele/<id>/STATE` / `tele/<id>/SENSOR` flatten them (Tasmota
# docs, "MQTT" → "tele/%topic%/STATE"; keys as firmware 13+ sends them).
TASMOTA_STATE = {
    "UptimeSec": 4120,
    "Heap": 25,
    "Sleep": 50,
    "LoadAvg": 19,
    "MqttCount": 1,
    "POWER1": True,
    "POWER2": False,
    "Wifi.AP": 1,
    "Wifi.Channel": 6,
    "Wifi.RSSI": 100,
    "Wifi.Signal": -45,
}
TASMOTA_SENSOR = {"AM2301.Temperature": 21.4, "AM2301.Humidity": 46.2}


def labels(device: dict) -> list[str]:
    return [b["label"] for b in command_buttons(device)]


def test_transport_decides_for_serial_and_modbus():
    assert convention({"id": "boiler", "transport": "serial", "metrics": {"Wifi.RSSI": 1}}) == (
        "serial"
    )
    assert convention({"id": "meter", "transport": "modbus", "metrics": {}}) == "modbus"


@pytest.mark.parametrize(
    "device_id, metrics, expected",
    [
        ("sim-0001", {"temperature": 21.5, "relay": True, "rssi": -60}, "native"),
        ("tasmota_A1B2C3", {}, "tasmota"),  # Tasmota's default topic, before any reading
        ("kitchen-plug", TASMOTA_STATE, "tasmota"),
        ("garage", TASMOTA_SENSOR, "tasmota"),
        ("garage", {"POWER": False}, "tasmota"),
        ("lab", {"power": 3.5, "wifi_rssi": -70}, "native"),  # lookalikes are not Tasmota's
    ],
)
def test_mqtt_devices_are_tasmota_by_their_topic_or_metrics_else_native(
    device_id, metrics, expected
):
    assert convention({"id": device_id, "transport": "mqtt", "metrics": metrics}) == expected


def test_with_conventions_adds_the_field_to_api_shaped_devices():
    devices = [
        {"id": "a", "transport": "mqtt", "metrics": {"t": 1}},
        {"id": "b", "transport": "serial", "metrics": {}},
    ]
    assert [d["convention"] for d in with_conventions(devices)] == ["native", "serial"]


def test_diagnostic_values_are_the_devices_own_health_not_its_measurements():
    assert all(map(is_diagnostic, ["UptimeSec", "Heap", "LoadAvg", "Wifi.RSSI", "rssi"]))
    assert not any(map(is_diagnostic, ["AM2301.Temperature", "POWER1", "temperature"]))


def test_native_and_serial_devices_get_no_guessed_buttons():
    assert command_buttons({"id": "sim-0001", "transport": "mqtt", "metrics": {"relay": 1}}) == []
    assert command_buttons({"id": "boiler", "transport": "serial", "metrics": {}}) == []


def test_tasmota_gets_power_buttons_per_relay_it_reported():
    assert labels({"id": "tasmota_1", "transport": "mqtt", "metrics": {}}) == [
        "Power ON",
        "Power OFF",
        "Power TOGGLE",
    ]
    two = command_buttons({"id": "strip", "transport": "mqtt", "metrics": TASMOTA_STATE})
    assert [(b["name"], json.loads(b["args"])) for b in two[:3]] == [
        ("Power1", {"value": "ON"}),
        ("Power1", {"value": "OFF"}),
        ("Power1", {"value": "TOGGLE"}),
    ]
    assert [b["label"] for b in two[3:]] == ["Power2 ON", "Power2 OFF", "Power2 TOGGLE"]


def test_modbus_units_offer_their_writable_points(settings, monkeypatch):
    monkeypatch.setattr(modbus_units, "_units", {})  # this test's units only
    dirs = settings.GATEWAY["MODBUS_PROFILE_DIRS"]
    relays = UnitConfig(unit=1, device="relays", profile=load_profile("waveshare-relay-8ch", dirs))
    thermo = UnitConfig(unit=2, device="thermo", profile=load_profile("xy-md02", dirs))
    modbus_units.remember([BusConfig(port="tcp://127.0.0.1:1502", units=(relays, thermo))])
    buttons = command_buttons({"id": "relays", "transport": "modbus", "metrics": {}})
    assert len(buttons) == 16 and buttons[0]["label"] == "relay1 on"
    assert json.loads(buttons[1]["args"]) == {"value": False} and not buttons[1]["fill"]
    # The XY-MD02's writable points are holding registers: a value to fill in, not a click.
    thermo_buttons = command_buttons({"id": "thermo", "transport": "modbus", "metrics": {}})
    assert [(b["label"], b["fill"]) for b in thermo_buttons] == [
        ("temperature_correction…", True),
        ("humidity_correction…", True),
    ]
    assert command_buttons({"id": "unknown-unit", "transport": "modbus", "metrics": {}}) == []


@pytest.fixture
def discovered():
    """A Home Assistant discovery device document in this process's registry (HA docs,
    mqtt.markdown "Device discovery payload": a sensor and a commandable switch)."""
    doc = {
        "dev": {"ids": "ea334450945afc", "name": "Kitchen"},
        "o": {"name": "bla2mqtt"},
        "cmps": {
            "temp": {
                "p": "sensor",
                "name": "Temperature",
                "stat_t": "kitchen/state",
                "val_tpl": "{{ value_json.temperature }}",
                "unit_of_measurement": "°C",
            },
            "light": {
                "p": "switch",
                "name": "Light",
                "cmd_t": "kitchen/light/set",
                "stat_t": "kitchen/light/state",
            },
        },
    }
    topic = "homeassistant/device/kitchen/config"
    parts = ConfigTopic(component="device", node_id=None, object_id="kitchen")
    entities = entities_of(topic, parts, json.dumps(doc).encode(), max_bytes=65536, gateway_id="gw")
    registry = discovery.shared().registry
    registry.replace(topic, entities)
    yield entities[0].device_id
    discovery.reset()


def test_discovered_devices_get_their_commandable_entities(discovered):
    device = {"id": discovered, "transport": "mqtt", "metrics": {"temp": 21.0}}
    assert convention(device) == "discovery"
    buttons = command_buttons(device)
    assert [(b["label"], b["name"], json.loads(b["args"])) for b in buttons] == [
        ("Light on", "light", {"value": True}),
        ("Light off", "light", {"value": False}),
    ]


@pytest.fixture
def zigbee_plug():
    """Zigbee2MQTT's device list with one plug (Z2M docs, guide/usage/mqtt_topics_and_messages.md
    "zigbee2mqtt/bridge/devices", exposes from guide/usage/exposes.md), in the registry."""
    from tests.test_discovery import Z2M_DEVICES

    payload = json.dumps(Z2M_DEVICES[:2]).encode()
    entities = zigbee2mqtt.entities_of("zigbee2mqtt", payload, max_bytes=1 << 20)
    discovery.shared().registry.replace(zigbee2mqtt.devices_topic("zigbee2mqtt"), entities)
    yield "0x00158d00018255df"
    discovery.reset()


def test_zigbee2mqtt_devices_are_named_so_and_get_their_switch(zigbee_plug):
    device = {"id": zigbee_plug, "transport": "mqtt", "metrics": {"state": True, "power": 3.0}}
    assert convention(device) == "zigbee2mqtt"
    assert [b["label"] for b in command_buttons(device)][:2] == ["state on", "state off"]
