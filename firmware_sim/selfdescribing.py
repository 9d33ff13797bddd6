"""Simulated self-describing devices, without I/O: an ESPHome node and a Zigbee2MQTT bridge.

ESPHome (esphome/components/mqtt/mqtt_component.cpp, mqtt_sensor.cpp, mqtt_switch.cpp; the
node's ``topic_prefix`` is its name, the device id here):

- ``<node>/status``: ``online`` retained on connect, ``offline`` as the Last Will and before a
  clean disconnect.
- On connect, one retained discovery document per entity on
  ``homeassistant/<type>/<node>/<object_id>/config``, abbreviated keys, ``dev.ids`` the MAC as
  a string, ``uniq_id`` ``ESP<type><object_id>``: sensors ``temperature`` (°C) and
  ``humidity`` (%), switch ``relay``.
- Every tick ``<node>/sensor/<object_id>/state`` with the value as text (``21.50``), retained
  (ESPHome's default); the switch's state ``ON``/``OFF`` retained on connect and on change.
- Commands on ``<node>/switch/relay/command``: ``ON``, ``OFF``, ``TOGGLE``.

Zigbee2MQTT (Koenkk/zigbee2mqtt.io docs/guide/usage/mqtt_topics_and_messages.md, exposes.md):
one simulated bridge on the base topic ``zigbee2mqtt`` with two Zigbee devices whose friendly
names contain a ``/`` (as the docs allow): ``<id>/plug`` (switch ``state``, ``power`` W,
``temperature`` °C, ``linkquality``) and ``<id>/climate`` (``temperature`` °C, ``humidity`` %,
``occupancy``, ``linkquality``).

- ``zigbee2mqtt/bridge/state`` ``online``/``offline`` retained (also the Will);
  ``zigbee2mqtt/bridge/devices`` retained: the coordinator and both devices with exposes.
- ``zigbee2mqtt/<friendly_name>`` each device's state JSON every tick;
  ``zigbee2mqtt/<friendly_name>/availability`` ``{"state":"online"}`` retained.
- ``zigbee2mqtt/<id>/plug/set`` ``{"state": "ON"|"OFF"|"TOGGLE"}`` → the plug's new state.

A real bridge lists every device on its network; a second simulated bridge on the same broker
would replace the first one's list, so run one ``zigbee2mqtt`` style device per broker.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from firmware_sim.firmware import Firmware, Outgoing, Reply, dumps

ESPHOME_VERSION = "2024.11.0"


def fake_mac(device_id: str) -> str:
    """A stable, made-up MAC (12 lower-case hex digits) for a simulated node."""
    return hashlib.sha1(device_id.encode()).hexdigest()[:12]


class EsphomeFirmware(Firmware):
    """An ESPHome node with MQTT and Home Assistant discovery (module docstring)."""

    style = "esphome"
    discovery_prefix = "homeassistant"

    @property
    def node(self) -> str:
        return self.device_id

    def will(self) -> Outgoing:
        return Outgoing(f"{self.node}/status", b"offline", qos=1, retain=True)

    def goodbye(self) -> Outgoing:
        return self.will()

    def _device(self) -> dict[str, Any]:
        mac = fake_mac(self.device_id)
        return {
            "ids": mac,
            "name": self.node,
            "sw": f"{ESPHOME_VERSION} (config hash 0x{mac[:8]})",
            "mdl": "esp32dev",
            "mf": "Espressif",
            "cns": [["mac", mac]],
        }

    def discovery(self) -> list[Outgoing]:
        """The retained discovery documents (mqtt_component.cpp `send_discovery_`)."""
        docs = []
        sensors = (
            ("temperature", "Temperature", "temperature", "°C"),
            ("humidity", "Humidity", "humidity", "%"),
        )
        for object_id, name, device_class, unit in sensors:
            doc = {
                "dev_cla": device_class,
                "unit_of_meas": unit,
                "stat_cla": "measurement",
                "name": name,
                "stat_t": f"{self.node}/sensor/{object_id}/state",
                "avty_t": f"{self.node}/status",
                "uniq_id": f"ESPsensor{object_id}",
                "dev": self._device(),
            }
            topic = f"{self.discovery_prefix}/sensor/{self.node}/{object_id}/config"
            docs.append(Outgoing(topic, dumps(doc), qos=1, retain=True))
        switch = {
            "name": "Relay",
            "stat_t": f"{self.node}/switch/relay/state",
            "cmd_t": f"{self.node}/switch/relay/command",
            "avty_t": f"{self.node}/status",
            "uniq_id": "ESPswitchrelay",
            "dev": self._device(),
        }
        topic = f"{self.discovery_prefix}/switch/{self.node}/relay/config"
        docs.append(Outgoing(topic, dumps(switch), qos=1, retain=True))
        return docs

    def _relay_state(self) -> Outgoing:
        state = b"ON" if self.relay else b"OFF"
        return Outgoing(f"{self.node}/switch/relay/state", state, qos=0, retain=True)

    def birth(self) -> list[Outgoing]:
        return [
            Outgoing(f"{self.node}/status", b"online", qos=1, retain=True),
            *self.discovery(),
            self._relay_state(),
        ]

    def subscriptions(self) -> list[str]:
        return [f"{self.node}/switch/relay/command"]

    def telemetry(self, now: float) -> list[Outgoing]:
        self.seq += 1
        sample = self.signals.sample(now)
        return [
            Outgoing(
                f"{self.node}/sensor/temperature/state",
                f"{sample['temperature']:.2f}".encode(),
                qos=self.qos,
                retain=True,
            ),
            Outgoing(
                f"{self.node}/sensor/humidity/state",
                f"{sample['humidity']:.1f}".encode(),
                qos=self.qos,
                retain=True,
            ),
        ]

    def handle(self, topic: str, payload: bytes) -> Reply | None:
        if topic != f"{self.node}/switch/relay/command":
            return None
        text = payload.decode("utf-8", "replace").strip().upper()
        if text == "ON":
            self.relay = True
        elif text == "OFF":
            self.relay = False
        elif text == "TOGGLE":
            self.relay = not self.relay
        else:
            return Reply()  # ESPHome ignores other payloads (logs a warning)
        return Reply([self._relay_state()])


def _numeric(name: str, unit: str, access: int = 1) -> dict[str, Any]:
    return {"type": "numeric", "name": name, "property": name, "unit": unit, "access": access}


class Zigbee2MqttFirmware(Firmware):
    """A Zigbee2MQTT bridge with a plug and a climate sensor (module docstring)."""

    style = "zigbee2mqtt"
    base = "zigbee2mqtt"

    @property
    def plug(self) -> str:
        return f"{self.device_id}/plug"

    @property
    def climate(self) -> str:
        return f"{self.device_id}/climate"

    def _ieee(self, suffix: str) -> str:
        return "0x" + fake_mac(f"{self.device_id}/{suffix}").rjust(16, "0")

    def will(self) -> Outgoing:
        return Outgoing(f"{self.base}/bridge/state", b"offline", qos=1, retain=True)

    def goodbye(self) -> Outgoing:
        return self.will()

    def devices(self) -> list[dict[str, Any]]:
        """``bridge/devices`` as the docs show it: the coordinator, the plug, the sensor."""
        state = {
            "type": "binary",
            "name": "state",
            "property": "state",
            "value_on": "ON",
            "value_off": "OFF",
            "value_toggle": "TOGGLE",
            "access": 7,
        }
        occupancy = {
            "type": "binary",
            "name": "occupancy",
            "property": "occupancy",
            "value_on": True,
            "value_off": False,
            "access": 1,
        }
        return [
            {
                "ieee_address": "0x00124b00120144ae",
                "type": "Coordinator",
                "network_address": 0,
                "supported": False,
                "friendly_name": "Coordinator",
                "definition": None,
                "interview_completed": True,
            },
            {
                "ieee_address": self._ieee("plug"),
                "type": "Router",
                "network_address": 29159,
                "supported": True,
                "friendly_name": self.plug,
                "definition": {
                    "model": "ZNCZ02LM",
                    "vendor": "Xiaomi",
                    "description": "Mi power plug ZigBee",
                    "options": [],
                    "exposes": [
                        {"type": "switch", "features": [state]},
                        _numeric("power", "W", access=5),
                        _numeric("temperature", "°C"),
                        _numeric("linkquality", "lqi"),
                    ],
                },
                "power_source": "Mains (single phase)",
                "model_id": "lumi.plug",
                "interview_completed": True,
            },
            {
                "ieee_address": self._ieee("climate"),
                "type": "EndDevice",
                "network_address": 4711,
                "supported": True,
                "friendly_name": self.climate,
                "definition": {
                    "model": "RTCGQ11LM",
                    "vendor": "Xiaomi",
                    "description": "Aqara human body movement and illuminance sensor",
                    "options": [],
                    "exposes": [
                        _numeric("temperature", "°C"),
                        _numeric("humidity", "%"),
                        occupancy,
                        _numeric("linkquality", "lqi"),
                    ],
                },
                "power_source": "Battery",
                "model_id": "lumi.sensor_motion.aq2",
                "interview_completed": True,
            },
        ]

    def _plug_state(self, temperature: float) -> Outgoing:
        body = {
            "state": "ON" if self.relay else "OFF",
            "power": round(abs(temperature) * 2.5, 1) if self.relay else 0.0,
            "temperature": temperature,
            "linkquality": 120,
        }
        return Outgoing(f"{self.base}/{self.plug}", dumps(body), qos=self.qos)

    def birth(self) -> list[Outgoing]:
        online = b'{"state":"online"}'
        return [
            Outgoing(f"{self.base}/bridge/state", b"online", qos=1, retain=True),
            Outgoing(f"{self.base}/bridge/devices", dumps(self.devices()), qos=1, retain=True),
            Outgoing(f"{self.base}/{self.plug}/availability", online, qos=1, retain=True),
            Outgoing(f"{self.base}/{self.climate}/availability", online, qos=1, retain=True),
        ]

    def subscriptions(self) -> list[str]:
        return [f"{self.base}/{self.plug}/set"]

    def telemetry(self, now: float) -> list[Outgoing]:
        self.seq += 1
        sample = self.signals.sample(now)
        climate = {
            "temperature": sample["temperature"],
            "humidity": sample["humidity"],
            "occupancy": self.seq % 10 < 3,
            "linkquality": 96,
        }
        return [
            self._plug_state(float(sample["temperature"])),
            Outgoing(f"{self.base}/{self.climate}", dumps(climate), qos=self.qos),
        ]

    def handle(self, topic: str, payload: bytes) -> Reply | None:
        if topic != f"{self.base}/{self.plug}/set":
            return None
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return Reply()  # Zigbee2MQTT logs "Invalid JSON" and does nothing
        state = body.get("state") if isinstance(body, dict) else None
        if not isinstance(state, str) or state.upper() not in ("ON", "OFF", "TOGGLE"):
            return Reply()
        state = state.upper()
        self.relay = (not self.relay) if state == "TOGGLE" else state == "ON"
        return Reply([self._plug_state(float(self.signals.sample()["temperature"]))])
