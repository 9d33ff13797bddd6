"""devices.telemetry.parsing: examples for every rule and reason, properties over any input."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.telemetry.parsing import (
    MAX_DEPTH,
    MAX_METRICS,
    MIN_TS,
    Telemetry,
    parse_ack,
    parse_metric_value,
    parse_status,
    parse_telemetry,
    valid_device_id,
    valid_metric_name,
)
from gateway.exceptions import Rejected

NOW = 1_764_214_000.0  # 2025-11-27
MAX = 64 * 1024
REASONS = {
    "bad_topic", "bad_device_id", "too_large", "bad_encoding", "bad_json", "not_object",
    "too_deep", "bad_value", "bad_timestamp", "no_metrics", "bad_status", "unknown_command",
    "consumer_error", "bad_frame", "frame_too_long",
}  # fmt: skip


def parse(obj: object) -> Telemetry:
    return parse_telemetry(orjson.dumps(obj), NOW, MAX)


def reason_of(call, *args) -> str:
    with pytest.raises(Rejected) as info:
        call(*args)
    assert info.value.reason in REASONS
    return info.value.reason


# -- device ids and metric names -----------------------------------------------------------


@pytest.mark.parametrize("good", ["d1", "A", "a" * 64, "weather-1", "x_y-Z09"])
def test_valid_device_ids(good):
    assert valid_device_id(good)


@pytest.mark.parametrize(
    "bad", ["", "a" * 65, "d 1", "d/1", "d+", "#", "dé", "d.1", "d\n", None, 5, b"d1"]
)
def test_invalid_device_ids(bad):
    assert not valid_device_id(bad)


def test_metric_names():
    assert valid_metric_name("temperature")
    assert valid_metric_name("BME280.Temperature")
    assert valid_metric_name("PM2.5 µg/m³")
    assert valid_metric_name("x" * 200)
    assert not valid_metric_name("x" * 201)
    assert not valid_metric_name("")
    assert not valid_metric_name("a\x00b")
    assert not valid_metric_name("a\tb")
    assert not valid_metric_name("a\x85b")  # C1 control
    assert not valid_metric_name(None)


# -- telemetry -----------------------------------------------------------------------------


def test_contract_example():
    t = parse({"temperature": 21.5, "humidity": 40, "ts": 1764214000.5})
    assert t == Telemetry(1764214000.5, {"temperature": 21.5, "humidity": 40.0})
    assert type(t.metrics["humidity"]) is float


def test_booleans_stay_booleans_and_ignored_types_are_skipped():
    t = parse({"relay": True, "door": False, "label": "x", "none": None, "list": [1, 2], "v": 0})
    assert t.metrics == {"relay": True, "door": False, "v": 0.0}
    assert t.metrics["relay"] is True


def test_nested_objects_flatten_with_dots():
    t = parse({"env": {"t": 1, "inner": {"h": 2.5, "s": "x"}}, "top": 3})
    assert t.metrics == {"env.t": 1.0, "env.inner.h": 2.5, "top": 3.0}


def test_nested_ts_is_a_metric_but_top_level_ts_is_the_time():
    t = parse({"env": {"ts": 5}, "ts": 1764214000})
    assert t.ts == 1764214000.0
    assert t.metrics == {"env.ts": 5.0}


def test_absent_or_null_ts_is_receive_time():
    assert parse({"a": 1}).ts == NOW
    assert parse({"a": 1, "ts": None}).ts == NOW


def test_ts_milliseconds_by_magnitude():
    assert parse({"a": 1, "ts": 1764214000500}).ts == pytest.approx(1764214000.5)
    # just below the threshold is seconds, and that is far in the future: rejected
    assert reason_of(parse, {"a": 1, "ts": 99_999_999_999}) == "bad_timestamp"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2025-01-01T00:00:00Z", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01T00:00:00", datetime(2025, 1, 1, tzinfo=UTC)),  # naive = UTC
        ("2025-01-01T02:00:00+02:00", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01 00:00:00.250z", datetime(2025, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_iso_timestamps(text, expected):
    assert parse({"a": 1, "ts": text}).ts == expected.timestamp()


@pytest.mark.parametrize(
    "ts",
    [
        MIN_TS - 1,
        0,
        -5,
        NOW + 86_400 + 10,
        "1999-12-31T23:59:59Z",
        "2999-01-01T00:00:00Z",
        "yesterday",
        "",
        "9" * 70,
        True,
        [1],
        {"a": 1},
        1e300,
    ],
)
def test_bad_timestamps(ts):
    assert reason_of(parse, {"a": 1, "ts": ts}) == "bad_timestamp"


def test_timestamp_bounds_are_inclusive():
    assert parse({"a": 1, "ts": MIN_TS}).ts == MIN_TS
    assert parse({"a": 1, "ts": NOW + 86_400}).ts == NOW + 86_400


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "bad_json"),
        (b"{", "bad_json"),
        (b"NaN", "bad_json"),
        (b'{"a": NaN}', "bad_json"),
        (b'{"a": Infinity}', "bad_json"),
        (b'{"a": -Infinity}', "bad_json"),
        (b'{"a": 1e400}', "bad_json"),
        (b"\xef\xbb\xbf{}", "bad_json"),
        (b'{"a": "\xff"}', "bad_encoding"),
        (b"\xc3\x28", "bad_encoding"),
        (b"[1, 2]", "not_object"),
        (b"21.5", "not_object"),
        (b'"x"', "not_object"),
        (b"null", "not_object"),
        (b"{}", "no_metrics"),
        (b'{"ts": 1764214000}', "no_metrics"),
        (b'{"a": "x", "b": null, "c": []}', "no_metrics"),
        (b'{"": 1}', "bad_value"),
        (b'{"a\\u0000b": 1}', "bad_value"),
        (b'{"env": {"": 1}}', "bad_value"),
    ],
)
def test_rejections(payload, reason):
    assert reason_of(parse_telemetry, payload, NOW, MAX) == reason


def test_too_large():
    payload = orjson.dumps({"a": 1, "pad": "x" * 100})
    assert reason_of(parse_telemetry, payload, NOW, len(payload) - 1) == "too_large"
    assert parse_telemetry(payload, NOW, len(payload)).metrics == {"a": 1.0}


def test_depth_limit():
    def nested(levels: int) -> dict:
        obj: dict = {"v": 1}
        for _ in range(levels - 1):
            obj = {"n": obj}
        return obj

    assert parse(nested(MAX_DEPTH)).metrics == {"n." * (MAX_DEPTH - 1) + "v": 1.0}
    assert reason_of(parse, nested(MAX_DEPTH + 1)) == "too_deep"
    assert reason_of(parse_telemetry, b'{"a":' * 2000 + b"1" + b"}" * 2000, NOW, MAX) in {
        "too_deep",
        "bad_json",
    }


def test_metric_count_limit():
    assert len(parse({f"m{i}": i for i in range(MAX_METRICS)}).metrics) == MAX_METRICS
    assert reason_of(parse, {f"m{i}": i for i in range(MAX_METRICS + 1)}) == "too_large"


def test_metric_name_length_limit():
    assert parse({"x" * 200: 1}).metrics == {"x" * 200: 1.0}
    assert reason_of(parse, {"x" * 201: 1}) == "bad_value"
    assert reason_of(parse, {"a" * 150: {"b" * 60: 1}}) == "bad_value"


def test_huge_integers_become_finite_floats():
    t = parse_telemetry(b'{"a": 18446744073709551616, "b": -9223372036854775809}', NOW, MAX)
    assert all(math.isfinite(v) for v in t.metrics.values())


# -- single values, status, acks -----------------------------------------------------------


@pytest.mark.parametrize(
    "payload, value",
    [
        (b"21.5", 21.5),
        (b" 40 \n", 40.0),
        (b"-1e3", -1000.0),
        (b"0", 0.0),
        (b"true", True),
        (b"FALSE", False),
    ],
)
def test_metric_values(payload, value):
    result = parse_metric_value(payload)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "bad_value"),
        (b"nan", "bad_value"),
        (b"inf", "bad_value"),
        (b"Infinity", "bad_value"),
        (b"1e999", "bad_value"),
        (b"0x10", "bad_value"),
        (b"1_000", "bad_value"),
        (b"+1", "bad_value"),
        (b'{"v": 1}', "bad_value"),
        (b"21.5 C", "bad_value"),
        (b"\xff", "bad_encoding"),
        (b"1" * 101, "too_large"),
    ],
)
def test_bad_metric_values(payload, reason):
    assert reason_of(parse_metric_value, payload) == reason


@pytest.mark.parametrize(
    "payload, online",
    [(b"online", True), (b"OFFLINE", False), (b"  Online\r\n", True), (b"offline", False)],
)
def test_status(payload, online):
    assert parse_status(payload) is online


@pytest.mark.parametrize("payload", [b"", b"on", b"1", b"true", b'"online"', b"x" * 1000])
def test_bad_status(payload):
    assert reason_of(parse_status, payload) == "bad_status"


def test_status_bad_encoding():
    assert reason_of(parse_status, b"onl\xffine") == "bad_encoding"


def test_acks():
    ack = parse_ack(b'{"id": "c1", "ok": true, "result": {"seconds": 5}}', MAX)
    assert (ack.id, ack.ok, ack.result, ack.error) == ("c1", True, {"seconds": 5}, None)
    ack = parse_ack(b'{"id": "c2", "ok": false, "error": "nope"}', MAX)
    assert (ack.ok, ack.error) == (False, "nope")
    assert reason_of(parse_ack, b'{"ok": true}', MAX) == "bad_value"
    assert reason_of(parse_ack, b'{"id": "c", "ok": 1}', MAX) == "bad_value"
    assert reason_of(parse_ack, b"[]", MAX) == "not_object"
    assert reason_of(parse_ack, b"{", MAX) == "bad_json"


# -- properties: nothing but Rejected ever escapes -----------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=60,
)
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_telemetry(payload: bytes, max_bytes: int = MAX) -> None:
    try:
        t = parse_telemetry(payload, NOW, max_bytes)
    except Rejected as exc:
        assert exc.reason in REASONS
        return
    assert t.metrics and len(t.metrics) <= MAX_METRICS
    assert MIN_TS <= t.ts <= NOW + 86_400
    for name, value in t.metrics.items():
        assert valid_metric_name(name)
        assert type(value) is bool or (type(value) is float and math.isfinite(value))
    orjson.dumps(t.metrics)  # always strict JSON


@PROPS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_reject(payload):
    _check_telemetry(payload)
    for call in (parse_metric_value, parse_status):
        try:
            call(payload)
        except Rejected as exc:
            assert exc.reason in REASONS
    try:
        parse_ack(payload, MAX)
    except Rejected as exc:
        assert exc.reason in REASONS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(odd_text, json_values, max_size=8))
def test_arbitrary_objects_only_reject(obj):
    _check_telemetry(orjson.dumps(obj))


@PROPS
@given(json_values, st.integers(min_value=1, max_value=400))
def test_arbitrary_json_and_small_limits_only_reject(value, max_bytes):
    payload = orjson.dumps({"v": value})
    _check_telemetry(payload, max_bytes)


@PROPS
@given(st.integers(min_value=1, max_value=3000), st.sampled_from([b"{", b'{"a":', b"["]))
def test_deep_nesting_only_rejects(depth, opener):
    _check_telemetry(opener * depth + b"1" + b"}]" * depth)


@PROPS
@given(
    st.one_of(
        st.floats(),
        st.integers(),
        st.text(max_size=40),
        st.datetimes(timezones=st.sampled_from([None, UTC])).map(lambda d: d.isoformat()),
    )
)
def test_timestamps_only_reject(ts):
    body = b'{"a": 1, "ts": ' + (orjson.dumps(ts) if isinstance(ts, str) else repr(ts).encode())
    _check_telemetry(body + b"}")


@PROPS
@given(st.text(max_size=80))
def test_device_id_property(text):
    expected = 1 <= len(text) <= 64 and all(
        c.isascii() and (c.isalnum() or c in "_-") for c in text
    )
    assert valid_device_id(text) is expected


def test_huge_json_is_rejected_quickly():
    payload = b'{"a": [' + b"1," * 2_000_000 + b"1]}"
    assert reason_of(parse_telemetry, payload, NOW, MAX) == "too_large"
    big_ok = orjson.dumps({"a": 1, "pad": ["x"] * 5000})
    assert parse_telemetry(big_ok, NOW, len(big_ok)).metrics == {"a": 1.0}
