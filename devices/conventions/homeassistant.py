"""Home Assistant MQTT discovery: one retained document per device (docs/homeassistant.md).

`HomeAssistantConsumer` is the one instance of a *static* route on ``<prefix>/status``
(docs/asgi-mqtt.md): the MQTT server starts it on every broker connect. It learns devices
from the database then (names, metric sets) and from the telemetry pipeline's announcements
(group ``device-metrics``: a device first seen by a process, or a new metric of it, never one
per reading), and publishes ``<prefix>/device/<id>/config`` (retained, QoS 1) only when a
device's document changes; the gateway's own is ``<prefix>/device/<gateway>/gateway/config``
(one level more: no device id can take it). Announcements only mark devices for publishing;
one task publishes them, so a burst of thousands of new devices never backs up the channel.
Home Assistant's birth message (``<prefix>/status`` = ``online``) republishes everything, as
does every broker connect (a broker may have lost retained ones).

Which devices: native MQTT devices, serial ones and Modbus units (through their mirror on the
broker; none while SERIAL_MIRROR is off, as nothing on the broker would carry their values).
Tasmota devices are left to Home Assistant's own Tasmota integration, which discovers them
natively. A native device's convention is learnt from its traffic (its retained status is
replayed on connect), so a Tasmota device is never mistaken for a native one after a restart.

Over 400 lines on purpose: the documents (identifiers, templates, device classes) and the one
consumer that publishes them belong together; ingesting other devices' documents is
`discovery/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
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


_KEPT = re.compile(r"[A-Za-z0-9-]")


def encode(text: str) -> str:
    """`text` in ``[A-Za-z0-9_-]``, injectively: ``_`` → ``__``, any other character outside
    ``[A-Za-z0-9-]`` → ``_`` and two hex digits per UTF-8 byte (``PM2.5`` → ``PM2_2e5``)."""
    out = []
    for char in text:
        if _KEPT.fullmatch(char):
            out.append(char)
        elif char == "_":
            out.append("__")
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode())
    return "".join(out)


def object_id(metric: str) -> str:
    """A metric's component id: `encode` (stable, topic-safe, distinct for distinct names)."""
    return encode(metric)


def identifier(*parts: str) -> str:
    """A Home Assistant identifier or unique id: the encoded parts joined with ``:``, which
    no encoded part holds, so distinct (kind, device, metric) tuples never share one."""
    return ":".join(encode(part) for part in parts)


def gateway_object_path(gateway_id: str) -> str:
    """``<node id>/<object id>`` of the gateway's document (one level more than a device's)."""
    return f"{encode(gateway_id)}/gateway"


def _literal(key: str) -> str:
    """`key` as a Jinja string literal."""
    return "'" + key.replace("\\", "\\\\").replace("'", "\\'") + "'"


#: Finds a flattened metric in a payload: the name's ``.``-separated parts, joined again into
#: keys at every possible split (``PMS5003.PM2.5``: the key ``PMS5003`` → the key ``PM2.5``;
#: the mirror's flat key ``PMS5003.PM2.5``), trying only keys the payload has.
_FIND = (
    "{%- macro find(v, parts, i) -%}{%- set ns = namespace(done=false) -%}"
    "{%- for j in range(i + 1, parts | length + 1) if not ns.done -%}"
    "{%- set key = parts[i:j] | join('.') -%}"
    "{%- if v is mapping and key in v -%}"
    "{%- if j == parts | length -%}{%- set ns.done = true -%}{{ SHOW }}"
    "{%- elif v[key] is mapping -%}{%- set found = find(v[key], parts, j) -%}"
    "{%- if found -%}{%- set ns.done = true -%}{{ found }}{%- endif -%}"
    "{%- endif -%}{%- endif -%}{%- endfor -%}{%- endmacro -%}"
)


def value_template(metric: str, boolean: bool) -> str:
    """Extract `metric` from a JSON telemetry payload; empty when it is not in this message.

    A flattened name ``a.b`` is read as the key ``a.b`` (serial mirror: flat) or as any nested
    path whose keys, joined with ``.``, make it (``{"PMS5003": {"PM2.5": 12}}``). An empty result
    leaves the entity's state as it was, so a message carrying only some metrics does not
    blank the others.
    """
    show = "'ON' if v[key] else 'OFF'" if boolean else "v[key]"
    parts = ", ".join(_literal(part) for part in metric.split("."))
    return _FIND.replace("SHOW", show) + f"{{{{ find(value_json, [{parts}], 0) }}}}"


@dataclass(slots=True)
class KnownDevice:
    """What discovery knows of one device."""

    name: str
    convention: str | None = None  # NATIVE, SERIAL, TASMOTA; None: not heard yet (mqtt)
    # Replaced, never changed in place: devices with the same metrics share one of each (an
    # empty set alone is 216 bytes, at every one of 10,000 devices).
    kinds: dict[str, str] = field(default_factory=dict)  # metric → "number" | "bool"
    per_metric: frozenset[str] = frozenset()  # metrics heard on .../telemetry/<m>


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
            "uniq_id": identifier(gateway_id, "device", device_id, metric),
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
            "ids": [identifier(gateway_id, "device", device_id)],
            "name": known.name,
            "mdl": "serial device" if known.convention == SERIAL else "MQTT device",
            "via_device": identifier(gateway_id, "gateway"),
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
        "dev": {"ids": [identifier(gateway_id, "gateway")], "name": f"Gateway {gateway_id}"},
        "o": origin(),
        "cmps": {
            "status": {
                "p": "binary_sensor",
                "name": "Status",
                "dev_cla": "connectivity",
                "stat_t": f"gateway/{gateway_id}/status",
                "pl_on": "online",
                "pl_off": "offline",
                "uniq_id": identifier(gateway_id, "gateway", "status"),
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
        self._kinds: dict[frozenset[tuple[str, str]], dict[str, str]] = {}  # one of each
        # Digest of the last document published per object id: a 16-byte digest, not the
        # payload (orjson's output keeps a 4 KiB buffer: ~35 MiB at 10,000 devices).
        self.published: OrderedDict[str, bytes] = OrderedDict()
        # Devices announced and not yet published, oldest first, and the task publishing them.
        self.due: dict[str, None] = {}
        self.publisher: asyncio.Task[None] | None = None
        # Birth messages: the first republishes at once, those within the interval after it
        # are coalesced into one more republish when the interval ends.
        self.last_birth = -math.inf
        self.births_waiting = 0
        self.birth_timer: asyncio.TimerHandle | None = None
        self.republisher: asyncio.Task[None] | None = None

    def topic(self, object_id: str) -> str:
        """``<prefix>/device/<object_id>/config`` (a device id, or `gateway_object_path`)."""
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
            self._set_kinds(known, {**kinds, **known.kinds})
        # What this process's pipeline announced before this instance joined the group (the
        # retained statuses replayed on subscribe race with its start).
        pipeline = current_pipeline()
        if pipeline is not None:
            self.learn(pipeline.announcements())
        await self.publish_all()

    async def mqtt_message(self, event: dict[str, Any]) -> None:
        """``<prefix>/status``: Home Assistant (re)started (``online``): republish everything,
        with whatever this process's pipeline announced (even if an announcement was lost)."""
        if bytes(event.get("payload") or b"").strip().lower() == b"online":
            self.birth()

    def birth(self) -> None:
        """Republish everything now, or once when the interval since the last one ends.

        A storm of birth messages (a misconfigured Home Assistant, a hostile publisher) costs at
        most one full republish per ``HA_DISCOVERY_REPUBLISH_SECONDS``.
        """
        self.births_waiting += 1
        if self.birth_timer is not None:
            return  # coalesced into the republish already scheduled
        loop = asyncio.get_running_loop()
        interval = settings.GATEWAY["HA_REPUBLISH_SECONDS"]
        delay = max(0.0, self.last_birth + interval - loop.time())
        self.birth_timer = loop.call_later(delay, self._republish)

    def _republish(self) -> None:
        self.birth_timer = None
        self.last_birth = asyncio.get_running_loop().time()
        if self.births_waiting > 1:
            logger.info(
                "home assistant discovery: %d birth messages, one republish", self.births_waiting
            )
        self.births_waiting = 0
        # What the pipeline announced, even if an announcement was lost: read once per
        # republish, not per birth (thousands of devices cost milliseconds each time).
        pipeline = current_pipeline()
        if pipeline is not None:
            self.learn(pipeline.announcements())
        self.republisher = asyncio.create_task(self.publish_all(), name="ha-discovery.republish")

    async def device_metrics(self, event: dict[str, Any]) -> None:
        """The pipeline saw a device, or a new metric of one: mark it for publishing.

        Only marks: publishing waits for the broker's PUBACK, and a handler that waited for it
        would let announcements pile up in this instance's channel until the layer refuses
        them. The `publisher` task publishes the marked devices, oldest first.
        """
        self.mark(self.learn(event.get("devices") or ()))

    def mark(self, device_ids: Any) -> None:
        """Queue devices for the `publisher` task (started if it is not running)."""
        for device_id in device_ids:
            self.due[device_id] = None
        if self.due and (self.publisher is None or self.publisher.done()):
            self.publisher = asyncio.create_task(self._publish_due(), name="ha-discovery.publish")

    async def _publish_due(self) -> None:
        while self.due:
            device_id = next(iter(self.due))
            del self.due[device_id]
            try:
                await self.publish_device(device_id)
            except Exception:
                logger.exception("home assistant discovery: publishing %s failed", device_id)

    async def on_retire(self) -> None:
        """Stop publishing (the next connect publishes everything again)."""
        if self.birth_timer is not None:
            self.birth_timer.cancel()
        for task in (self.publisher, self.republisher):
            if task is not None:
                task.cancel()

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
                metrics = entry.get("metrics") or {}
                self._set_kinds(known, {**known.kinds, **metrics})
                if source == METRIC and not known.per_metric.issuperset(metrics):
                    known.per_metric = frozenset((*known.per_metric, *metrics))
                devices.append(device_id)
            except Exception:
                logger.exception("home assistant discovery: bad announcement %r", entry)
        return devices

    def _set_kinds(self, known: KnownDevice, kinds: dict[str, str]) -> None:
        """Give `known` these metric kinds, as the one shared map of them."""
        if kinds != known.kinds:
            known.kinds = self._kinds.setdefault(frozenset(kinds.items()), kinds)

    def _known(self, device_id: str, name: str) -> KnownDevice:
        known = self.known.get(device_id)
        if known is None:
            known = self.known[device_id] = KnownDevice(name)
        return known

    async def publish_all(self) -> None:
        """Publish the gateway's document, and queue every device's (identical or not)."""
        self.published.clear()
        await self._publish(gateway_object_path(self.gateway_id), gateway_document(self.gateway_id))
        # `<gateway>_gateway` is no device's topic unless a device has that id: cleared, so no
        # stale gateway document lingers at the device level.
        legacy = f"{self.gateway_id}_gateway"
        if legacy not in self.known and re.fullmatch(r"[A-Za-z0-9_-]+", legacy):
            try:
                await self.publish(self.topic(legacy), b"", qos=1, retain=True)
            except BrokerUnavailable:
                pass
        self.mark(list(self.known))

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
