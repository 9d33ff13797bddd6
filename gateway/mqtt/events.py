"""The `mqtt` ASGI events (docs/asgi-mqtt.md): their shapes, validation and v5 properties.

Shared by the interface server and `MqttCommunicator`, so a consumer unit test fails on the
same bad event the real server would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.exceptions import InvalidEvent

ASGI = {"version": "3.0", "spec_version": "1.0"}
MAX_TOPIC_BYTES = 65535


class ConnectEvent(TypedDict):
    type: Literal["mqtt.connect"]
    session_present: bool


class DisconnectEvent(TypedDict):
    type: Literal["mqtt.disconnect"]
    reason: str


class MessageEvent(TypedDict):
    type: Literal["mqtt.message"]
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any]
    params: dict[str, str]
    pattern: str
    #: QoS 1/2 only: the opaque handle to send back in `mqtt.ack` (MqttConsumer does it).
    ack: NotRequired[Any]


class RetireEvent(TypedDict):
    type: Literal["mqtt.retire"]
    reason: str


class PublishEvent(TypedDict):
    type: Literal["mqtt.publish"]
    topic: str
    payload: bytes | str
    qos: NotRequired[int]
    retain: NotRequired[bool]
    properties: NotRequired[dict[str, Any] | None]


class SubscribeEvent(TypedDict):
    type: Literal["mqtt.subscribe"]
    topic: str
    qos: NotRequired[int]


class UnsubscribeEvent(TypedDict):
    type: Literal["mqtt.unsubscribe"]
    topic: str


class AckEvent(TypedDict):
    type: Literal["mqtt.ack"]
    ack: Any  # the `ack` of a QoS 1/2 `mqtt.message`


# snake_case event keys ↔ paho property names (MQTT v5 PUBLISH properties we pass through).
PROPERTY_NAMES = {
    "payload_format_indicator": "PayloadFormatIndicator",
    "message_expiry_interval": "MessageExpiryInterval",
    "content_type": "ContentType",
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
    "user_properties": "UserProperty",
    "subscription_identifier": "SubscriptionIdentifier",
}
_OUTGOING_PROPERTIES = set(PROPERTY_NAMES) - {"subscription_identifier"}


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**32


def _is_pairs(value: Any) -> bool:
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        return all(isinstance(k, str) and isinstance(v, str) for k, v in pairs)
    except (TypeError, ValueError):
        return False


_PROPERTY_CHECKS = {
    "payload_format_indicator": lambda v: v in (0, 1) and type(v) is int,
    "message_expiry_interval": _is_uint,
    "content_type": lambda v: isinstance(v, str),
    "response_topic": lambda v: isinstance(v, str) and v and "+" not in v and "#" not in v,
    "correlation_data": lambda v: isinstance(v, bytes),
    "user_properties": _is_pairs,
}


def properties_to_dict(props: Properties | None) -> dict[str, Any]:
    """Incoming paho properties as a plain dict (`user_properties`: list of (key, value))."""
    if props is None:
        return {}
    out: dict[str, Any] = {}
    for key, name in PROPERTY_NAMES.items():
        value = getattr(props, name, None)
        if value is not None:
            out[key] = value
    return out


def properties_from_dict(props: Mapping[str, Any] | None) -> Properties | None:
    """Build paho PUBLISH properties from an event's `properties` dict (already validated)."""
    if not props:
        return None
    out = Properties(PacketTypes.PUBLISH)
    for key, value in props.items():
        if key == "user_properties":
            value = list(value.items()) if isinstance(value, Mapping) else list(value)
        setattr(out, PROPERTY_NAMES[key], value)
    return out


def _check_topic_name(topic: Any, event_type: str) -> str:
    if not isinstance(topic, str) or not topic:
        raise InvalidEvent(f"{event_type}: 'topic' must be a non-empty str, got {topic!r}")
    if "+" in topic or "#" in topic:
        raise InvalidEvent(f"{event_type}: topic {topic!r} must not contain wildcards (+, #)")
    if "\0" in topic or len(topic.encode()) > MAX_TOPIC_BYTES:
        raise InvalidEvent(f"{event_type}: topic {topic!r} has NUL or is too long")
    return topic


def check_topic_filter(topic: Any, event_type: str = "filter") -> str:
    """Validate an MQTT subscription filter (wildcards as whole levels, '#' last)."""
    if not isinstance(topic, str) or not topic:
        raise InvalidEvent(f"{event_type}: 'topic' must be a non-empty str, got {topic!r}")
    if "\0" in topic or len(topic.encode()) > MAX_TOPIC_BYTES:
        raise InvalidEvent(f"{event_type}: filter {topic!r} has NUL or is too long")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) != 1:
            raise InvalidEvent(f"{event_type}: wildcard must be a whole level in {topic!r}")
        if level == "#" and i != len(levels) - 1:
            raise InvalidEvent(f"{event_type}: '#' must be the last level in {topic!r}")
    return topic


def _check_qos(qos: Any, event_type: str) -> int:
    if type(qos) is not int or qos not in (0, 1, 2):
        raise InvalidEvent(f"{event_type}: 'qos' must be 0, 1 or 2, got {qos!r}")
    return qos


def _check_properties(props: Any) -> dict[str, Any] | None:
    if props is None:
        return None
    if not isinstance(props, Mapping):
        raise InvalidEvent(f"mqtt.publish: 'properties' must be a dict, got {props!r}")
    unknown = set(props) - _OUTGOING_PROPERTIES
    if unknown:
        raise InvalidEvent(
            f"mqtt.publish: unknown properties {sorted(unknown)}; "
            f"supported: {sorted(_OUTGOING_PROPERTIES)}"
        )
    for key, value in props.items():
        if not _PROPERTY_CHECKS[key](value):
            raise InvalidEvent(f"mqtt.publish: invalid value {value!r} for property {key!r}")
    return dict(props)


def validate_app_event(event: Any) -> dict[str, Any]:
    """Check an event an application sent; return it normalised or raise InvalidEvent."""
    if not isinstance(event, Mapping):
        raise InvalidEvent(f"an event must be a dict, got {type(event).__name__}")
    kind = event.get("type")
    if kind == "mqtt.ack":
        if event.get("ack") is None:
            raise InvalidEvent("mqtt.ack: 'ack' must be the handle of a QoS 1/2 mqtt.message")
        return {"type": kind, "ack": event["ack"]}
    if kind == "mqtt.publish":
        payload = event.get("payload")
        if isinstance(payload, str):
            payload = payload.encode()
        elif isinstance(payload, bytearray | memoryview):
            payload = bytes(payload)
        elif not isinstance(payload, bytes):
            raise InvalidEvent(f"mqtt.publish: 'payload' must be bytes or str, got {payload!r}")
        retain = event.get("retain", False)
        if not isinstance(retain, bool):
            raise InvalidEvent(f"mqtt.publish: 'retain' must be a bool, got {retain!r}")
        return {
            "type": kind,
            "topic": _check_topic_name(event.get("topic"), kind),
            "payload": payload,
            "qos": _check_qos(event.get("qos", 0), kind),
            "retain": retain,
            "properties": _check_properties(event.get("properties")),
        }
    if kind == "mqtt.subscribe":
        return {
            "type": kind,
            "topic": check_topic_filter(event.get("topic"), kind),
            "qos": _check_qos(event.get("qos", 0), kind),
        }
    if kind == "mqtt.unsubscribe":
        return {"type": kind, "topic": check_topic_filter(event.get("topic"), kind)}
    raise InvalidEvent(
        f"unknown event type {kind!r}: an mqtt application may send "
        "mqtt.publish, mqtt.subscribe, mqtt.unsubscribe or mqtt.ack"
    )
