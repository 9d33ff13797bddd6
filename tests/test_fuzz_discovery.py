"""Hostile discovery documents, device lists, states and templates, property-based.

Whatever a publisher sends on a discovery config topic or as Zigbee2MQTT's device list, the
parsers either give entities whose device ids and metrics are contract-clean (an entity they
cannot serve carries its reason) or raise `Rejected` with a documented reason; states and
templates only ever give finite numbers and booleans or `Rejected`/`RenderError`.
"""

from __future__ import annotations

import math
import re

import orjson
from hypothesis import given
from hypothesis import strategies as st

from devices.conventions.discovery.abbreviations import ABBREVIATIONS
from devices.conventions.discovery.documents import ConfigTopic, entities_of
from devices.conventions.discovery.mapping import Message, state_metrics
from devices.conventions.discovery.templates import RenderError, Unsupported, compile_template
from devices.conventions.discovery.zigbee2mqtt import entities_of as z2m_entities
from gateway.exceptions import Rejected
from tests.support.fuzz import REASONS, fuzz

FUZZ = fuzz(75)
DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
METRIC = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
KEYS = st.sampled_from(sorted(ABBREVIATIONS) + ["~", "ids", "name", "p", "state_topic"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["~/state", "{{ value_json.t }}", "{{ value | float }}", "ON", "sensor"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(KEYS | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)
DOCUMENTS = st.dictionaries(KEYS, JSON, max_size=12)
COMPONENTS = st.sampled_from(["sensor", "binary_sensor", "switch", "light", "device", "climate"])


def check_entities(entities) -> None:
    for entity in entities:
        assert DEVICE_ID.fullmatch(entity.device_id), entity.device_id
        assert METRIC.fullmatch(entity.metric), entity.metric
        assert entity.unsupported is None or isinstance(entity.unsupported, str)
        for topic in entity.topics():
            assert topic and "+" not in topic and "#" not in topic


@FUZZ
@given(component=COMPONENTS, doc=DOCUMENTS)
def test_any_config_document_gives_clean_entities_or_a_documented_rejection(component, doc):
    payload = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    parts = ConfigTopic(component, "node", "obj")
    try:
        found = entities_of("x/config", parts, payload, max_bytes=65536, gateway_id="gw")
    except Rejected as exc:
        assert exc.reason in REASONS
        return
    if found is not None:
        check_entities(found)


@FUZZ
@given(raw=st.binary(max_size=200) | st.builds(lambda d: orjson.dumps(d), JSON))
def test_any_device_list_gives_clean_entities_or_a_documented_rejection(raw):
    try:
        check_entities(z2m_entities("zigbee2mqtt", raw, 65536))
    except Rejected as exc:
        assert exc.reason in REASONS


@FUZZ
@given(template=st.text(max_size=80), payload=st.binary(max_size=80))
def test_any_template_and_state_give_finite_readings_or_a_rejection(template, payload):
    from devices.conventions.discovery.entities import Entity

    try:
        compiled = compile_template("{{ " + template + " }}")
    except Unsupported:
        return
    for component in ("sensor", "binary_sensor", "switch"):
        entity = Entity("k", "c", component, "d", "d", "m", "m", state_topic="s")
        entity.value_template = compiled
        try:
            metrics = state_metrics(entity, "s", Message(payload))
        except Rejected as exc:
            assert exc.reason in REASONS
            continue
        except RenderError:  # pragma: no cover - state_metrics turns these into Rejected
            raise AssertionError("RenderError escaped") from None
        for value in metrics.values():
            assert type(value) is bool or (type(value) is float and math.isfinite(value))
