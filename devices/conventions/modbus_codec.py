"""Modbus point values: raw registers/bits ⇄ numbers, per a profile's point (type, order, scale).

A register type spans 1-4 16-bit words. `byte_order` is the order of the two bytes inside
each word, `word_order` the order of the words ("big": most significant first, Modbus's own
convention). A value is ``raw × scale + offset``; writes apply the inverse.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

from gateway.modbus.profile import BIT_TABLES, Point

_FORMATS = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "float64": "d",
}


class PointError(ValueError):
    """A value cannot be decoded or encoded for this point."""


def words_to_value(point: Point, words: list[int]) -> float:
    """The raw number in `words` (as many as the type spans), before scale and offset."""
    if point.word_order == "little":
        words = words[::-1]
    byteorder = "big" if point.byte_order == "big" else "little"
    data = b"".join(int(w).to_bytes(2, byteorder) for w in words)
    return struct.unpack(">" + _FORMATS[point.type], data)[0]


def value_to_words(point: Point, raw: float) -> list[int]:
    """The words that hold `raw` (before scale/offset), in the point's byte and word order."""
    try:
        data = struct.pack(">" + _FORMATS[point.type], raw)
    except struct.error as exc:
        raise PointError(f"{point.name}: {raw!r} does not fit {point.type}") from exc
    byteorder = "big" if point.byte_order == "big" else "little"
    words = [int.from_bytes(data[i : i + 2], byteorder) for i in range(0, len(data), 2)]
    return words[::-1] if point.word_order == "little" else words


def decode_blocks(points: Iterable[Point], blocks: list[dict[str, Any]]) -> dict[str, float | bool]:
    """Every point found in the poll's blocks → its reading; NaN/∞ values are left out."""
    metrics: dict[str, float | bool] = {}
    for point in points:
        for block in blocks:
            if block.get("table") != point.table:
                continue
            start = point.address - block["address"]
            if point.table in BIT_TABLES:
                bits = block.get("bits") or []
                if 0 <= start < len(bits):
                    metrics[point.reading] = bool(bits[start])
                    break
                continue
            words = (block.get("registers") or [])[max(start, 0) : start + point.width]
            if start < 0 or len(words) < point.width:
                continue
            value = words_to_value(point, words) * point.scale + point.offset
            if math.isfinite(value):
                metrics[point.reading] = round(value, 9) if point.scale != 1 else value
            break
    return metrics


def encode_write(point: Point, value: Any) -> tuple[str, int, list[Any]]:
    """(table, address, values) of a `modbus.write` setting `point` to `value`."""
    if not point.writable:
        raise PointError(f"{point.name} is not writable")
    if point.table == "coil":
        if isinstance(value, bool):
            return "coil", point.address, [value]
        if value in (0, 1) and not isinstance(value, float):
            return "coil", point.address, [bool(value)]
        if isinstance(value, str) and value.upper() in ("ON", "OFF"):
            return "coil", point.address, [value.upper() == "ON"]
        raise PointError(f"{point.name} takes true/false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PointError(f"{point.name} takes a number, got {value!r}")
    raw: float = (value - point.offset) / point.scale
    if not point.type.startswith("float"):
        raw = round(raw)
    return "holding", point.address, value_to_words(point, raw)
