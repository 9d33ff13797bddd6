"""Modbus register maps ("profiles"): which points a unit has, where, and how they are encoded.

A profile is a JSON file (docs/serial.md, docs/interface.md §7)::

    {"name": "xy-md02", "source": "…where the register map comes from…",
     "word_order": "big", "byte_order": "big",
     "points": [{"name": "temperature", "table": "input", "address": 1, "type": "int16",
                 "scale": 0.1, "unit": "°C"}, …]}

Tables: ``input`` (function 4), ``holding`` (3; written with 6/16), ``coil`` (1; written with
5), ``discrete`` (2). Register types: int16, uint16, int32, uint32, float32, float64; bit
tables are ``bool``. Only ``coil`` and ``holding`` points may be ``writable``. `read_plan`
merges contiguous points of a table into requests of at most 125 registers / 2000 bits.
This module only parses and plans; values are decoded by the unit's consumer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Registers per type; bit tables hold one bit per point.
REGISTER_TYPES = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "float64": 4}
TABLES = {"input": 4, "holding": 3, "coil": 1, "discrete": 2}  # → read function code
BIT_TABLES = ("coil", "discrete")
#: Largest read per request (Modbus application protocol v1.1b3, §6.1-6.4).
MAX_REGISTERS = 125
MAX_BITS = 2000
MAX_POINTS = 256
MAX_PROFILE_BYTES = 1 << 20
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_POINT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_POINT_KEYS = {"name", "table", "address", "type", "scale", "offset", "unit", "metric",
               "writable", "word_order", "byte_order", "description"}  # fmt: skip
_PROFILE_KEYS = {"name", "description", "source", "word_order", "byte_order", "points", "model"}


class ProfileError(ValueError):
    """A profile file is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Point:
    """One named value of a unit: where it lives and how to turn its raw words into a number."""

    name: str
    table: str
    address: int
    type: str
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    metric: str = ""
    writable: bool = False
    word_order: str = "big"
    byte_order: str = "big"

    @property
    def width(self) -> int:
        """Registers (or bits) the point occupies."""
        return 1 if self.table in BIT_TABLES else REGISTER_TYPES[self.type]

    @property
    def reading(self) -> str:
        """The reading's metric name: `metric` when given, else the point name."""
        return self.metric or self.name


@dataclass(frozen=True)
class Block:
    """One read request: `count` registers or bits of `table` from `address`."""

    table: str
    address: int
    count: int


@dataclass(frozen=True)
class Profile:
    """A parsed register map."""

    name: str
    points: tuple[Point, ...]
    source: str = ""
    description: str = ""
    blocks: tuple[Block, ...] = field(default=())

    def point(self, name: str) -> Point | None:
        """The point called `name`, or None."""
        return next((p for p in self.points if p.name == name), None)

    def as_scope(self) -> dict[str, Any]:
        """Plain data for an ASGI scope (points as dicts)."""
        return {"name": self.name, "points": [asdict(p) for p in self.points]}


def read_plan(points: tuple[Point, ...] | list[Point]) -> tuple[Block, ...]:
    """Merge contiguous points of each table into as few reads as the size limits allow."""
    blocks: list[Block] = []
    for table in TABLES:
        limit = MAX_BITS if table in BIT_TABLES else MAX_REGISTERS
        spans = sorted({(p.address, p.address + p.width) for p in points if p.table == table})
        start = end = None
        for lo, hi in spans:
            if start is not None and lo <= end and max(end, hi) - start <= limit:
                end = max(end, hi)
                continue
            if start is not None:
                blocks.append(Block(table, start, end - start))
            start, end = lo, hi
        if start is not None:
            blocks.append(Block(table, start, end - start))
    return tuple(blocks)


def _order(value: Any, where: str) -> str:
    if value not in ("big", "little"):
        raise ProfileError(f"{where}: byte/word order must be 'big' or 'little', got {value!r}")
    return value


def _number(value: Any, where: str, *, nonzero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{where}: must be a finite number, got {value!r}")
    if nonzero and value == 0:
        raise ProfileError(f"{where}: must not be 0")
    return float(value)


def parse_point(data: Any, where: str, defaults: dict[str, str]) -> Point:
    """One point from its JSON object; ProfileError naming the field that is wrong."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: a point must be an object, got {type(data).__name__}")
    unknown = set(data) - _POINT_KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not _POINT_NAME.fullmatch(name):
        raise ProfileError(f"{where}: 'name' must match {_POINT_NAME.pattern}, got {name!r}")
    where = f"{where} ({name})"
    table = data.get("table")
    if table not in TABLES:
        raise ProfileError(f"{where}: 'table' must be one of {sorted(TABLES)}, got {table!r}")
    address = data.get("address")
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= 0xFFFF:
        raise ProfileError(f"{where}: 'address' must be an integer 0-65535, got {address!r}")
    kind = data.get("type", "bool" if table in BIT_TABLES else "uint16")
    if table in BIT_TABLES and kind != "bool":
        raise ProfileError(f"{where}: {table} points are 'bool', got {kind!r}")
    if table not in BIT_TABLES and kind not in REGISTER_TYPES:
        raise ProfileError(f"{where}: 'type' must be one of {sorted(REGISTER_TYPES)}, got {kind!r}")
    writable = data.get("writable", False)
    if not isinstance(writable, bool):
        raise ProfileError(f"{where}: 'writable' must be true or false")
    if writable and table not in ("coil", "holding"):
        raise ProfileError(f"{where}: only coil and holding points can be writable")
    for key in ("unit", "metric", "description"):
        if not isinstance(data.get(key, ""), str) or len(data.get(key, "")) > 200:
            raise ProfileError(f"{where}: {key!r} must be a string of at most 200 characters")
    point = Point(
        name=name,
        table=table,
        address=address,
        type=kind,
        scale=_number(data.get("scale", 1), f"{where}: 'scale'", nonzero=True),
        offset=_number(data.get("offset", 0), f"{where}: 'offset'"),
        unit=data.get("unit", ""),
        metric=data.get("metric", ""),
        writable=writable,
        word_order=_order(data.get("word_order", defaults["word_order"]), where),
        byte_order=_order(data.get("byte_order", defaults["byte_order"]), where),
    )
    if address + point.width > 0x10000:
        raise ProfileError(f"{where}: {kind} at {address} runs past address 65535")
    return point


def parse_profile(data: Any, where: str) -> Profile:
    """A profile from its JSON document; ProfileError naming what is wrong."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: a profile must be a JSON object")
    unknown = set(data) - _PROFILE_KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
        raise ProfileError(f"{where}: 'name' must match {_PROFILE_NAME.pattern}, got {name!r}")
    defaults = {
        "word_order": _order(data.get("word_order", "big"), where),
        "byte_order": _order(data.get("byte_order", "big"), where),
    }
    raw_points = data.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise ProfileError(f"{where}: 'points' must be a non-empty list")
    if len(raw_points) > MAX_POINTS:
        raise ProfileError(f"{where}: at most {MAX_POINTS} points, got {len(raw_points)}")
    points = [parse_point(p, f"{where}: points[{i}]", defaults) for i, p in enumerate(raw_points)]
    seen: set[str] = set()
    for point in points:
        for key in {point.name, point.reading}:
            if key in seen:
                raise ProfileError(f"{where}: point or metric name {key!r} is used twice")
            seen.add(key)
    texts = {k: data.get(k, "") for k in ("source", "description")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise ProfileError(f"{where}: 'source' and 'description' must be strings")
    return Profile(
        name=name,
        points=tuple(points),
        blocks=read_plan(points),
        **texts,  # type: ignore[arg-type]
    )


def shipped_profiles(dirs: list[Path]) -> dict[str, Path]:
    """Profile NAME → file, for every ``*.json`` in the profile directories (first wins)."""
    found: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(Path(folder).glob("*.json")):
            found.setdefault(path.stem, path)
    return found


def load_profile(ref: str, dirs: list[Path], base: Path | None = None) -> Profile:
    """A profile by shipped NAME, or by path (anything with a `/` or ending in `.json`)."""
    if not isinstance(ref, str) or not ref:
        raise ProfileError(f"profile must be a NAME or a path, got {ref!r}")
    if "/" in ref or ref.endswith(".json"):
        path = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
    else:
        shipped = shipped_profiles(dirs)
        if ref not in shipped:
            names = ", ".join(sorted(shipped)) or "none"
            raise ProfileError(f"unknown profile {ref!r}; shipped profiles: {names}")
        path = shipped[ref]
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ProfileError(f"{path}: larger than {MAX_PROFILE_BYTES} bytes")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ProfileError(f"profile {ref!r}: cannot read {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from exc
    return parse_profile(data, str(path))
