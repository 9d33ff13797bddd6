"""The Modbus units this process knows (device id → profile points), for the dashboard's buttons.

The gateway's Modbus bridge tells them here when it loads its config files (`remember`); a web
process without the bridge reads the files named in ``MODBUS_CONFIG`` once instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from gateway.modbus.config import BusConfig, ConfigError, load_configs
from gateway.modbus.profile import Point

logger = logging.getLogger(__name__)

_units: dict[str, tuple[Point, ...]] = {}
_loaded = False


def remember(buses: Iterable[BusConfig]) -> None:
    """Record the units of `buses` (the bridge calls this with what it serves)."""
    global _loaded
    for bus in buses:
        for unit in bus.units:
            _units[unit.device] = tuple(unit.profile.points)
    _loaded = True


def points_of(device_id: str) -> tuple[Point, ...]:
    """The profile points of a Modbus device, or () when no known config names it."""
    global _loaded
    if not _loaded:
        _loaded = True
        from django.conf import settings

        paths = list(settings.GATEWAY["MODBUS_CONFIG"])
        if paths:
            try:
                remember(load_configs(paths, settings.GATEWAY["MODBUS_PROFILE_DIRS"]))
            except (ConfigError, OSError) as exc:
                logger.warning("Modbus config unreadable, no Modbus buttons: %s", exc)
    return _units.get(device_id, ())
