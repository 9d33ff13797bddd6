"""Device payload parsing (docs/interface.md §3.1): pure functions, bytes in, values or `Rejected`.

Nothing here touches sockets, the database or the event loop, so every transport (MQTT, serial)
parses the same way and each rejection carries one reason from docs/architecture.md.

Decisions (documented for operators in the module and the report):
- Numbers and booleans are metrics; strings, null and lists are ignored; nested objects flatten
  with ``.``. A telemetry object with no metric at all is rejected (``no_metrics``): it would
  store nothing, and counting it shows a misconfigured device.
- ``ts``: epoch seconds, or epoch milliseconds when ``>= 1e11`` (1e11 s is the year 5138,
  1e11 ms is 1973), or an ISO 8601 string (naive means UTC); absent or null means the receive
  time. Accepted range: 2000-01-01T00:00:00Z up to one day after the receive time.
- Limits: payload ``max_bytes`` (``too_large``), object nesting 8 levels (``too_deep``), at most
  256 metrics (``too_large``), metric names 1-200 characters without control characters and
  without empty keys (``bad_value``; the whole message is rejected, never silently trimmed).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from django.conf import settings

from gateway.exceptions import Rejected

__all__ = [
    "MAX_DEPTH",
    "MAX_METRICS",
    "MAX_METRIC_NAME",
    "MIN_TS",
    "MS_THRESHOLD",
    "FUTURE_SLACK",
    "Ack",
    "Rejected",
    "Telemetry",
    "ack_from_dict",
    "parse_ack",
    "parse_metric_value",
    "parse_status",
    "parse_telemetry",
    "parse_timestamp",
    "valid_device_id",
    "valid_metric_name",
]

MAX_DEPTH = 8  # levels of nested objects, the top-level object being level 1
MAX_METRICS = 256
#: Longest metric name (GATEWAY_MAX_METRIC_NAME, 1-200; default 200).
MAX_METRIC_NAME = settings.GATEWAY["MAX_METRIC_NAME"]
MIN_TS = 946_684_800.0  # 2000-01-01T00:00:00Z
FUTURE_SLACK = 86_400.0  # a device clock may run at most one day ahead of ours
MS_THRESHOLD = 1e11  # numeric ts at or above this are milliseconds
MAX_SCALAR_BYTES = 100  # bare-number and status payloads
MAX_ACK_ID = 64

_DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Cc: C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A JSON number (no leading '+', no hex, no '_', no nan/inf that float() would accept).
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

Metrics = dict[str, float | bool]


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A parsed telemetry message: epoch-seconds timestamp and flat metrics."""

    ts: float
    metrics: Metrics
    #: Whether the payload said its time (``ts``); else `ts` is the receive time.
    stamped: bool = True


@dataclass(frozen=True, slots=True)
class Ack:
    """A parsed command acknowledgement (`devices/<id>/commands/ack` or a serial ack line)."""

    id: str
    ok: bool
    result: Any = None
    error: str | None = None


def valid_device_id(value: object) -> bool:
    """True for a device id: 1-64 characters of ``[A-Za-z0-9_-]`` (docs/interface.md §3)."""
    return isinstance(value, str) and _DEVICE_ID.fullmatch(value) is not None


def valid_metric_name(name: object) -> bool:
    """True when `name` is a usable metric name: 1-200 characters, no control characters."""
    return isinstance(name, str) and _clean_name(name)


@functools.lru_cache(maxsize=8192)
def _clean_name(name: str) -> bool:
    # Cached: every message of a device repeats its names, and the regex scan of each was
    # ~4 % of the event loop at 15 values per message (docs/performance.md);
    # bounded, so a publisher inventing names only churns it.
    return 0 < len(name) <= MAX_METRIC_NAME and _CONTROL.search(name) is None


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("bad_encoding", "payload is not UTF-8") from None
        raise Rejected("bad_json", "payload is not valid JSON") from None


def parse_timestamp(value: Any, received_at: float) -> float:
    """A payload's ``ts`` as epoch seconds; `Rejected("bad_timestamp")` when unusable."""
    if value is None:
        return received_at
    if isinstance(value, bool):
        raise Rejected("bad_timestamp", "ts must be a number or an ISO 8601 string")
    if isinstance(value, int | float):
        ts = float(value)
        if not math.isfinite(ts):
            raise Rejected("bad_timestamp", "ts is not finite")
        if ts >= MS_THRESHOLD:
            ts /= 1000.0
    elif isinstance(value, str):
        if len(value) > 64:
            raise Rejected("bad_timestamp", "ts string too long")
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise Rejected("bad_timestamp", f"ts {value!r} is not ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        try:
            ts = moment.timestamp()
        except (OverflowError, ValueError, OSError):
            raise Rejected("bad_timestamp", f"ts {value!r} out of range") from None
    else:
        raise Rejected("bad_timestamp", "ts must be a number or an ISO 8601 string")
    if not MIN_TS <= ts <= received_at + FUTURE_SLACK:
        raise Rejected("bad_timestamp", f"ts {value!r} before 2000 or more than a day ahead")
    return ts


def _flatten(obj: dict, prefix: str, depth: int, out: Metrics) -> None:
    if depth > MAX_DEPTH:
        raise Rejected("too_deep", f"objects nested deeper than {MAX_DEPTH} levels")
    for key, value in obj.items():
        if value is True or value is False:
            pass
        elif type(value) is int:
            value = float(value)
        elif type(value) is float:
            if not math.isfinite(value):  # orjson refuses NaN/Infinity; belt and braces
                raise Rejected("bad_value", f"metric {key!r} is not finite")
        elif type(value) is dict:
            if not key:
                raise Rejected("bad_value", "empty key in a metric name")
            _flatten(value, f"{prefix}{key}.", depth + 1, out)
            continue
        else:
            continue  # str, None, list: not metrics
        if depth == 1 and key == "ts":
            continue  # the timestamp, not a metric
        name = prefix + key
        if not key or not valid_metric_name(name):
            raise Rejected("bad_value", f"bad metric name {name[:MAX_METRIC_NAME]!r}")
        if len(out) >= MAX_METRICS:
            raise Rejected("too_large", f"more than {MAX_METRICS} metrics")
        out[name] = value


def load_object(payload: bytes, max_bytes: int, what: str = "the payload") -> dict:
    """Decode a JSON-object payload of at most `max_bytes`; `Rejected` with a reason otherwise."""
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"payload of {len(payload)} bytes > {max_bytes}")
    data = _loads(payload)
    if type(data) is not dict:
        raise Rejected("not_object", f"{what} must be a JSON object")
    return data


def metrics_of(data: dict) -> Metrics:
    """The numbers and booleans of an object, nested keys joined with ``.``; none → Rejected."""
    metrics: Metrics = {}
    _flatten(data, "", 1, metrics)
    if not metrics:
        raise Rejected("no_metrics", "no numeric or boolean value in the object")
    return metrics


def parse_telemetry(payload: bytes, received_at: float, max_bytes: int) -> Telemetry:
    """Parse a telemetry JSON object (``devices/<id>/telemetry``) into a `Telemetry`."""
    data = load_object(payload, max_bytes, "telemetry")
    ts = parse_timestamp(data.get("ts"), received_at)
    return Telemetry(ts, metrics_of(data), data.get("ts") is not None)


def _scalar_text(payload: bytes, reason: str) -> bytes:
    if len(payload) > MAX_SCALAR_BYTES:
        raise Rejected(reason, f"payload of {len(payload)} bytes is too long")
    try:
        bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_encoding", "payload is not UTF-8") from None
    return bytes(payload).strip()


def parse_metric_value(payload: bytes) -> float | bool:
    """Parse a bare value (``devices/<id>/telemetry/<metric>``): a JSON number, true or false."""
    text = _scalar_text(payload, "too_large")
    if _NUMBER.fullmatch(text):
        value = float(text)
        if not math.isfinite(value):
            raise Rejected("bad_value", "value overflows a float")
        return value
    lowered = text.lower()
    if lowered == b"true":
        return True
    if lowered == b"false":
        return False
    raise Rejected("bad_value", "expected a bare number, true or false")


def parse_status(payload: bytes) -> bool:
    """Parse a status payload: ``online`` → True, ``offline`` → False (case-insensitive)."""
    text = _scalar_text(payload, "bad_status").lower()
    if text == b"online":
        return True
    if text == b"offline":
        return False
    raise Rejected("bad_status", "status must be 'online' or 'offline'")


def parse_ack(payload: bytes, max_bytes: int) -> Ack:
    """Parse a command ack ``{"id": …, "ok": true, "result": …}`` / ``{"ok": false, "error"}``."""
    return ack_from_dict(load_object(payload, max_bytes, "an ack"))


def ack_from_dict(data: dict) -> Ack:
    """Validate an already-decoded ack object (serial lines decode JSON once, then route)."""
    ack_id, ok = data.get("id"), data.get("ok")
    if not isinstance(ack_id, str) or not 0 < len(ack_id) <= MAX_ACK_ID:
        raise Rejected("bad_value", "ack 'id' must be a string of 1-64 characters")
    if not isinstance(ok, bool):
        raise Rejected("bad_value", "ack 'ok' must be true or false")
    error = data.get("error")
    if error is not None and not isinstance(error, str):
        error = orjson.dumps(error).decode()
    return Ack(ack_id, ok, data.get("result"), error)
