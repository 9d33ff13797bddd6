"""Home Assistant MQTT discovery: one retained document per device (docs/homeassistant.md).

`HomeAssistantConsumer` is the one instance of a *static* route on ``<prefix>/status``
(docs/asgi-mqtt.md): the MQTT server starts it on every broker connect. It learns devices
from the database then (names, metric sets) and from the telemetry pipeline's announcements
(group ``device-metrics``: a device first seen by a process, or a new metric of it, never one
per reading), and publishes ``<prefix>/device/<id>/config`` (retained, QoS 1) only when a
device's document changes. Home Assistant's birth message (``<prefix>/status`` = ``online``)
republishes everything, as does every broker connect (a broker may have lost retained ones).

Which devices: native MQTT devices, serial ones and Modbus units (through their mirror on the
broker; none while SERIAL_MIRROR is off, as nothing on the broker would carry their values).
Tasmota devices are left to Home Assistant's own Tasmota integration, which discovers them
natively. A native device's convention is learnt from its traffic (its retained status is
replayed on connect), so a Tasmota device is never mistaken for a native one after a restart.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import orjson
from channels.db import database_sync_to_async
from django.conf import settings

from devices.conventions import mirror
from devices.conventions.native import METRIC, STATUS, TELEMETRY
from devices.models import Device
from devices.telemetry.announce import DEVICE_METRICS_GROUP
from devices.telemetry.pipeline import current_pipeline
from gateway.exceptions import BrokerUnavailable
from gateway.mqtt.consumer import MqttConsumer

logger = logging.getLogger(__name__)

#: Devices whose published document is remembered; past it the least recently changed is
#: forgotten (and republished, identical, if it is announced again).
MAX_DEVICES = 100_000
ORIGIN_NAME = "mqtt-channels-gateway"
_OBJECT_ID = re.compile(r"[A-Za-z0-9_-]+")
# Last segment of a metric name (lower case) → (device_class, unit), where it is obvious.
WELL_KNOWN: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "°C"),
    "temp": ("temperature", "°C"),
    "humidity": ("humidity", "%"),
    "hum": ("humidity", "%"),
    "pressure": ("pressure", "hPa"),
    "battery": ("battery", "%"),
    "voltage": ("voltage", "V"),
    "current": ("current", "A"),
    "illuminance": ("illuminance", "lx"),
    "lux": ("illuminance", "lx"),
    "co2": ("carbon_dioxide", "ppm"),
    "rssi": ("signal_strength", "dBm"),
}
NATIVE, SERIAL, TASMOTA = "native", "serial", "tasmota"
#: Transports whose devices reach the broker through the mirror (serial lines, Modbus units).
MIRRORED = (SERIAL, "modbus")


def enabled() -> bool:
    """Whether discovery is published (HA_DISCOVERY, default on)."""
    return bool(settings.GATEWAY["HA_DISCOVERY"])


def prefix() -> str:
    """The discovery prefix (HA_DISCOVERY_PREFIX, default ``homeassistant``)."""
    return settings.GATEWAY["HA_DISCOVERY_PREFIX"]


def object_id(metric: str) -> str:
    """A stable component id for a metric: itself if plain, else a slug and a short hash."""
    if _OBJECT_ID.fullmatch(metric):
        return metric
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", metric).strip("_")[:48]
    return f"{slug}_{hashlib.sha1(metric.encode()).hexdigest()[:6]}"


def _literal(key: str) -> str:
    """`key` as a Jinja string literal."""
    return "'" + key.replace("\\", "\\\\").replace("'", "\\'") + "'"


def value_template(metric: str, boolean: bool) -> str:
    """Extract `metric` from a JSON telemetry payload; empty when it is not in this message.

    A flattened name ``a.b`` is read as the key ``a.b`` (serial mirror: flat) or the path
    ``a`` → ``b`` (a device's nested object). An empty result leaves the entity's state as it
    was, so a message carrying only some metrics does not blank the others.
    """
    paths = [[metric]]
    parts = metric.split(".")
    if len(parts) > 1 and all(parts):
        paths.append(parts)
    branches = []
    for path in paths:
        access = "value_json"
        guard = ["value_json is mapping"]
        for i, key in enumerate(path):
            access += f"[{_literal(key)}]"
            guard.append(f"{access} is {'defined' if i == len(path) - 1 else 'mapping'}")
        shown = f"'ON' if {access} else 'OFF'" if boolean else access
        branches.append((" and ".join(guard), shown))
    out = ""
    for i, (guard, shown) in enumerate(branches):
        out += f"{{% {'if' if i == 0 else 'elif'} {guard} %}}{{{{ {shown} }}}}"
    return out + "{% endif %}"


@dataclass(slots=True)
class KnownDevice:
    """What discovery knows of one device."""

    name: str
    convention: str | None = None  # NATIVE, SERIAL, TASMOTA; None: not heard yet (mqtt)
    kinds: dict[str, str] = field(default_factory=dict)  # metric → "number" | "bool"
    per_metric: set[str] = field(default_factory=set)  # metrics heard on .../telemetry/<m>


def convention_of(transport: str, source: str) -> str | None:
    """The device convention an announcement reveals (None: it does not say)."""
    if transport in MIRRORED:
        return SERIAL
    if source.startswith(("tele/", "stat/")):
        return TASMOTA
    if source in (TELEMETRY, METRIC, STATUS) or source.startswith("devices/"):
        return NATIVE
    return None


def device_document(
    gateway_id: str, device_id: str, known: KnownDevice, *, mirrored: bool
) -> dict[str, Any] | None:
    """The discovery document of a device, or None when it is not published."""
    if known.convention == SERIAL and not mirrored:
        return None
    if known.convention not in (NATIVE, SERIAL) or not known.kinds:
        return None
    telemetry = f"devices/{device_id}/telemetry"
    components: dict[str, dict[str, Any]] = {}
    for metric in sorted(known.kinds):
        boolean = known.kinds[metric] == "bool"
        oid = object_id(metric)
        comp: dict[str, Any] = {
            "p": "binary_sensor" if boolean else "sensor",
            "name": metric,
            "uniq_id": f"{gateway_id}_{device_id}_{oid}",
        }
        if metric in known.per_metric:
            comp["stat_t"] = f"{telemetry}/{metric}"
            if boolean:  # a bare true/false (any case)
                comp["val_tpl"] = "{{ 'ON' if value | lower == 'true' else 'OFF' }}"
        else:
            comp["val_tpl"] = value_template(metric, boolean)
        if not boolean:
            # A measurement: also makes Home Assistant ignore the empty template results.
            comp["stat_cla"] = "measurement"
            hint = WELL_KNOWN.get(metric.rsplit(".", 1)[-1].lower())
            if hint is not None:
                comp["dev_cla"], comp["unit_of_meas"] = hint
        components[oid] = comp
    return {
        "dev": {
            "ids": [f"{gateway_id}_{device_id}"],
            "name": known.name,
            "mdl": "serial device" if known.convention == SERIAL else "MQTT device",
            "via_device": f"{gateway_id}_gateway",
        },
        "o": origin(),
        "avty": [
            {"t": f"gateway/{gateway_id}/status"},
            # Devices may say Online/OFFLINE (docs/interface.md §3.1: case-insensitive).
            {"t": f"devices/{device_id}/status", "val_tpl": "{{ value | lower }}"},
        ],
        "avty_mode": "all",
        "stat_t": telemetry,
        "cmps": components,
    }


def gateway_document(gateway_id: str) -> dict[str, Any]:
    """The gateway itself: the device every other one is `via_device`, with its connectivity."""
    return {
        "dev": {"ids": [f"{gateway_id}_gateway"], "name": f"Gateway {gateway_id}"},
        "o": origin(),
        "cmps": {
            "status": {
                "p": "binary_sensor",
                "name": "Status",
                "dev_cla": "connectivity",
                "stat_t": f"gateway/{gateway_id}/status",
                "pl_on": "online",
                "pl_off": "offline",
                "uniq_id": f"{gateway_id}_gateway_status",
            }
        },
    }


def origin() -> dict[str, str]:
    """The `origin` mapping Home Assistant requires in device discovery."""
    try:
        version = metadata.version(ORIGIN_NAME)
    except metadata.PackageNotFoundError:
        version = "0.1.0"
    return {"name": ORIGIN_NAME, "sw": version}


class HomeAssistantConsumer(MqttConsumer):
    """Publishes and refreshes the discovery documents (see the module docstring)."""

    groups = [DEVICE_METRICS_GROUP]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway_id: str = settings.GATEWAY["GATEWAY_ID"]
        self.known: dict[str, KnownDevice] = {}
        # Digest of the last document published per object id: a 16-byte digest, not the
        # payload (orjson's output keeps a 4 KiB buffer: ~35 MiB at 10,000 devices).
        self.published: OrderedDict[str, bytes] = OrderedDict()

    def topic(self, object_id: str) -> str:
        """``<prefix>/device/<object_id>/config``."""
        return f"{prefix()}/device/{object_id}/config"

    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        """Broker (re)connected: load the devices from the database and publish everything."""
        try:
            stored = await database_sync_to_async(_stored_devices)()
        except Exception:
            logger.exception("home assistant discovery: reading the devices failed")
            stored = {}
        for device_id, (name, transport, kinds) in stored.items():
            known = self._known(device_id, name)
            known.name = name
            if transport in MIRRORED:
                known.convention = SERIAL
            for metric, kind in kinds.items():
                known.kinds.setdefault(metric, kind)
        # What this process's pipeline announced before this instance joined the group (the
        # retained statuses replayed on subscribe race with its start).
        pipeline = current_pipeline()
        if pipeline is not None:
            self.learn(pipeline.announcements())
        await self.publish_all()

    async def mqtt_message(self, event: dict[str, Any]) -> None:
        """``<prefix>/status``: Home Assistant (re)started (``online``): republish everything."""
        if bytes(event.get("payload") or b"").strip().lower() == b"online":
            await self.publish_all()

    async def device_metrics(self, event: dict[str, Any]) -> None:
        """The pipeline saw a device, or a new metric of one: publish what changed."""
        for device_id in self.learn(event.get("devices") or ()):
            await self.publish_device(device_id)

    def learn(self, entries: Any) -> list[str]:
        """Take in pipeline announcements; returns the devices they were about."""
        devices = []
        for entry in entries:
            try:
                device_id = entry["device"]
                known = self._known(device_id, device_id)
                source = entry.get("source") or ""
                convention = convention_of(entry.get("transport") or "", source)
                if convention is not None and known.convention != TASMOTA:
                    known.convention = convention
                for metric, kind in (entry.get("metrics") or {}).items():
                    known.kinds[metric] = kind
                    if source == METRIC:
                        known.per_metric.add(metric)
                devices.append(device_id)
            except Exception:
                logger.exception("home assistant discovery: bad announcement %r", entry)
        return devices

    def _known(self, device_id: str, name: str) -> KnownDevice:
        known = self.known.get(device_id)
        if known is None:
            known = self.known[device_id] = KnownDevice(name)
        return known

    async def publish_all(self) -> None:
        """Publish the gateway's and every publishable device's document (identical or not)."""
        self.published.clear()
        await self._publish(f"{self.gateway_id}_gateway", gateway_document(self.gateway_id))
        for device_id in list(self.known):
            await self.publish_device(device_id)

    async def publish_device(self, device_id: str) -> None:
        """Publish one device's document if it differs from the last one published."""
        known = self.known.get(device_id)
        if known is None:
            return
        document = device_document(self.gateway_id, device_id, known, mirrored=mirror.enabled())
        if document is None:
            return
        await self._publish(device_id, document)

    async def _publish(self, object_id: str, document: dict[str, Any]) -> None:
        payload = orjson.dumps(document)
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if self.published.get(object_id) == digest:
            return
        try:
            await self.publish(self.topic(object_id), payload, qos=1, retain=True)
        except BrokerUnavailable:
            return  # the next connect publishes everything again
        self.published[object_id] = digest
        self.published.move_to_end(object_id)
        if len(self.published) > MAX_DEVICES:
            self.published.popitem(last=False)


def _stored_devices() -> dict[str, tuple[str, str, dict[str, str]]]:
    """``{id: (name, transport, {metric: kind})}`` of every stored device (one query)."""
    out = {}
    for device_id, name, transport, metrics in Device.objects.values_list(
        "id", "name", "transport", "metrics"
    ).iterator(chunk_size=2000):
        kinds = {}
        if isinstance(metrics, dict):
            for metric, value in metrics.items():
                kinds[metric] = "bool" if isinstance(value, bool) else "number"
        out[device_id] = (name or device_id, transport, kinds)
    return out
