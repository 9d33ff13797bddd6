"""`DiscoveryConsumer`: self-describing devices (Home Assistant discovery, Zigbee2MQTT).

One static instance per bridge (docs/asgi-mqtt.md, ``static`` routes) owns every discovered
entity. On its first broker connect it subscribes to the discovery config topics and
Zigbee2MQTT's ``bridge/devices``; for each entity it subscribes (``mqtt.subscribe``) to its
state and availability topics, which the router sends back here (`registry.TOPICS`). State →
readings, availability → presence, commands → the entity's command topic, acknowledged when
the matching state comes back (docs/conventions.md, docs/interface.md §3.7 and §3.8).

Retained state replayed on subscribe is the device's state, not a new reading: it sets
presence and answers commands but is not stored again (a restart stores no duplicates).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from functools import cached_property
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from devices.commands import service as commands
from devices.commands.timers import get_timers
from devices.conventions.discovery import documents, zigbee2mqtt
from devices.conventions.discovery.entities import Entity
from devices.conventions.discovery.mapping import (
    Message,
    acknowledges,
    availability_of,
    command,
    state_metrics,
    state_text,
)
from devices.conventions.discovery.registry import TOPICS, Registry
from devices.models import Command, Device, Transport
from devices.telemetry.pipeline import get_pipeline
from gateway.exceptions import BrokerUnavailable, Rejected
from gateway.metrics import DISCOVERY_REFUSED, MESSAGES_REJECTED
from gateway.mqtt.consumer import MqttConsumer

logger = logging.getLogger(__name__)

SOURCE = "discovery"
#: Commands remembered per device while awaiting the state that acknowledges them.
MAX_AWAITING = 64
#: The registry of the running instance, for the API (one bridge per process).
CURRENT: list[Registry] = []


def config() -> dict[str, Any]:
    """The discovery settings (docs/interface.md §2)."""
    cfg = settings.GATEWAY
    return {
        "prefix": cfg["HA_DISCOVERY_PREFIX"],
        "ingest": cfg["HA_DISCOVERY_INGEST"],
        "z2m": cfg["ZIGBEE2MQTT_BASE_TOPIC"],
        "max_entities": cfg["DISCOVERY_MAX_ENTITIES"],
        "max_bytes": cfg["DISCOVERY_MAX_BYTES"],
        "gateway_id": cfg["GATEWAY_ID"],
    }


def enabled() -> bool:
    """Whether discovery documents or Zigbee2MQTT are ingested at all."""
    cfg = settings.GATEWAY
    return bool(cfg["HA_DISCOVERY_INGEST"] or cfg["ZIGBEE2MQTT_BASE_TOPIC"])


def route_filter() -> Any:
    """The router's `accepts` for the discovery route: config topics, Zigbee2MQTT's device
    list, and the topics entities listen to (kept current by the consumer)."""
    cfg = config()
    TOPICS.config_prefix = cfg["prefix"] + "/" if cfg["ingest"] else None
    if cfg["z2m"]:
        TOPICS.extra.add(zigbee2mqtt.devices_topic(cfg["z2m"]))
    return TOPICS.accepts


def describe() -> list[dict[str, Any]]:
    """Discovered devices and entities of this process (unsupported ones with the reason)."""
    return CURRENT[-1].describe() if CURRENT else []


class DiscoveryConsumer(MqttConsumer):
    """Every discovered entity of this bridge (see the module docstring)."""

    broker_up = False
    subscribed = False

    @cached_property
    def cfg(self) -> dict[str, Any]:
        return config()

    @cached_property
    def registry(self) -> Registry:
        registry = Registry(self.cfg["max_entities"])
        CURRENT.append(registry)
        route_filter()
        return registry

    @cached_property
    def online(self) -> dict[str, bool | None]:
        return {}

    @cached_property
    def availability(self) -> dict[str, tuple[bool, int]]:
        """Last heard value of each availability topic, with the order it was heard in."""
        return {}

    heard = 0  # counts availability messages, to find the latest of several topics

    @cached_property
    def awaiting(self) -> dict[str, deque[tuple[str, str, Any]]]:
        return {}

    @cached_property
    def named(self) -> dict[str, str]:
        """Device names already written to the database."""
        return {}

    # -- broker session ---------------------------------------------------------------------

    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        """Subscribe once to the config topics (the server replays them on reconnect)."""
        self.broker_up = True
        registry = self.registry
        get_timers()
        if not self.subscribed:
            self.subscribed = True
            if self.cfg["ingest"]:
                prefix = self.cfg["prefix"]
                await self.subscribe(f"{prefix}/+/+/config", qos=1)
                await self.subscribe(f"{prefix}/+/+/+/config", qos=1)
            if self.cfg["z2m"]:
                await self.subscribe(zigbee2mqtt.devices_topic(self.cfg["z2m"]), qos=1)
        for device_id in list(registry.devices):
            if self.online.get(device_id):
                await self.deliver_held(device_id)

    async def mqtt_disconnect(self, message: dict[str, Any]) -> None:
        """Presence is unknown until the retained availability comes back."""
        self.broker_up = False
        self.online.clear()
        self.availability.clear()

    async def on_retire(self) -> None:
        if self.registry in CURRENT:
            CURRENT.remove(self.registry)
        self.registry.clear()

    # -- messages ---------------------------------------------------------------------------

    async def mqtt_message(self, event: dict[str, Any]) -> None:
        """A config, a Zigbee2MQTT device list, or an entity's state/availability."""
        topic = event["topic"]
        try:
            await self.handle(topic, event)
        except Rejected as exc:
            MESSAGES_REJECTED.labels(reason=exc.reason).inc()
            logger.debug("discovery: rejected %s: %s", topic, exc)
        except Exception:
            MESSAGES_REJECTED.labels(reason="consumer_error").inc()
            logger.exception("discovery: error handling %r", topic)

    async def handle(self, topic: str, event: dict[str, Any]) -> None:
        payload: bytes = event["payload"]
        # Config topics first: an entity naming one as its state topic cannot shadow it.
        parts = documents.parse_topic(topic, self.cfg["prefix"]) if self.cfg["ingest"] else None
        if parts is None:
            if self.cfg["z2m"] and topic == zigbee2mqtt.devices_topic(self.cfg["z2m"]):
                entities = zigbee2mqtt.entities_of(self.cfg["z2m"], payload, self.cfg["max_bytes"])
                await self.apply(topic, entities, "zigbee2mqtt")
            elif topic in self.registry.by_topic:
                await self.entity_message(topic, event)
            return  # else a topic unsubscribed a moment ago
        entities = documents.entities_of(
            topic,
            parts,
            payload,
            max_bytes=self.cfg["max_bytes"],
            gateway_id=self.cfg["gateway_id"],
        )
        if entities is None:
            return  # the gateway's own document (docs/interface.md §3.4)
        await self.apply(topic, entities, "homeassistant")

    async def apply(self, source: str, entities: list[Entity], kind: str) -> None:
        """Replace what `source` announced; (un)subscribe topics; name devices."""
        try:
            added, removed = self.registry.replace(source, entities)
        except OverflowError as exc:
            DISCOVERY_REFUSED.labels(reason="too_many_entities").inc()
            raise Rejected("too_large", str(exc)) from None
        for entity in entities:
            if entity.unsupported:
                DISCOVERY_REFUSED.labels(reason="unsupported").inc()
                logger.warning(
                    "discovery: %s %s of %s unsupported: %s",
                    entity.component,
                    entity.metric,
                    entity.device_id,
                    entity.unsupported,
                )
        for topic in sorted(removed):
            await self.unsubscribe(topic)
        for topic in sorted(added):
            await self.subscribe(topic, qos=1)
        for device_id in {e.device_id for e in entities}:
            await self.register(device_id, self.registry.devices.get(device_id, device_id))
        logger.info("discovery (%s): %s → %d entities", kind, source, len(entities))

    async def register(self, device_id: str, name: str) -> None:
        """The device exists (commands can name it) with its original name; joins its group."""
        if self.named.get(device_id) != name:
            await database_sync_to_async(_name_device)(device_id, name)
            self.named[device_id] = name
        if self.channel_layer is not None:
            await self.channel_layer.group_add(f"device.{device_id}", self.channel_name)

    async def entity_message(self, topic: str, event: dict[str, Any]) -> None:
        """State and availability of the entities listening to `topic`."""
        message = Message(event["payload"])
        retained = bool(event.get("retain"))
        readings: dict[str, dict[str, float | bool]] = {}
        presence: set[str] = set()
        for entity in list(self.registry.by_topic.get(topic, ())):
            for avail in entity.availability:
                if avail.topic == topic:
                    online = availability_of(avail, message)
                    if online is not None:
                        self.heard += 1
                        self.availability[topic] = (online, self.heard)
                        presence.add(entity.device_id)
            if topic in (entity.state_topic, entity.brightness_state_topic):
                metrics = state_metrics(entity, topic, message)
                if metrics:
                    readings.setdefault(entity.device_id, {}).update(metrics)
                if topic == entity.state_topic:
                    await self.answer(entity, state_text(entity, message))
        pipeline = get_pipeline()
        now = time.time()
        for device_id, metrics in readings.items():
            if not retained:
                pipeline.submit_reading(
                    device_id,
                    Transport.MQTT.value,
                    now,
                    metrics,
                    source=SOURCE,
                    durable=self.defer_ack(),
                )
            if not self.registry.by_device.get(device_id) or not self._has_availability(device_id):
                await self.set_online(device_id, True)
        for device_id in presence:
            await self.set_online(device_id, self._available(device_id))

    def _has_availability(self, device_id: str) -> bool:
        return any(e.availability for e in self.registry.device_entities(device_id))

    def _available(self, device_id: str) -> bool:
        """A device is online when any of its entities is available (docs/conventions.md)."""
        for entity in self.registry.device_entities(device_id):
            states = [self.availability.get(a.topic) for a in entity.availability]
            heard = [s for s in states if s is not None]
            if not heard:
                continue
            mode = entity.availability_mode
            if mode == "all" and len(heard) == len(states) and all(s[0] for s in heard):
                return True
            if mode == "any" and any(s[0] for s in heard):
                return True
            if mode == "latest" and max(heard, key=lambda s: s[1])[0]:
                return True
        return False

    async def set_online(self, device_id: str, online: bool) -> None:
        """Store a change of presence; held commands go out when it turns online."""
        if self.online.get(device_id) == online:
            return
        self.online[device_id] = online
        get_pipeline().submit_status(device_id, Transport.MQTT.value, online, time.time(), SOURCE)
        if online and self.broker_up:
            await self.deliver_held(device_id)

    # -- commands ---------------------------------------------------------------------------

    async def device_command(self, event: dict[str, Any]) -> None:
        """A command for one of our devices (group ``device.<id>``): delivered now if the
        device is online and the broker up, else held."""
        try:
            device_id = await database_sync_to_async(_device_of)(event.get("id"))
            if device_id is None or device_id not in self.registry.devices:
                return
            if self.online.get(device_id) and self.broker_up:
                done: list[tuple] = []
                await commands.deliver(event["id"], self._sender(device_id, done))
                await self._finish(device_id, done)
        except Exception:
            logger.exception("discovery: command %r not delivered", event.get("id"))

    async def deliver_held(self, device_id: str) -> None:
        """Send a device's pending commands, oldest first."""
        try:
            done: list[tuple] = []
            await commands.deliver_pending(device_id, self._sender(device_id, done))
            await self._finish(device_id, done)
        except Exception:
            logger.exception("discovery: held commands of %s not delivered", device_id)

    def _sender(self, device_id: str, done: list[tuple]) -> Any:
        async def send(cmd: dict[str, Any]) -> None:
            await self.send_command(device_id, cmd, done)

        return send

    async def send_command(self, device_id: str, cmd: dict[str, Any], done: list[tuple]) -> None:
        """Publish a command on its entity's topics; a bad command or a fire-and-forget one
        is finished (into `done`) once the service has marked it sent."""
        entity = self.registry.entity(device_id, str(cmd["name"]))
        if entity is None or entity.unsupported:
            why = entity.unsupported if entity else "no such entity"
            done.append((cmd["id"], False, None, f"cannot command {cmd['name']}: {why}"))
            return
        try:
            publish = command(entity, cmd.get("args") or {})
        except (ValueError, Rejected) as exc:
            done.append((cmd["id"], False, None, str(exc)[:500]))
            return
        try:
            for topic, payload in publish.messages:
                await self.publish(topic, payload, qos=max(1, entity.qos), retain=entity.retain)
        except BrokerUnavailable as exc:
            raise ConnectionError(str(exc) or "broker unavailable") from exc
        if publish.expect is None:
            done.append((cmd["id"], True, {"published": len(publish.messages)}, ""))
            return
        queue = self.awaiting.setdefault(device_id, deque())
        if len(queue) >= MAX_AWAITING:
            queue.popleft()
        queue.append((str(cmd["id"]), entity.metric, publish.expect))

    async def _finish(self, device_id: str, done: list[tuple]) -> None:
        for command_id, ok, result, error in done:
            await commands.apply_ack(device_id, command_id, ok, result, error)

    async def answer(self, entity: Entity, state: Any) -> None:
        """Acknowledge the oldest command this state answers."""
        queue = self.awaiting.get(entity.device_id)
        if not queue:
            return
        for entry in list(queue):
            command_id, metric, expect = entry
            if metric == entity.metric and acknowledges(expect, state):
                queue.remove(entry)
                if await commands.apply_ack(
                    entity.device_id, command_id, True, {"state": state}, ""
                ):
                    return


def _device_of(command_id: Any) -> str | None:
    try:
        return Command.objects.filter(id=command_id).values_list("device_id", flat=True).first()
    except Exception:  # a malformed id (ValidationError)
        return None


def _name_device(device_id: str, name: str) -> None:
    """Register the device with its discovered name (an admin-set name is kept)."""
    device, created = Device.objects.get_or_create(
        id=device_id, defaults={"name": name, "transport": Transport.MQTT.value}
    )
    if not created and not device.name:
        Device.objects.filter(id=device_id, name="").update(name=name)
