"""NMEA 0183 sentences from a GPS receiver on a serial line → readings (docs/interface.md §4).

A serial line starting with ``$`` is an NMEA sentence, parsed with pynmea2. Its checksum is
required and verified: a missing or wrong one is rejected ``bad_checksum``, an unparsable
sentence ``bad_frame``. Any talker (``GP``, ``GN``, ``GL``, ``GA``, ``BD``…). Each sentence is
one reading:

- GGA: ``fix_quality`` (0 none, 1 GPS, 2 DGPS, 4 RTK…), ``satellites``; with a fix also
  ``latitude``, ``longitude`` (signed decimal degrees), ``altitude`` (m above mean sea level),
  ``hdop``;
- RMC: ``fix_valid`` (status A); when valid ``latitude``, ``longitude``, ``speed`` (km/h),
  ``course`` (degrees true);
- VTG: ``course`` (degrees true), ``speed`` (km/h);
- GSA: ``fix_type`` (1 none, 2 2D, 3 3D), ``pdop``, ``hdop``, ``vdop``.

Other sentence types (GSV, GLL, TXT…) are skipped (None), like blank lines. Empty fields are
left out, never stored as 0.
"""

from __future__ import annotations

import math
from typing import Any

import pynmea2

from devices.telemetry.parsing import Telemetry
from gateway.exceptions import Rejected

KNOTS_TO_KMH = 1.852
MAX_SENTENCE = 1024  # NMEA says 82 characters; leave room for proprietary sentences


def _number(value: Any) -> float | None:
    """A field as a finite float, or None when empty or not a number."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _put(metrics: dict[str, float | bool], name: str, value: Any) -> None:
    number = _number(value)
    if number is not None:
        metrics[name] = number


def _position(msg: Any, metrics: dict[str, float | bool]) -> None:
    if msg.lat and msg.lon:
        metrics["latitude"] = round(float(msg.latitude), 7)
        metrics["longitude"] = round(float(msg.longitude), 7)


def metrics_of(msg: Any) -> dict[str, float | bool]:
    """The metrics of one parsed sentence (empty for a type without any)."""
    metrics: dict[str, float | bool] = {}
    kind = msg.sentence_type
    if kind == "GGA":
        _put(metrics, "fix_quality", msg.gps_qual)
        _put(metrics, "satellites", msg.num_sats)
        if metrics.get("fix_quality"):
            _position(msg, metrics)
            _put(metrics, "altitude", msg.altitude)
            _put(metrics, "hdop", msg.horizontal_dil)
    elif kind == "RMC":
        metrics["fix_valid"] = msg.status == "A"
        if metrics["fix_valid"]:
            _position(msg, metrics)
            knots = _number(msg.spd_over_grnd)
            if knots is not None:
                metrics["speed"] = round(knots * KNOTS_TO_KMH, 3)
            _put(metrics, "course", msg.true_course)
    elif kind == "VTG":
        _put(metrics, "course", msg.true_track)
        _put(metrics, "speed", msg.spd_over_grnd_kmph)
    elif kind == "GSA":
        _put(metrics, "fix_type", msg.mode_fix_type)
        _put(metrics, "pdop", msg.pdop)
        _put(metrics, "hdop", msg.hdop)
        _put(metrics, "vdop", msg.vdop)
    return metrics


def decode_sentence(line: bytes, received_at: float) -> Telemetry | None:
    """One ``$…*hh`` line → `Telemetry` at `received_at`; None for a type without metrics."""
    if len(line) > MAX_SENTENCE:
        raise Rejected("too_large", f"NMEA sentence of {len(line)} bytes")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise Rejected("bad_encoding", "NMEA sentence is not ASCII") from None
    try:
        msg = pynmea2.parse(text.strip(), check=True)
    except pynmea2.ChecksumError as exc:
        raise Rejected("bad_checksum", f"NMEA checksum: {exc.args[0]}") from None
    except (pynmea2.ParseError, ValueError, TypeError) as exc:
        raise Rejected("bad_frame", f"not an NMEA sentence: {exc.args[:1]!r}") from None
    try:
        metrics = metrics_of(msg)
    except (ValueError, TypeError, AttributeError) as exc:
        raise Rejected("bad_value", f"bad NMEA field: {exc}") from None
    return Telemetry(received_at, metrics) if metrics else None
