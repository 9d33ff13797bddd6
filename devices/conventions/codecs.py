"""Serial line codecs (docs/interface.md §4): one frame → telemetry, a command ack, or `Rejected`.

A frame is either a JSON object (telemetry for the port's device, or an ack when it has both ``id``
and ``ok``), an NMEA 0183 sentence (``$…*hh``, decoded by `devices.conventions.nmea`), or
``key=value`` pairs separated by commas and/or spaces (``temp=21.5,hum=40``,
``temp=21.5 hum=40 ts=1764214000``). Values and timestamps follow the MQTT rules in
`devices.telemetry.parsing` (numbers and booleans are metrics, other values are ignored; ``ts`` in
epoch s/ms or ISO 8601). Blank lines are skipped (None). Rejection reasons: ``bad_encoding`` (not
UTF-8), ``bad_frame`` (control characters, a token without ``=``, an empty key),
``bad_checksum`` (NMEA), and the parsing reasons (``bad_json``, ``no_metrics``, …)."""

from __future__ import annotations

import re

import orjson

from devices.conventions.nmea import decode_sentence
from devices.telemetry.parsing import (
    MAX_METRICS,
    Ack,
    Telemetry,
    ack_from_dict,
    parse_metric_value,
    parse_telemetry,
    parse_timestamp,
    valid_metric_name,
)
from gateway.exceptions import Rejected

#: A frame longer than this is refused before parsing (the serial server's max_frame is the
#: first bound; this one keeps the codec safe on its own).
MAX_LINE_BYTES = 64 * 1024
_SPLIT = re.compile(r"[,\s]+")
# Control characters other than tab: line noise, never part of a text frame.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ACK_HINT = b'"ok"'


def decode_frame(frame: bytes, received_at: float) -> Telemetry | Ack | None:
    """Decode one serial frame received at `received_at` (epoch s); None for a blank line."""
    line = bytes(frame).strip()
    if not line:
        return None
    if len(line) > MAX_LINE_BYTES:
        raise Rejected("too_large", f"line of {len(line)} bytes > {MAX_LINE_BYTES}")
    if line[:1] == b"{":
        return _decode_json(line, received_at)
    if line[:1] == b"$":  # an NMEA 0183 sentence (a GPS receiver)
        return decode_sentence(line, received_at)
    return decode_key_values(line, received_at)


def _decode_json(line: bytes, received_at: float) -> Telemetry | Ack:
    if _ACK_HINT in line:  # decode once here only when it may be an ack
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            data = None  # parse_telemetry classifies the error (bad_encoding / bad_json)
        if isinstance(data, dict) and "id" in data and "ok" in data:
            return ack_from_dict(data)
    return parse_telemetry(line, received_at, MAX_LINE_BYTES)


def decode_key_values(line: bytes, received_at: float) -> Telemetry:
    """``k=v`` pairs separated by commas/spaces → `Telemetry`."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_encoding", "line is not UTF-8") from None
    if _CONTROL.search(text):
        raise Rejected("bad_frame", "control characters in line")
    metrics: dict[str, float | bool] = {}
    ts_text: str | None = None
    for token in _SPLIT.split(text.strip()):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise Rejected("bad_frame", f"not key=value: {token[:40]!r}")
        if key == "ts":
            ts_text = value
            continue
        if not valid_metric_name(key):
            raise Rejected("bad_value", f"bad metric name {key[:40]!r}")
        try:
            metrics[key] = parse_metric_value(value.encode())
        except Rejected as exc:
            # A long text value is still text (too_large only for an over-long number).
            if exc.reason in ("bad_value", "too_large") and not _looks_numeric(value):
                continue  # a text value (e.g. fw=1.2.3-beta): not a metric, like JSON strings
            raise
        if len(metrics) > MAX_METRICS:
            raise Rejected("too_large", f"more than {MAX_METRICS} metrics")
    ts = received_at
    if ts_text is not None:
        ts_value: float | str = ts_text
        try:
            ts_value = float(ts_text)
        except ValueError:
            pass
        ts = parse_timestamp(ts_value, received_at)
    if not metrics:
        raise Rejected("no_metrics", "no numeric or boolean value in the line")
    return Telemetry(ts, metrics)


def _looks_numeric(value: str) -> bool:
    # "21.5x" or "1e999" are broken numbers (bad_value); "on", "v1.2" are just text.
    return bool(value) and (value[0].isdigit() or value[0] in "+-.")
