"""Faults a simulated device can be told to have, and the garbage it publishes when broken.

A fault spec (command line `--faults`, or `Fleet.apply`) reads `KIND[=VALUE][@TARGET]`:

| kind | value | effect |
|---|---|---|
| `drop` | seconds away (default: until restored) | vanish without DISCONNECT: the Will fires |
| `noack` | | stop answering commands (they still take effect) |
| `delay` | seconds (default 5) | answer commands that much later |
| `garbage` | probability per tick (default 1) | also publish a malformed message on that tick |
| `burst` | rate multiplier (default 10) | publish telemetry that many times faster |

TARGET is a share of the fleet (`25%` or `0.25`), or device ids joined by `+`
(`sim-0001+sim-0007`); without it the fault applies to every device. Several specs are
separated by commas: `--faults drop=30@10%,delay=3@sim-0002`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

KINDS = ("drop", "noack", "delay", "garbage", "burst")
DEFAULTS: dict[str, float | None] = {
    "drop": None,
    "noack": None,
    "delay": 5.0,
    "garbage": 1.0,
    "burst": 10.0,
}
# A garbage payload larger than the gateway's default 64 KiB limit.
HUGE_PAYLOAD_BYTES = 96 * 1024


class FaultSpecError(ValueError):
    """A `--faults` spec that cannot be parsed."""


@dataclass
class Faults:
    """The live fault state of one device; the device reads it on every decision."""

    noack: bool = False
    ack_delay: float = 0.0
    garbage: float = 0.0
    burst: float = 1.0


@dataclass(frozen=True)
class FaultSpec:
    """One parsed fault: its kind, its value, and which devices it targets."""

    kind: str
    value: float | None = None
    fraction: float | None = None
    ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse `KIND[=VALUE][@TARGET]` (see the module docstring)."""
        body, _, target = text.strip().partition("@")
        kind, has_value, raw_value = body.partition("=")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise FaultSpecError(f"unknown fault {kind!r}; expected one of {', '.join(KINDS)}")
        value = DEFAULTS[kind]
        if has_value:
            try:
                value = float(raw_value)
            except ValueError:
                raise FaultSpecError(f"fault {text!r}: {raw_value!r} is not a number") from None
            if value < 0:
                raise FaultSpecError(f"fault {text!r}: value must not be negative")
        fraction, ids = None, ()
        target = target.strip()
        if target:
            try:
                fraction = float(target[:-1]) / 100 if target.endswith("%") else float(target)
            except ValueError:
                ids = tuple(t for t in target.split("+") if t)
            else:
                if not 0 < fraction <= 1:
                    raise FaultSpecError(f"fault {text!r}: share must be in (0, 100%]")
        return cls(kind, value, fraction, ids)

    @classmethod
    def parse_many(cls, texts: list[str] | tuple[str, ...] | str | None) -> list[FaultSpec]:
        """Parse comma-separated specs, from one string or several (repeated `--faults`)."""
        if not texts:
            return []
        if isinstance(texts, str):
            texts = [texts]
        return [cls.parse(part) for text in texts for part in text.split(",") if part.strip()]

    def select(self, devices: list[T], ids: list[str], rng: random.Random) -> list[T]:
        """The devices this spec targets; a share is drawn at random (seeded by the fleet)."""
        if self.ids:
            wanted = set(self.ids)
            unknown = wanted - set(ids)
            if unknown:
                raise FaultSpecError(f"fault {self.kind}: no such device {sorted(unknown)}")
            return [d for d, i in zip(devices, ids, strict=True) if i in wanted]
        if self.fraction is None:
            return list(devices)
        count = max(1, round(self.fraction * len(devices)))
        return rng.sample(devices, min(count, len(devices)))


# --- Garbage ------------------------------------------------------------------------------


def _deep(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def native_garbage(device_id: str, n: int) -> tuple[str, bytes]:
    """The n-th malformed message of a native device (cycles through every kind)."""
    base = f"devices/{device_id}"
    kinds: list[tuple[str, bytes]] = [
        (f"{base}/telemetry", b"{temperature: 21.5, oops"),  # not JSON
        (f"{base}/telemetry", b"\xff\xfe\x00\x81garbage"),  # not UTF-8
        (f"{base}/telemetry", b'{"temperature": NaN, "humidity": Infinity}'),  # NaN
        (f"{base}/telemetry", b"[21.5, 40]"),  # not an object
        (f"{base}/telemetry", b'{"temperature": 21.5, "ts": "yesterday"}'),  # bad timestamp
        (f"{base}/telemetry", b'{"firmware": "sim", "note": "no numbers"}'),  # no metrics
        (f"{base}/telemetry", _deep(200)),  # too deep
        (f"{base}/telemetry", b""),  # empty
        (f"devices/{device_id}.bad!/telemetry", b'{"temperature": 21.5}'),  # bad id
        (f"devices/{'x' * 65}/telemetry", b'{"temperature": 21.5}'),  # id too long
        (f"{base}/status", b"maybe"),  # bad status (not retained)
        (f"{base}/commands/ack", b'{"id": "no-such-command", "ok": true}'),  # unknown ack id
        (f"{base}/telemetry", _huge()),  # too large
    ]
    return kinds[n % len(kinds)]


def tasmota_garbage(device_id: str, n: int) -> tuple[str, bytes]:
    """The n-th malformed message of a Tasmota device (cycles through every kind)."""
    tele = f"tele/{device_id}"
    kinds: list[tuple[str, bytes]] = [
        (f"{tele}/SENSOR", b'{"Time":"2026-11-27T05:46:00","AM2301":{"Temperature":'),
        (f"{tele}/SENSOR", b"\xff\xfe\x00\x81garbage"),
        (f"{tele}/SENSOR", b'{"Time":"2026-11-27T05:46:00","AM2301":{"Temperature":NaN}}'),
        (f"{tele}/SENSOR", b'{"Time":"not a time","AM2301":{"Temperature":21.3}}'),
        (f"{tele}/SENSOR", b'{"Time":"2026-11-27T05:46:00","TempUnit":"C"}'),
        (f"{tele}/SENSOR", _deep(200)),
        (f"tele/{device_id}.bad!/SENSOR", b'{"AM2301":{"Temperature":21.3}}'),
        (f"{tele}/LWT", b"Maybe"),
        (f"stat/{device_id}/RESULT", b"not json at all"),
        (f"{tele}/SENSOR", _huge()),
    ]
    return kinds[n % len(kinds)]


def _huge() -> bytes:
    pad = "x" * (HUGE_PAYLOAD_BYTES - 40)
    return json.dumps({"temperature": 21.5, "padding": pad}).encode()
