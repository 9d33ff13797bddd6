"""Templates of the commonest shapes are read without a Jinja render, to the render's own text
(devices/conventions/discovery/direct.py), and a message puts each template through once.

The templates are the ones devices ship, copied from their sources:

- Zigbee2MQTT: Koenkk/zigbee2mqtt lib/extension/homeassistant.ts (``value_json["<property>"]``
  for every exposed property, ``{{ value_json.state }}``, ``{{ value_json.log_level | lower }}``,
  ``{{ value_json.coordinator.meta.revision }}``, ``{{ value_json.permit_join | lower }}``),
  states in the format of Koenkk/zigbee2mqtt.io docs/guide/usage/mqtt_topics_and_messages.md;
- rtl_433: merbanan/rtl_433 examples/rtl_433_mqtt_hass.py (``{{ value|float }}``,
  ``{{ value|int }}``, ``{{ value|float|round(1) }}``, ``{{ (float(value|float) * 3.6) |
  round(2) }}``), whose state topics carry one bare value each;
- OpenMQTTGateway: 1technophile/OpenMQTTGateway main/config_mqttDiscovery.h
  (``{{ value_json.tempc | is_defined }}`` and its siblings, ``{{ float(value_json.pa) * 0.01 |
  is_defined }}``), BLE states in the format its docs show (``tempc``, ``hum``, ``batt``, ``volt``);
- Home Assistant's template docs (home-assistant.io source/_docs/configuration/
  templating.markdown): ``float(0)``, ``round``, ``default``;
- the bench's device document (bench/scenarios.py `discovered_ingest`).

The proof is a comparison: for these templates and for generated ones of the same shapes, on
real and generated payloads, the direct text equals the sandboxed render's, and wherever the
direct path declines, the render decides (its text or its `RenderError`).
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.conventions.discovery.direct import FALLBACK, FILTERS
from devices.conventions.discovery.entities import Entity
from devices.conventions.discovery.mapping import Message, state_metrics, state_text
from devices.conventions.discovery.templates import (
    RenderError,
    Template,
    compile_template,
)
from gateway.exceptions import Rejected
from tests.support.fuzz import fuzz

FUZZ = fuzz(150)

# (source, payload the device publishes with it, the text a render gives)
SHIPPED = [
    # Zigbee2MQTT: a WSDCGQ11LM climate sensor's state and the bridge's own entities.
    ('{{ value_json["temperature"] }}', b'{"battery":100,"humidity":58.17,"linkquality":132,'
     b'"pressure":1002,"temperature":23.41,"voltage":3045}', "23.41"),
    ('{{ value_json["occupancy"] }}', b'{"occupancy":true,"illuminance":381}', "True"),
    ("{{ value_json.state }}", b'{"state":"ON","brightness":215}', "ON"),
    ("{{ value_json.state }}", b'{"state":"online"}', "online"),
    ("{{ value_json.log_level | lower }}", b'{"log_level":"INFO","version":"2.1.1"}', "info"),
    ("{{ value_json.coordinator.meta.revision }}",
     b'{"coordinator":{"meta":{"revision":20230507},"type":"zStack3x0"}}', "20230507"),
    ("{{ value_json.permit_join | lower }}", b'{"permit_join":false}', "false"),
    # A piece of its update entity's template (the whole one builds JSON: rendered).
    ("{{ value_json['update']['installed_version'] }}",
     b'{"update":{"installed_version":587753021,"state":"idle"}}', "587753021"),
    # rtl_433_mqtt_hass.py: one bare value per topic.
    ("{{ value|float }}", b"21.3", "21.3"),
    ("{{ value|int }}", b"1", "1"),
    ("{{ value|float|round(1) }}", b"21.34", "21.3"),
    ("{{ value|float|round(2) }}", b"1.005", "1.0"),
    ("{{ (float(value|float) * 3.6) | round(2) }}", b"2.5", "9.0"),
    # OpenMQTTGateway: a LYWSD03MMC heard over BLE.
    ("{{ value_json.tempc | is_defined }}", b'{"id":"A4:C1:38:C3:8E:E5","model":"LYWSD03MMC",'
     b'"tempc":22.8,"tempf":73.04,"hum":45,"batt":86,"volt":2.99,"rssi":-62}', "22.8"),
    ("{{ value_json.batt | is_defined }}", b'{"batt":86,"volt":2.99}', "86"),
    ("{{ float(value_json.pa) * 0.01 | is_defined }}", b'{"pa":101325}', "1013.25"),
    # Home Assistant's template docs and the bench's device document.
    ("{{ value_json.temperature | float(0) }}", b'{"n":7,"temperature":21.5}', "21.5"),
    ("{{ value_json.temperature | float(0) }}", b'{"temperature":"n/a"}', "0"),
    ("{{ value_json.n }}", b'{"n":7,"temperature":21.5}', "7"),
    ("{{ value_json.t | default(5) }}", b'{"t":12}', "12"),
    ("{{ value }}", b"  ON \n", "ON"),
]  # fmt: skip

#: The shapes read directly (the others are rendered: calls like ``float(value)``, operators).
DIRECT = {source for source, _, _ in SHIPPED if "float(value" not in source and "*" not in source}


def rendered(template: Template, variables: dict) -> str:
    """The sandboxed render alone (the same compiled template without its direct plan)."""
    return Template(template.source, template._compiled).evaluate(variables)


def variables_of(payload: bytes) -> dict:
    return Message(payload).variables


def outcome(template: Template, variables: dict, *, render_only: bool = False) -> tuple:
    """("text", the text) or ("error", the RenderError's message)."""
    try:
        if render_only:
            return "text", rendered(template, variables)
        return "text", template.evaluate(variables)
    except RenderError as exc:
        return "error", str(exc)


@pytest.mark.parametrize(("source", "payload", "text"), SHIPPED)
def test_shipped_templates_read_as_the_render_reads_them(source, payload, text):
    template = compile_template(source)
    variables = variables_of(payload)
    assert rendered(template, variables) == text
    assert template.evaluate(variables) == text
    if source in DIRECT:
        assert template._direct is not None, "a common shape went to the renderer"
        assert template._direct(variables) == text
    else:
        assert template._direct is None


@pytest.mark.parametrize(
    ("source", "payload"),
    [
        # The sandbox answers these, not the direct path: a missing key (undefined, or an
        # error for is_defined), dict methods and internals named like keys, a failing
        # filter, a state that is not JSON.
        ("{{ value_json.tempc | is_defined }}", b'{"hum":45}'),
        ("{{ value_json.temperature }}", b'{"humidity":45}'),
        ("{{ value_json.items }}", b'{"items":3}'),
        ("{{ value_json.__class__ }}", b'{"__class__":3}'),
        ("{{ value_json.state }}", b'["state"]'),
        ("{{ value_json.state }}", b"ON"),
        ("{{ value | int }}", b"unknown"),
        ("{{ value_json.a.b }}", b'{"a":"text"}'),
    ],
)
def test_what_only_the_sandbox_can_say_is_left_to_it(source, payload):
    template = compile_template(source)
    variables = variables_of(payload)
    assert template._direct is not None
    assert template._direct(variables) is FALLBACK
    assert outcome(template, variables) == outcome(template, variables, render_only=True)


# --- generated templates of the direct shapes, on generated payloads ---------------------------
KEYS = st.sampled_from(
    ["temperature", "state", "n", "a", "b", "0", "items", "keys", "get", "__class__", "_x", "ä"]
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["21.5", " 7 ", "ON", "off", "0x1F", "1e400", "nan", "", "2025-11-27T03:26:40Z"]
    ),
    st.text(max_size=12),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=12,
)
PAYLOADS = st.one_of(
    st.builds(orjson.dumps, VALUES),
    st.binary(max_size=30),
    st.sampled_from([b"21.5", b" 42 ", b"ON", b"", b"null", b"\xff\xfe"]),
)
ARGS = {
    "float": st.sampled_from(["", "(0)", "(-1.5)", "('x')", "(none)"]),
    "int": st.sampled_from(["", "(0)", "(0, 16)", "(default=3)"]),
    "round": st.sampled_from(
        ["", "(1)", "(2)", "(0, 'floor')", "(1, 'ceil')", "(2, 'half')", "(20)", "(1, default=0)"]
    ),  # fmt: skip
    "default": st.sampled_from(["", "(5)", "('', true)", "('None')"]),
    "d": st.sampled_from(["(0)"]),
    "replace": st.sampled_from(["('a', 'b')", "('', 'xy')", "('.', ',', 1)"]),
    "iif": st.sampled_from(["", "('on', 'off')", "('on', 'off', 'none')"]),
    "multiply": st.sampled_from(["(10)", "(0.1)", "('x')"]),
    "bitwise_and": st.sampled_from(["(255)", "(1)"]),
    "bitwise_or": st.sampled_from(["(256)"]),
    "timestamp_custom": st.sampled_from(["", "('%H:%M')"]),
    "as_timestamp": st.sampled_from(["", "(0)"]),
}


@st.composite
def direct_templates(draw) -> str:
    """``<text>{{ value[_json] <steps> | <filters> }}<text>`` with constant keys and args."""
    path = draw(st.sampled_from(["value", "value_json"]))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(KEYS | st.integers(-3, 3))
        if isinstance(key, int):
            path += f"[{key}]"
        elif key.isidentifier() and draw(st.booleans()):
            path += f".{key}"
        else:
            path += f"[{key!r}]"
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(FILTERS)))
        path += f" | {name}{draw(ARGS.get(name, st.just('')))}"
    before, after = (
        draw(st.sampled_from(["", " ", "x=", "\n"])),
        draw(st.sampled_from(["", " ", "%"])),
    )
    return f"{before}{{{{ {path} }}}}{after}"


@FUZZ
@given(source=direct_templates(), payload=PAYLOADS)
def test_the_direct_text_is_the_render_text(source, payload):
    template = compile_template(source)
    assert template._direct is not None, source
    variables = variables_of(payload)
    expected = outcome(template, variables, render_only=True)
    direct = template._direct(variables)
    if direct is not FALLBACK:
        assert ("text", direct) == expected, (source, payload)
    assert outcome(template, variables) == expected


@pytest.mark.parametrize(
    "source",
    [
        "{% if value_json.a %}{{ value_json.a }}{% endif %}",
        "{{ value_json.a }}{{ value_json.b }}",
        "{{ value_json[value] }}",
        "{{ value_json.a | float(value) }}",
        "{{ value_json.a | map('x') }}",
        "{{ value_json.a | first }}",
        "{{ value_json.a | tojson }}",
        "{{ now() }}",
        "{{ value_json.a + 1 }}",
        "{{ value_json.a | float(1e400) }}",
        "{{ x.a }}",
    ],
)
def test_other_shapes_are_always_rendered(source):
    assert compile_template(source)._direct is None


def test_one_source_is_compiled_once_and_shared():
    first = compile_template("{{ value_json['temperature'] | float(0) | round(1) }}")
    assert compile_template("{{ value_json['temperature'] | float(0) | round(1) }}") is first


def test_a_message_puts_each_template_through_once_for_all_its_entities():
    # Two entities of one device reading the same key (as a Zigbee2MQTT light's state and a
    # switch of the same property): one evaluation serves both, and the command
    # acknowledgement reads the same text.
    state = compile_template('{{ value_json["state"] }}')
    light = Entity("l", "c", "switch", "d", "d", "light", "light", state_topic="s")
    relay = Entity("r", "c", "binary_sensor", "d", "d", "relay", "relay", state_topic="s")
    light.value_template = relay.value_template = state
    message = Message(b'{"state":"ON","linkquality":120}')
    assert state_metrics(light, "s", message) == {"light": True}
    assert message.rendered == {id(state): "ON"}
    assert state_metrics(relay, "s", message) == {"relay": True}
    assert state_text(light, message) == "ON"
    assert message.rendered == {id(state): "ON"}


def test_a_failing_template_rejects_the_message_each_time_it_is_read():
    broken = compile_template("{{ value_json.tempc | is_defined }}")
    entity = Entity("t", "c", "sensor", "d", "d", "tempc", "tempc", state_topic="s")
    entity.value_template = broken
    message = Message(b'{"hum":45}')
    for _ in range(2):
        with pytest.raises(Rejected, match="not defined"):
            state_metrics(entity, "s", message)
    assert message.rendered == {}
