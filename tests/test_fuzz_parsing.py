"""Hostile MQTT payloads, property-based: what the parsers accept is always contract-clean.

Accepted ⇒ every metric is a finite float or a bool under a valid name, taken from the payload
at that dotted path, and ``ts`` lies between 2000-01-01 and a day ahead of the receive time.
Rejected ⇒ a `Rejected` with one of the reasons docs/architecture.md lists, never another
exception. Ids and names are checked against models written independently of the regexes.
"""

from __future__ import annotations

import functools
import math
import string
from datetime import UTC, datetime

import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from devices.conventions.tasmota import parse_power, parse_state
from devices.telemetry.parsing import (
    FUTURE_SLACK,
    MAX_ACK_ID,
    MAX_DEPTH,
    MIN_TS,
    MS_THRESHOLD,
    parse_ack,
    parse_metric_value,
    parse_status,
    parse_telemetry,
    parse_timestamp,
    valid_device_id,
    valid_metric_name,
)
from gateway.exceptions import Rejected
from tests.support.fuzz import REASONS, assert_contract_telemetry, clean_metric_name, fuzz

FUZZ = fuzz(75)
NOW = 1_764_214_000.0
MAX_BYTES = 64 * 1024
ID_CHARS = set(string.ascii_letters + string.digits + "_-")

odd_text = st.one_of(
    st.text(max_size=70),
    st.text(st.characters(codec="utf-8"), max_size=70),
    st.sampled_from(
        [
            "d1\n",
            "\nd1",
            "d 1",
            "d\u00e9",
            "ｄ1",
            "d\u200b1",
            "d1\x00",
            "x" * 64,
            "x" * 65,
            "",
            "-",
            "٣",
            "$SYS",
            "a/b",
            "+",
            "#",
            "d1\r",
            "İ",
            "K",
        ]  # the last: Kelvin sign, not K
    ),
)


@functools.cache  # one strategy object per size: building them per draw is slow and flaky
def json_document(max_leaves: int = 30) -> st.SearchStrategy:
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    )
    key = st.one_of(st.text(max_size=8), st.sampled_from(["ts", "", "a.b", "\x00", "\x85", "é"]))
    return st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(key, inner, max_size=5),
        max_leaves=max_leaves,
    )


@st.composite
def telemetry_payload(draw) -> bytes:
    """JSON objects of every shape, nonsense around them, deep nesting, NaN/Infinity, big ts."""
    kind = draw(st.sampled_from(["object", "any", "bytes", "deep", "nonfinite", "ts", "wide"]))
    if kind == "any":
        return orjson.dumps(draw(json_document()))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "deep":
        depth = draw(st.integers(MAX_DEPTH - 2, 1200))
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "wide":
        n = draw(st.integers(250, 262))
        return orjson.dumps({f"m{i}": i for i in range(n)})
    obj = draw(st.dictionaries(st.text(max_size=8), json_document(15), max_size=6))
    if kind == "ts":
        obj["ts"] = draw(timestamp_value)
    body = orjson.dumps(obj)
    if kind == "nonfinite":
        token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"]))
        body = body[:-1] + (b"," if obj else b"") + b'"x":' + token + b"}"
    return body


timestamp_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(MIN_TS - 10, NOW + 2 * FUTURE_SLACK),
    st.floats(MIN_TS * 1000 - 1e4, (NOW + 2 * FUTURE_SLACK) * 1000),
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.text(max_size=80),
    st.lists(st.integers(-(2**63), 2**63), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(-(2**63), 2**63), max_size=2),
)


def leaves(obj: object, prefix: str = "", depth: int = 1):
    """(dotted name, value) of every number and boolean in a decoded object."""
    for key, value in obj.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.", depth + 1)
        elif isinstance(value, bool | int | float) and not (depth == 1 and key == "ts"):
            yield prefix + key, value


@FUZZ
@given(telemetry_payload())
@example(b'{"t": NaN}')
@example(b'{"a":' * 9 + b"1" + b"}" * 9)
@example(orjson.dumps({"t": 1, "ts": "0001-01-01T00:00:00+01:00"}))
def test_telemetry_accepted_is_contract_clean_and_rejected_has_a_documented_reason(payload):
    try:
        telemetry = parse_telemetry(payload, NOW, MAX_BYTES)
    except Rejected as exc:
        assert exc.reason in REASONS, exc.reason
        return
    assert_contract_telemetry(telemetry, NOW)
    # Every metric is a number or boolean of the payload at that dotted path, and vice versa.
    found = dict(leaves(orjson.loads(payload)))
    for name, value in telemetry.metrics.items():
        assert name in found
        expected = found[name]
        assert value == (expected if isinstance(expected, bool) else float(expected))
    assert set(found) == set(telemetry.metrics)


@FUZZ
@given(timestamp_value)
@example(float("nan"))
@example(float("inf"))
@example("9999-12-31T23:59:59-23:59")
@example("0001-01-01T00:00:00+23:59")
def test_a_timestamp_is_in_range_or_rejected_as_bad_timestamp(value):
    """Numbers are epoch s (ms from 1e11); ISO strings naive = UTC; range 2000 → now + 1 day."""
    try:
        ts = parse_timestamp(value, NOW)
    except Rejected as exc:
        assert exc.reason == "bad_timestamp"
        accepted = False
    else:
        assert MIN_TS <= ts <= NOW + FUTURE_SLACK
        accepted = True
    if value is None:
        assert accepted and ts == NOW
    elif isinstance(value, int | float) and not isinstance(value, bool):
        model = float(value) / (1000.0 if float(value) >= MS_THRESHOLD else 1.0)
        assert accepted == (math.isfinite(model) and MIN_TS <= model <= NOW + FUTURE_SLACK)
        if accepted:
            assert ts == model


@FUZZ
@given(st.datetimes(timezones=st.timezones()))
def test_iso_timestamps_with_any_zone_mean_their_instant(moment):
    text = moment.isoformat()
    instant = moment.astimezone(UTC).timestamp() if _representable(moment) else None
    try:
        ts = parse_timestamp(text, NOW)
    except Rejected:
        assert instant is None or not MIN_TS <= instant <= NOW + FUTURE_SLACK
    else:
        assert instant is not None and abs(ts - instant) < 1e-3


def _representable(moment: datetime) -> bool:
    try:
        moment.astimezone(UTC)
    except OverflowError:
        return False
    return True


@FUZZ
@given(st.one_of(st.binary(max_size=120), st.floats().map(lambda x: repr(x).encode())))
@example(b"1e999")
@example(b" -0.0 ")
@example(b"0x10")
def test_a_bare_metric_value_is_a_finite_float_a_bool_or_bad_value(payload):
    try:
        value = parse_metric_value(payload)
    except Rejected as exc:
        assert exc.reason in {"bad_value", "too_large", "bad_encoding"}
        return
    assert type(value) is bool or (type(value) is float and math.isfinite(value))


@FUZZ
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_finite_float_survives_as_a_bare_value(x):
    assert parse_metric_value(repr(x).encode()) == x


@FUZZ
@given(st.one_of(st.binary(max_size=120), st.sampled_from([b"Online", b" OFFLINE\n", b"on"])))
def test_status_is_online_or_offline_case_insensitive_else_bad_status(payload):
    text = payload.strip().lower()
    try:
        online = parse_status(payload)
    except Rejected as exc:
        assert exc.reason in {"bad_status", "bad_encoding"}
        assert text not in (b"online", b"offline") or len(payload) > 100
    else:
        assert online is (text == b"online") and text in (b"online", b"offline")


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=80),
        st.fixed_dictionaries(
            {
                "id": st.one_of(odd_text, st.integers(-(2**63), 2**63), st.none()),
                "ok": json_document(3),
            },
            optional={"result": json_document(), "error": json_document()},
        ).map(orjson.dumps),
    )
)
def test_an_ack_has_a_short_string_id_and_a_boolean_ok_or_is_rejected(payload):
    try:
        ack = parse_ack(payload, MAX_BYTES)
    except Rejected as exc:
        assert exc.reason in REASONS
        return
    assert isinstance(ack.id, str) and 0 < len(ack.id) <= MAX_ACK_ID
    assert type(ack.ok) is bool and (ack.error is None or isinstance(ack.error, str))


@FUZZ
@given(odd_text)
@example("d1\n")
def test_a_device_id_is_valid_iff_1_to_64_ascii_letters_digits_underscore_or_dash(value):
    assert valid_device_id(value) == (1 <= len(value) <= 64 and set(value) <= ID_CHARS)


@FUZZ
@given(st.one_of(odd_text, st.text(min_size=195, max_size=205)))
def test_a_metric_name_is_valid_iff_1_to_200_characters_without_control_characters(name):
    assert valid_metric_name(name) == clean_metric_name(name)


# --- Tasmota -------------------------------------------------------------------------------


@FUZZ
@given(
    st.dictionaries(
        st.one_of(st.text(max_size=8), st.sampled_from(["POWER", "POWER1", "Power2", "POWER\n"])),
        st.one_of(json_document(10), st.sampled_from(["ON", "off", "1", "toggle", ""])),
        max_size=6,
    ).map(orjson.dumps)
    | st.binary(max_size=60)
)
def test_a_tasmota_state_is_contract_clean_metrics_or_a_documented_rejection(payload):
    try:
        metrics = parse_state(payload, MAX_BYTES)
    except Rejected as exc:
        assert exc.reason in REASONS
        return
    for name, value in metrics.items():
        assert clean_metric_name(name), name
        assert type(value) is bool or (type(value) is float and math.isfinite(value))


@FUZZ
@given(st.one_of(st.binary(max_size=20), st.text(max_size=10)))
def test_a_tasmota_power_is_on_or_off_or_bad_value(payload):
    try:
        value = parse_power(payload)
    except Rejected as exc:
        assert exc.reason == "bad_value"
    else:
        raw = payload.encode() if isinstance(payload, str) else payload
        assert value is (raw.strip().lower() in (b"on", b"1", b"true"))
