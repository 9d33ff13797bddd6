"""Device-supplied text made storable: PostgreSQL refuses U+0000 in text and ``jsonb``.

A device's ack may carry any JSON string; a NUL in it would make the whole UPDATE fail (on
PostgreSQL only, so a SQLite test never sees it). It is replaced by U+FFFD, the replacement
character, visible to whoever reads the result, and counted in
``gateway_device_text_cleaned_total{reason="nul"}``.
"""

from __future__ import annotations

from typing import Any

from gateway.metrics import DEVICE_TEXT_CLEANED

NUL, REPLACEMENT = "\x00", "\ufffd"


def _clean(value: Any) -> tuple[Any, int]:
    if isinstance(value, str):
        count = value.count(NUL)
        return (value.replace(NUL, REPLACEMENT) if count else value), count
    if isinstance(value, dict):
        out, total = {}, 0
        for key, item in value.items():
            key, k = _clean(key)
            out[key], n = _clean(item)
            total += k + n
        return out, total
    if isinstance(value, list):
        items = [_clean(item) for item in value]
        return [item for item, _ in items], sum(n for _, n in items)
    return value, 0


def storable(value: Any) -> Any:
    """`value` (a str or plain JSON) with every NUL replaced by U+FFFD, counted when any."""
    cleaned, count = _clean(value)
    if count:
        DEVICE_TEXT_CLEANED.labels(reason="nul").inc()
    return cleaned
