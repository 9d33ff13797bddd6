"""Modbus bus configuration files (`--modbus FILE`, `MODBUS_CONFIG`; docs/interface.md §7).

A file is JSON::

    {"buses": [{"port": "/dev/serial/by-id/usb-FTDI_…-port0", "baudrate": 9600, "parity": "N",
                "stopbits": 1, "timeout": 0.5,
                "units": [{"unit": 1, "device": "meter-1", "profile": "eastron-sdm120",
                           "interval": 1.0}]}]}

`port` is a serial device path or pyserial URL (RTU) or ``tcp://host:port`` (Modbus TCP).
Everything is checked before the gateway starts; `ConfigError` names the file and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.modbus.profile import Profile, ProfileError, load_profile

MAX_CONFIG_BYTES = 1 << 20
MAX_UNITS = 247
_DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BUS_KEYS = {"port", "baudrate", "parity", "stopbits", "bytesize", "timeout", "units",
             "offline_after"}  # fmt: skip
_UNIT_KEYS = {"unit", "device", "profile", "interval", "offline_after"}


class ConfigError(ValueError):
    """A Modbus configuration file is unreadable or malformed."""


@dataclass(frozen=True)
class UnitConfig:
    """One unit (slave) on a bus: its id, the device it is, its register map and poll period."""

    unit: int
    device: str
    profile: Profile
    interval: float = 1.0
    offline_after: int = 3


@dataclass(frozen=True)
class BusConfig:
    """One bus: an RTU serial line or a Modbus TCP endpoint, and its units."""

    port: str
    units: tuple[UnitConfig, ...]
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    timeout: float = 0.5

    @property
    def tcp(self) -> tuple[str, int] | None:
        """(host, port) for a ``tcp://`` bus, else None (serial RTU)."""
        if not self.port.startswith("tcp://"):
            return None
        parts = urlsplit(self.port)
        return parts.hostname or "", parts.port or 502


def _int(data: dict[str, Any], key: str, default: int, allowed: Any, where: str) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ConfigError(f"{where}: {key!r} must be {_describe(allowed)}, got {value!r}")
    return value


def _describe(allowed: Any) -> str:
    if isinstance(allowed, range):
        return f"an integer {allowed.start}-{allowed.stop - 1}"
    return "one of " + ", ".join(map(str, allowed))


def _seconds(
    data: dict[str, Any], key: str, default: float, lo: float, hi: float, where: str
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {key!r} must be seconds between {lo} and {hi}, got {value!r}")
    return float(value)


def _check_port(port: Any, where: str) -> str:
    if not isinstance(port, str) or not port.strip() or len(port) > 4096 or "\x00" in port:
        raise ConfigError(f"{where}: 'port' must be a serial port path/URL or tcp://host:port")
    if port.startswith("tcp://"):
        try:
            parts = urlsplit(port)
            ok = bool(parts.hostname) and parts.path in ("", "/") and not parts.query
            _ = parts.port
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{where}: {port!r} is not tcp://host[:port]")
    return port


def parse_unit(data: Any, where: str, profile_dirs: list[Path], base: Path | None) -> UnitConfig:
    """One unit entry; ConfigError naming what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a unit must be an object")
    unknown = set(data) - _UNIT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    unit = _int(data, "unit", -1, range(1, 248), where)
    device = data.get("device")
    if not isinstance(device, str) or not _DEVICE_ID.fullmatch(device):
        raise ConfigError(f"{where}: 'device' must be 1-64 characters of A-Z a-z 0-9 _ -")
    try:
        profile = load_profile(data.get("profile"), profile_dirs, base)
    except ProfileError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return UnitConfig(
        unit=unit,
        device=device,
        profile=profile,
        interval=_seconds(data, "interval", 1.0, 0.05, 86400, where),
        offline_after=_int(data, "offline_after", 3, range(1, 101), where),
    )


def parse_bus(data: Any, where: str, profile_dirs: list[Path], base: Path | None) -> BusConfig:
    """One bus entry and its units; ConfigError naming what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a bus must be an object")
    unknown = set(data) - _BUS_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    port = _check_port(data.get("port"), where)
    where = f"{where} ({port})"
    raw_units = data.get("units")
    if not isinstance(raw_units, list) or not raw_units or len(raw_units) > MAX_UNITS:
        raise ConfigError(f"{where}: 'units' must be a list of 1-{MAX_UNITS} units")
    offline_after = _int(data, "offline_after", 3, range(1, 101), where)
    units = []
    for i, raw in enumerate(raw_units):
        if isinstance(raw, dict) and "offline_after" not in raw:
            raw = {**raw, "offline_after": offline_after}
        units.append(parse_unit(raw, f"{where}: units[{i}]", profile_dirs, base))
    ids = [u.unit for u in units]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: a unit id is given twice: {sorted(ids)}")
    parity = data.get("parity", "N")
    if parity not in ("N", "E", "O"):
        raise ConfigError(f"{where}: 'parity' must be 'N', 'E' or 'O', got {parity!r}")
    return BusConfig(
        port=port,
        units=tuple(units),
        baudrate=_int(data, "baudrate", 9600, range(50, 4_000_001), where),
        parity=parity,
        stopbits=_int(data, "stopbits", 1, (1, 2), where),
        bytesize=_int(data, "bytesize", 8, (7, 8), where),
        timeout=_seconds(data, "timeout", 0.5, 0.01, 10.0, where),
    )


def parse_config(
    data: Any, where: str, profile_dirs: list[Path], base: Path | None = None
) -> list[BusConfig]:
    """A whole configuration document; relative profile paths are taken from `base`."""
    if not isinstance(data, dict) or set(data) != {"buses"}:
        raise ConfigError(f"{where}: must be a JSON object with exactly one key, 'buses'")
    buses = data["buses"]
    if not isinstance(buses, list) or not buses:
        raise ConfigError(f"{where}: 'buses' must be a non-empty list")
    return [parse_bus(b, f"{where}: buses[{i}]", profile_dirs, base) for i, b in enumerate(buses)]


def load_configs(paths: list[str], profile_dirs: list[Path]) -> list[BusConfig]:
    """Every bus of every file; a port or device configured twice (across files too) is an error."""
    buses: list[BusConfig] = []
    for raw in paths:
        path = Path(raw)
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
            data = json.loads(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read Modbus config {path}: {exc.strerror or exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
        buses.extend(parse_config(data, str(path), profile_dirs, path.parent))
    ports = [b.port for b in buses]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"a Modbus port is configured twice: {' '.join(sorted(ports))}")
    devices = [u.device for b in buses for u in b.units]
    twice = sorted({d for d in devices if devices.count(d) > 1})
    if twice:
        raise ConfigError(f"a Modbus device id is configured twice: {' '.join(twice)}")
    return buses
