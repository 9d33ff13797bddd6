"""The discovery consumers: self-describing devices (Home Assistant discovery, Zigbee2MQTT).

Two routes (devices/routing.py), like every convention one instance per key:

- ``discovery`` (`DiscoveryConsumer`, static, one instance): the config topics
  ``<prefix>/+/+/config``, ``<prefix>/+/+/+/config`` and ``<base>/bridge/devices``. It keeps
  the process's entities (`SHARED`), subscribes (``mqtt.subscribe``) to their state and
  availability topics and unsubscribes the ones no entity needs any more, registers devices
  with their names, and takes their commands (it joins each ``device.<id>``).
- ``discovered`` (`EntityConsumer`, one instance per topic, created by the router only for
  topics an entity listens to): state → readings, availability → presence, and the state that
  acknowledges a command. Each topic has its own bounded queue, as each native device does.

Retained state replayed on subscribe is the device's state, not a new reading: it sets
presence and answers commands but is not stored again (a restart stores no duplicates).
Mapping and limits: docs/conventions.md, docs/interface.md §3.7 and §3.8.

Just over 400 lines: the config consumer and the per-entity consumer share one registry.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
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
MQTT = Transport.MQTT.value
#: Commands remembered per device while awaiting the state that acknowledges them.
MAX_AWAITING = 64


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


def config_patterns() -> list[str]:
    """The config topics of the ``discovery`` route."""
    cfg = config()
    patterns = []
    if cfg["ingest"]:
        prefix = cfg["prefix"]
        patterns += [
            f"{prefix}/{{component}}/{{object_id}}/config",
            f"{prefix}/{{component}}/{{node_id}}/{{object_id}}/config",
        ]
    if cfg["z2m"]:
        patterns.append(zigbee2mqtt.devices_topic(cfg["z2m"]))
    return patterns


@dataclass
class Shared:
    """What the process knows of discovered devices, shared by both consumers (one loop)."""

    registry: Registry
    online: dict[str, bool] = field(default_factory=dict)
    availability: dict[str, tuple[bool, int]] = field(default_factory=dict)  # topic → (on, n)
    heard: int = 0  # availability messages so far: orders them for availability_mode latest
    awaiting: dict[str, deque[tuple[str, str, Any]]] = field(default_factory=dict)
    named: dict[str, str] = field(default_factory=dict)  # device names written to the database


_shared: list[Shared] = []


def shared() -> Shared:
    """The process's `Shared` (created on first use)."""
    if not _shared:
        _shared.append(Shared(Registry(config()["max_entities"])))
    return _shared[0]


def reset() -> None:
    """Forget everything (the ``discovery`` instance retires at shutdown)."""
    if _shared:
        _shared.pop().registry.clear()


def describe() -> list[dict[str, Any]]:
    """Discovered devices and entities of this process (unsupported ones with the reason)."""
    return _shared[0].registry.describe() if _shared else []


def device_entities(device_id: str) -> list[dict[str, Any]]:
    """The discovered entities of one device in this process (for the admin)."""
    for device in describe():
        if device["device"] == device_id:
            return list(device["entities"])
    return []


class _DiscoveredDevices(MqttConsumer):
    """Presence and commands of discovered devices (both consumers need them)."""

    broker_up = False

    @cached_property
    def state(self) -> Shared:
        return shared()

    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        self.broker_up = True
        get_timers()

    async def mqtt_disconnect(self, message: dict[str, Any]) -> None:
        """Presence is unknown until the retained availability comes back."""
        self.broker_up = False
        self.state.online.clear()
        self.state.availability.clear()

    async def set_online(self, device_id: str, online: bool) -> None:
        """Store a change of presence; held commands go out when it turns online."""
        if self.state.online.get(device_id) == online:
            return
        self.state.online[device_id] = online
        get_pipeline().submit_status(device_id, Transport.MQTT.value, online, time.time(), SOURCE)
        if online and self.broker_up:
            await self.deliver_held(device_id)

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
        entity = self.state.registry.entity(device_id, str(cmd["name"]))
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
        queue = self.state.awaiting.setdefault(device_id, deque())
        if len(queue) >= MAX_AWAITING:
            queue.popleft()
        queue.append((str(cmd["id"]), entity.metric, publish.expect))

    async def _finish(self, device_id: str, done: list[tuple]) -> None:
        for command_id, ok, result, error in done:
            await commands.apply_ack(device_id, command_id, ok, result, error)

    async def mqtt_message(self, event: dict[str, Any]) -> None:
        """Count a rejection by reason; a bug costs this one message."""
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
        raise NotImplementedError


class DiscoveryConsumer(_DiscoveredDevices):
    """Config documents, subscriptions and commands of discovered devices (module docstring)."""

    @cached_property
    def cfg(self) -> dict[str, Any]:
        return config()

    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        """Held commands of devices known online go out (after a broker outage)."""
        await super().mqtt_connect(message)
        for device_id, online in list(self.state.online.items()):
            if online:
                await self.deliver_held(device_id)

    async def mqtt_retire(self, message: dict[str, Any]) -> None:
        """At shutdown the process forgets its entities (a static instance retires only then)."""
        reset()
        await super().mqtt_retire(message)

    async def handle(self, topic: str, event: dict[str, Any]) -> None:
        payload: bytes = event["payload"]
        if self.cfg["z2m"] and topic == zigbee2mqtt.devices_topic(self.cfg["z2m"]):
            entities = zigbee2mqtt.entities_of(self.cfg["z2m"], payload, self.cfg["max_bytes"])
            await self.apply(topic, entities, "zigbee2mqtt")
            return
        parts = documents.parse_topic(topic, self.cfg["prefix"]) if self.cfg["ingest"] else None
        if parts is None:
            raise Rejected("bad_topic", f"not a discovery topic: {topic!r}")
        found = documents.entities_of(
            topic,
            parts,
            payload,
            max_bytes=self.cfg["max_bytes"],
            gateway_id=self.cfg["gateway_id"],
        )
        if found is not None:  # None: the gateway's own document (docs/interface.md §3.4)
            await self.apply(topic, found, "homeassistant")

    async def apply(self, source: str, entities: list[Entity], kind: str) -> None:
        """Replace what `source` announced; (un)subscribe topics; name devices."""
        registry = self.state.registry
        try:
            added, removed = registry.replace(source, entities)
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
            await self.register(device_id, registry.devices.get(device_id, device_id))
        logger.info("discovery (%s): %s → %d entities", kind, source, len(entities))

    async def register(self, device_id: str, name: str) -> None:
        """The device exists (commands can name it) with its original name; joins its group."""
        if self.state.named.get(device_id) != name:
            await database_sync_to_async(_name_device)(device_id, name)
            self.state.named[device_id] = name
        if self.channel_layer is not None:
            await self.channel_layer.group_add(f"device.{device_id}", self.channel_name)

    async def device_command(self, event: dict[str, Any]) -> None:
        """A command for one of our devices (group ``device.<id>``): delivered now if the
        device is online and the broker up, else held."""
        try:
            device_id = await database_sync_to_async(_device_of)(event.get("id"))
            if device_id is None or device_id not in self.state.registry.devices:
                return
            if self.state.online.get(device_id) and self.broker_up:
                done: list[tuple] = []
                await commands.deliver(event["id"], self._sender(device_id, done))
                await self._finish(device_id, done)
        except Exception:
            logger.exception("discovery: command %r not delivered", event.get("id"))


class EntityConsumer(_DiscoveredDevices):
    """One state or availability topic of discovered entities (module docstring)."""

    async def handle(self, topic: str, event: dict[str, Any]) -> None:
        """State and availability of the entities listening to `topic`."""
        state = self.state
        listeners = state.registry.by_topic.get(topic)
        if not listeners:
            return  # unsubscribed a moment ago
        message = Message(event["payload"])
        readings: dict[str, dict[str, float | bool]] = {}
        presence: set[str] = set()
        for entity in list(listeners):
            for avail in entity.availability:
                if avail.topic == topic:
                    online = availability_of(avail, message)
                    if online is not None:
                        state.heard += 1
                        state.availability[topic] = (online, state.heard)
                        presence.add(entity.device_id)
            if topic == entity.state_topic or topic == entity.brightness_state_topic:
                try:
                    metrics = state_metrics(entity, topic, message)
                except Rejected as exc:  # the device's own record says so too
                    get_pipeline().submit_rejection(entity.device_id, exc.reason, str(exc))
                    raise
                if metrics:
                    readings.setdefault(entity.device_id, {}).update(metrics)
                if topic == entity.state_topic and state.awaiting.get(entity.device_id):
                    await self.answer(entity, state_text(entity, message))
        pipeline = get_pipeline()
        now = time.time()
        # The message is acknowledged once its last device's reading is stored: the writer
        # stores submissions in order, so every earlier one is stored by then.
        last = next(reversed(readings), None)
        for device_id, metrics in readings.items():
            if not event.get("retain"):
                pipeline.submit_reading(
                    device_id,
                    MQTT,
                    now,
                    metrics,
                    source=SOURCE,
                    durable=self.defer_ack() if device_id == last else None,
                )
            if not state.online.get(device_id) and not self._has_availability(device_id):
                await self.set_online(device_id, True)  # heard: online (no availability topic)
        for device_id in presence:
            await self.set_online(device_id, self._available(device_id))

    def _has_availability(self, device_id: str) -> bool:
        return any(e.availability for e in self.state.registry.device_entities(device_id))

    def _available(self, device_id: str) -> bool:
        """A device is online when any of its entities is available (docs/conventions.md)."""
        for entity in self.state.registry.device_entities(device_id):
            states = [self.state.availability.get(a.topic) for a in entity.availability]
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

    async def answer(self, entity: Entity, state: Any) -> None:
        """Acknowledge the oldest command this state answers."""
        queue = self.state.awaiting.get(entity.device_id)
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


__all__ = ["TOPICS", "DiscoveryConsumer", "EntityConsumer", "describe", "enabled"]
