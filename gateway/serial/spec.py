"""Serial port SPECs (docs/interface.md §1): a pyserial URL or device path plus our query options.

`/dev/ttyUSB0?baudrate=115200&device=weather-1&delimiter=hex:0d0a&max_frame=4096`. Options we
know are taken out; any other query option (e.g. pyserial's `logging=debug`) stays in the URL
handed to pyserial.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

DEFAULT_BAUDRATE = 115200
DEFAULT_MAX_FRAME = 8192
FramingMode = Literal["delimiter", "fixed", "idle"]
IoMode = Literal["auto", "async", "thread"]

_SERIAL_KWARGS = {
    "bytesize": int,
    "stopbits": float,
    "parity": str,
    "rtscts": bool,
    "xonxoff": bool,
    "dsrdtr": bool,
}
_ESCAPES = {"\\n": b"\n", "\\r": b"\r", "\\t": b"\t", "\\0": b"\0", "\\\\": b"\\"}


@dataclass(frozen=True)
class Framing:
    """How the byte stream of a port is cut into frames (docs/asgi-serial.md, "Framing")."""

    mode: FramingMode = "delimiter"
    delimiter: bytes = b"\n"
    length: int = 0  # fixed mode: bytes per frame
    idle_ms: float = 0.0  # idle mode: a frame ends after this much silence
    stale_ms: float = 0.0  # delimiter/fixed: drop a partial frame after this much silence (0: off)
    max_frame: int = DEFAULT_MAX_FRAME

    def as_scope(self) -> dict[str, Any]:
        """The framing as it appears in the scope (plain types only)."""
        return {
            "mode": self.mode,
            "delimiter": self.delimiter,
            "length": self.length,
            "idle_ms": self.idle_ms,
            "stale_ms": self.stale_ms,
            "max_frame": self.max_frame,
        }


@dataclass(frozen=True)
class SerialSpec:
    """One configured port: the URL for pyserial, line settings, bound device, framing."""

    url: str
    baudrate: int = DEFAULT_BAUDRATE
    device: str | None = None
    framing: Framing = field(default_factory=Framing)
    serial_kwargs: dict[str, Any] = field(default_factory=dict)
    io: IoMode = "auto"
    raw: str = ""

    @property
    def port(self) -> str:
        """The port's name without options: the `port` metric label and log name."""
        return self.url.split("?", 1)[0]

    def as_scope(self) -> dict[str, Any]:
        """The scope keys describing this port (docs/asgi-serial.md, "Scope")."""
        return {
            "port": self.port,
            "url": self.url,
            "spec": self.raw or self.url,
            "baudrate": self.baudrate,
            "device": self.device,
            "framing": self.framing.as_scope(),
        }


def parse_delimiter(text: str) -> bytes:
    """`hex:0d0a` → bytes; else the text with `\\n`, `\\r`, `\\t`, `\\0`, `\\\\` escapes."""
    if text.lower().startswith("hex:"):
        try:
            value = bytes.fromhex(text[4:])
        except ValueError as exc:
            raise ValueError(f"delimiter {text!r}: bad hex") from exc
    else:
        value = b""
        for piece in re.split(r"(\\[nrt0\\])", text):
            value += _ESCAPES.get(piece, piece.encode())
    if not value:
        raise ValueError("delimiter must not be empty")
    return value


def _positive(name: str, value: str, kind: type = int) -> Any:
    try:
        number = kind(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r}: not a number") from exc
    if number <= 0:
        raise ValueError(f"{name}={value!r}: must be positive")
    return number


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name}={value!r}: not a boolean")


def parse_spec(text: str) -> SerialSpec:
    """Parse one `--serial` SPEC; raise ValueError with a clear message when it is invalid."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty serial SPEC")
    base, _, query = raw.partition("?")
    if not base:
        raise ValueError(f"serial SPEC {raw!r} has no port")
    kept: list[tuple[str, str]] = []
    opts: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in opts:
            raise ValueError(f"serial SPEC {raw!r}: option {key!r} given twice")
        opts[key] = value
    known = {"baudrate", "device", "framing", "delimiter", "length", "idle_ms", "stale_ms"}
    known |= {"max_frame", "io", *_SERIAL_KWARGS}
    for key, value in list(opts.items()):
        if key not in known:
            kept.append((key, value))
            del opts[key]

    baudrate = _positive("baudrate", opts["baudrate"]) if "baudrate" in opts else DEFAULT_BAUDRATE
    device = opts.get("device") or None
    max_frame = _positive("max_frame", opts.get("max_frame", str(DEFAULT_MAX_FRAME)))
    mode = opts.get("framing") or (
        "fixed" if "length" in opts else "idle" if "idle_ms" in opts else "delimiter"
    )
    if mode not in ("delimiter", "fixed", "idle"):
        raise ValueError(f"framing={mode!r}: use delimiter, fixed or idle")
    stale = _positive("stale_ms", opts["stale_ms"], float) if opts.get("stale_ms") else 0.0
    if mode == "delimiter":
        delimiter = parse_delimiter(opts["delimiter"]) if "delimiter" in opts else b"\n"
        framing = Framing(delimiter=delimiter, stale_ms=stale, max_frame=max_frame)
    elif mode == "fixed":
        if "length" not in opts:
            raise ValueError("framing=fixed needs length=N")
        length = _positive("length", opts["length"])
        if length > max_frame:
            raise ValueError(f"length={length} exceeds max_frame={max_frame}")
        framing = Framing(mode="fixed", length=length, stale_ms=stale, max_frame=max_frame)
    else:
        if "idle_ms" not in opts:
            raise ValueError("framing=idle needs idle_ms=N")
        idle_ms = _positive("idle_ms", opts["idle_ms"], float)
        framing = Framing(mode="idle", idle_ms=idle_ms, max_frame=max_frame)

    io = opts.get("io", "auto")
    if io not in ("auto", "async", "thread"):
        raise ValueError(f"io={io!r}: use auto, async or thread")
    serial_kwargs: dict[str, Any] = {}
    for key, kind in _SERIAL_KWARGS.items():
        if key in opts:
            value = opts[key]
            serial_kwargs[key] = _bool(key, value) if kind is bool else kind(value)
    url = base + ("?" + urlencode(kept) if kept else "")
    return SerialSpec(
        url=url,
        baudrate=baudrate,
        device=device,
        framing=framing,
        serial_kwargs=serial_kwargs,
        io=io,  # type: ignore[arg-type]
        raw=raw,
    )


def parse_specs(texts: list[str]) -> list[SerialSpec]:
    """Parse several SPECs; a port given twice is an error (two readers would split its bytes)."""
    specs = [parse_spec(t) for t in texts]
    seen: set[str] = set()
    for spec in specs:
        if spec.port in seen:
            raise ValueError(f"serial port {spec.port!r} given twice")
        seen.add(spec.port)
    return specs
