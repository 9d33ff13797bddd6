"""The discovered entities of one bridge process, indexed by the topics they listen to.

One `Registry` per process (devices/conventions/discovery/consumer.py `shared`); `TOPICS` is
what the MQTT router asks (`accepts`) to send a message on a topic the discovery consumer
subscribed to an entity's instance rather than counting it as unrouted. Bounds: at most
`max_entities` entities; a document that would pass it is refused whole (`too_large`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from devices.conventions.discovery.entities import Entity


@dataclass
class TopicIndex:
    """The topics discovered entities listen to (the ``discovered`` route's `accepts`)."""

    exact: set[str] = field(default_factory=set)

    def accepts(self, topic: str) -> bool:
        """Whether a message on `topic` belongs to a discovered entity."""
        return topic in self.exact


#: The process's index (the router's `accepts` reads it; the consumer keeps it current).
TOPICS = TopicIndex()


class Registry:
    """Entities by key, by device and by topic; what to (un)subscribe when they change."""

    def __init__(self, max_entities: int) -> None:
        self.max_entities = max_entities
        self.entities: dict[str, Entity] = {}
        self.by_source: dict[str, list[str]] = defaultdict(list)  # config topic → keys
        self.by_topic: dict[str, list[Entity]] = defaultdict(list)
        self.devices: dict[str, str] = {}  # device id → name
        self.by_device: dict[str, dict[str, Entity]] = defaultdict(dict)  # id → key → entity
        #: `describe()`'s answer, rebuilt on each change and swapped whole, so other threads
        #: (the admin) read it safely.
        self.snapshot: tuple[dict[str, Any], ...] = ()

    def device_entities(self, device_id: str) -> list[Entity]:
        """The entities of a device."""
        return list(self.by_device.get(device_id, {}).values())

    def entity(self, device_id: str, metric: str) -> Entity | None:
        """A device's entity by metric (= command name)."""
        for entity in self.by_device.get(device_id, {}).values():
            if entity.metric == metric:
                return entity
        return None

    def replace(self, source: str, entities: list[Entity]) -> tuple[set[str], set[str]]:
        """Put `entities` in place of what `source` announced before; returns the topics to
        subscribe and to unsubscribe. `OverflowError` past `max_entities` entities or twice as
        many topics (nothing changes)."""
        old_keys = self.by_source.get(source, [])
        if len(self.entities) - len(old_keys) + len(entities) > self.max_entities:
            raise OverflowError(f"more than {self.max_entities} discovered entities")
        # Availability lists could multiply the topics: at most two per entity allowed.
        wanted = set().union(*(e.topics() for e in entities if e.unsupported is None))
        if len(self.by_topic.keys() | wanted) > 2 * self.max_entities:
            raise OverflowError(f"more than {2 * self.max_entities} discovered topics")
        before = set(self.by_topic)
        for key in old_keys:
            self._drop(key)
        self.by_source.pop(source, None)
        for entity in entities:
            self._unique_metric(entity)
            if entity.key in self.entities:
                self._drop(entity.key)
            self.entities[entity.key] = entity
            self.by_device[entity.device_id][entity.key] = entity
            self.by_source[source].append(entity.key)
            self.devices[entity.device_id] = entity.device_name
            if entity.unsupported is None:
                for topic in entity.topics():
                    self.by_topic[topic].append(entity)
        after = set(self.by_topic)
        TOPICS.exact.difference_update(before - after)
        TOPICS.exact.update(after)
        self.snapshot = tuple(self._describe())
        return after - before, before - after

    def _unique_metric(self, entity: Entity) -> None:
        """Two entities of one device never share a metric: the later gets its component
        as a prefix (``switch_relay``)."""
        siblings = self.by_device.get(entity.device_id, {})
        taken = {e.metric for e in siblings.values() if e.key != entity.key}
        if entity.metric in taken:
            entity.metric = f"{entity.component}_{entity.metric}"[:64]

    def _drop(self, key: str) -> None:
        entity = self.entities.pop(key, None)
        if entity is None:
            return
        for topic in entity.topics():
            listeners = self.by_topic.get(topic)
            if listeners is not None:
                listeners[:] = [e for e in listeners if e.key != key]
                if not listeners:
                    del self.by_topic[topic]
        siblings = self.by_device.get(entity.device_id, {})
        siblings.pop(key, None)
        if not siblings:
            self.by_device.pop(entity.device_id, None)
            self.devices.pop(entity.device_id, None)

    def describe(self) -> list[dict[str, Any]]:
        """Devices and their entities, for the API and the admin (any thread)."""
        return list(self.snapshot)

    def _describe(self) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for entity in sorted(self.entities.values(), key=lambda e: (e.device_id, e.metric)):
            device = out.setdefault(
                entity.device_id,
                {"device": entity.device_id, "name": entity.device_name, "entities": []},
            )
            device["entities"].append(entity.describe())
        return list(out.values())

    def clear(self) -> set[str]:
        """Forget everything; the topics to unsubscribe."""
        topics = set(self.by_topic)
        TOPICS.exact.difference_update(topics)
        self.entities.clear()
        self.by_source.clear()
        self.by_topic.clear()
        self.devices.clear()
        self.by_device.clear()
        self.snapshot = ()
        return topics
