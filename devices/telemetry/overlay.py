"""Not-yet-stored device changes laid over stored devices (API list, dashboard snapshot).

The pipeline's writer holds each device's pending update (online, last seen, latest values)
until its batch commits; readers that list devices merge them over what the database says,
so a device heard a moment ago is listed with its newest values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from devices.models import rejection_fields

#: The rejection record of a device not stored yet (none: rejections need a stored device).
NO_REJECTIONS = rejection_fields(0, None, None, None)


def merge_pending(
    devices: Iterable[dict[str, Any]], pending: Mapping[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Overlay `pending_devices()` on stored `Device.as_dict()`s; new devices appended, by id."""
    out = []
    seen = set()
    for stored in devices:
        overlay = pending.get(stored["id"])
        if overlay is not None:
            stored = _overlay(stored, overlay)
        seen.add(stored["id"])
        out.append(stored)
    for device_id, overlay in pending.items():
        if device_id not in seen:
            new = {"id": device_id, "name": device_id, "metrics": {}, **NO_REJECTIONS}
            out.append(_overlay(new, overlay))
    out.sort(key=lambda d: d["id"])
    return out


def _overlay(stored: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    last_seen = stored.get("last_seen")
    if overlay["last_seen"] is not None and (last_seen is None or overlay["last_seen"] > last_seen):
        last_seen = overlay["last_seen"]
    return {
        **stored,
        "online": overlay["online"],
        "last_seen": last_seen,
        "transport": stored.get("transport") or overlay["transport"],
        "metrics": {**(stored.get("metrics") or {}), **overlay["metrics"]},
    }
