"""What a discovered entity's messages mean, and what its commands publish.

- State → metrics: ``sensor``/``number`` a number (a non-numeric value is no reading);
  ``binary_sensor``/``switch``/``light`` a boolean (``state_on``/``payload_on`` → true,
  ``state_off``/``payload_off`` → false); a light's brightness is the metric
  ``<metric>_brightness``; ``cover`` true when open, false when closed; ``select`` is no
  reading (its state only answers commands).
- Availability → online/offline/None (not a payload of that topic).
- Commands ``{"name": <metric>, "args": {"value": …}}`` → (topic, payload) publishes and the
  state that will acknowledge it (docs/conventions.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from devices.conventions.discovery.entities import Availability, Entity
from devices.conventions.discovery.templates import RenderError, Template
from gateway.exceptions import Rejected

_NO_JSON = object()
_UNREAD = object()


class Message:
    """One payload, decoded, JSON-parsed and put through each distinct template at most once
    for all the entities reading it (a device's entities often share one state topic)."""

    __slots__ = ("payload", "_text", "_json", "_variables", "rendered")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._text: str | None = None
        self._json: Any = _UNREAD
        self._variables: dict[str, Any] | None = None
        self.rendered: dict[int, str] = {}  # id(template) → its text for this payload

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.payload.decode("utf-8", "replace")
        return self._text

    @property
    def json(self) -> Any:
        if self._json is _UNREAD:
            try:
                self._json = orjson.loads(self.payload)
            except orjson.JSONDecodeError:
                self._json = _NO_JSON
        return self._json

    @property
    def variables(self) -> dict[str, Any]:
        """A template's ``value`` and ``value_json`` (undefined when not JSON, as in HA)."""
        if self._variables is None:
            self._variables = {"value": self.text}
            if self.json is not _NO_JSON:
                self._variables["value_json"] = self.json
        return self._variables


def _render(template: Template, message: Message) -> str:
    text = message.rendered.get(id(template))
    if text is None:
        try:
            text = template.evaluate(message.variables)
        except RenderError as exc:
            raise Rejected("bad_value", f"template: {exc}") from None
        message.rendered[id(template)] = text
    return text


def _raw(entity: Entity, message: Message, template: Template | None) -> Any:
    """The entity's state value in this message (None: the message does not carry it)."""
    if entity.json_key is not None:
        data = message.json
        if not isinstance(data, dict):
            raise Rejected("not_object", "state is not a JSON object")
        return data.get(entity.json_key)
    if template is not None:
        text = _render(template, message)
        return text if text != "" else None
    return message.text.strip()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    return str(value) == str(expected)


def _boolean(entity: Entity, value: Any) -> bool | None:
    on = entity.state_on if entity.state_on is not None else entity.payload_on
    off = entity.state_off if entity.state_off is not None else entity.payload_off
    if _same(value, on):
        return True
    if _same(value, off):
        return False
    return None


def state_metrics(entity: Entity, topic: str, message: Message) -> dict[str, float | bool]:
    """The readings this message on `topic` gives for `entity` (may be empty)."""
    comp = entity.component
    if topic == entity.brightness_state_topic and topic != entity.state_topic:
        value = _number(_raw(entity, message, entity.brightness_template))
        return {} if value is None else {f"{entity.metric}_brightness": value}
    if comp == "light" and entity.light_json:
        data = message.json
        if not isinstance(data, dict):
            raise Rejected("not_object", "a JSON light state is not an object")
        out: dict[str, float | bool] = {}
        state = _boolean(entity, data.get("state"))
        if state is not None:
            out[entity.metric] = state
        brightness = _number(data.get("brightness"))
        if brightness is not None:
            out[f"{entity.metric}_brightness"] = brightness
        return out
    value = _raw(entity, message, entity.value_template)
    if value is None:
        return {}
    if comp in ("sensor", "number"):
        number = _number(value)
        return {} if number is None else {entity.metric: number}
    if comp in ("binary_sensor", "switch", "light"):
        state = _boolean(entity, value)
        if state is None:
            if comp == "binary_sensor":
                raise Rejected("bad_value", f"{entity.metric}: {str(value)[:40]!r} is not on/off")
            return {}
        return {entity.metric: state}
    if comp == "cover":
        text = str(value).lower()
        if text in ("open", str(entity.payload_open).lower()):
            return {entity.metric: True}
        if text in ("closed", str(entity.payload_close).lower()):
            return {entity.metric: False}
    return {}


def state_text(entity: Entity, message: Message) -> Any:
    """The entity's raw state in this message (for acknowledging commands)."""
    if entity.component == "light" and entity.light_json:
        data = message.json
        return data.get("state") if isinstance(data, dict) else None
    return _raw(entity, message, entity.value_template)


def availability_of(avail: Availability, message: Message) -> bool | None:
    """online/offline from an availability message; None for any other payload."""
    if avail.json_state:
        data = message.json
        value = data.get("state") if isinstance(data, dict) else message.text.strip()
    elif avail.template is not None:
        value = _render(avail.template, message)
    else:
        value = message.text
    if value == avail.payload_available:
        return True
    if value == avail.payload_not_available:
        return False
    return None


@dataclass(slots=True)
class Publish:
    """What a command puts on the wire and the state that acknowledges it."""

    messages: list[tuple[str, bytes]]
    expect: Any  # raw state value that acks it; None: acked once published (fire-and-forget)


def _command_text(entity: Entity, value: Any) -> bytes:
    """The payload: on/off as ``payload_on``/``payload_off``, then ``command_template`` (its
    ``value`` is that payload, as in Home Assistant) or the value as text."""
    if isinstance(value, bool):
        value = entity.payload_on if value else entity.payload_off
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if entity.command_template is not None:
        try:
            return entity.command_template.render(value=value).encode()
        except RenderError as exc:
            raise Rejected("bad_value", f"command_template: {exc}") from None
    return str(value).encode()


def _arg_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.upper() in ("ON", "OFF", "TRUE", "FALSE"):
        return value.upper() in ("ON", "TRUE")
    raise ValueError("value must be true/false (or ON/OFF)")


def command(entity: Entity, args: dict[str, Any]) -> Publish:
    """The publishes for a command's args; ValueError (the command fails) for bad args."""
    comp = entity.component
    value = args.get("value")
    topic = entity.command_topic or ""
    if entity.state_topic is None:
        expect_state = False  # nothing reports back: acked once published
    else:
        expect_state = True
    if entity.json_command:
        return _json_command(entity, args, expect_state)
    if comp == "switch":
        on = _arg_bool(value)
        expect = (
            (entity.state_on if entity.state_on is not None else entity.payload_on)
            if on
            else (entity.state_off if entity.state_off is not None else entity.payload_off)
        )
        return Publish([(topic, _command_text(entity, on))], expect if expect_state else None)
    if comp == "light":
        return _light(entity, args, expect_state)
    if comp == "number":
        number = _number(value)
        if number is None:
            raise ValueError("value must be a number")
        return Publish([(topic, _command_text(entity, number))], number if expect_state else None)
    if comp == "select":
        if value not in entity.options:
            raise ValueError(f"value must be one of {entity.options[:20]}")
        return Publish([(topic, _command_text(entity, value))], value if expect_state else None)
    if comp == "button":
        return Publish([(topic, _command_text(entity, entity.payload_press))], None)
    if comp == "cover":
        verbs = {
            "open": entity.payload_open,
            "close": entity.payload_close,
            "stop": entity.payload_stop,
        }
        verb = str(value).lower()
        if verb not in verbs:
            raise ValueError("value must be open, close or stop")
        expect = {"open": "open", "close": "closed", "stop": None}[verb]
        return Publish(
            [(topic, _command_text(entity, verbs[verb]))], expect if expect_state else None
        )
    raise ValueError(f"a {comp} takes no commands")


def _light(entity: Entity, args: dict[str, Any], expect_state: bool) -> Publish:
    topic = entity.command_topic or ""
    on = _arg_bool(args["value"]) if "value" in args else None
    brightness = args.get("brightness")
    if brightness is not None:
        brightness = _number(brightness)
        if brightness is None or not 0 <= brightness <= entity.brightness_scale:
            raise ValueError(f"brightness must be 0-{entity.brightness_scale}")
        brightness = int(brightness)
    if on is None and brightness is None:
        raise ValueError("a light command needs value (on/off) and/or brightness")
    if entity.light_json:
        body: dict[str, Any] = {"state": "ON" if on is not False else "OFF"}
        if brightness is not None:
            body["brightness"] = brightness
        expect = body["state"] if expect_state else None
        return Publish([(topic, orjson.dumps(body))], expect)
    messages: list[tuple[str, bytes]] = []
    if on is not None and not (on and brightness is not None and entity.brightness_command_topic):
        messages.append((topic, _command_text(entity, on)))
    if brightness is not None:
        if not entity.brightness_command_topic:
            raise ValueError("this light has no brightness")
        messages.append((entity.brightness_command_topic, str(brightness).encode()))
    expect = None
    if expect_state:
        on_state = entity.state_on if entity.state_on is not None else entity.payload_on
        off_state = entity.state_off if entity.state_off is not None else entity.payload_off
        expect = off_state if on is False else on_state
    return Publish(messages, expect)


def _json_command(entity: Entity, args: dict[str, Any], expect_state: bool) -> Publish:
    """Zigbee2MQTT: ``{"<property>": value}`` on ``…/set``."""
    value = args.get("value")
    key = entity.json_key or entity.metric
    if entity.component in ("switch", "light"):
        on = _arg_bool(value)
        wire: Any = entity.payload_on if on else entity.payload_off
    elif entity.component == "number":
        wire = _number(value)
        if wire is None:
            raise ValueError("value must be a number")
    elif entity.component == "select":
        if value not in entity.options:
            raise ValueError(f"value must be one of {entity.options[:20]}")
        wire = value
    else:
        raise ValueError(f"a {entity.component} takes no commands")
    body = {key: wire}
    if entity.component == "light" and args.get("brightness") is not None:
        body["brightness"] = int(_number(args["brightness"]) or 0)
    return Publish(
        [(entity.command_topic or "", orjson.dumps(body))], wire if expect_state else None
    )


def acknowledges(expect: Any, state: Any) -> bool:
    """Whether a state value matches what a command expects."""
    if expect is None or state is None:
        return False
    if isinstance(expect, float):
        number = _number(state)
        return number is not None and math.isclose(number, expect, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(expect, bool) or isinstance(state, bool):
        return state is expect
    return str(state).lower() == str(expect).lower()
