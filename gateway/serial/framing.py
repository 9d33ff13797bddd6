"""Cut a serial byte stream into frames: by delimiter, fixed length, or idle gap.

Framers are pure (no I/O, no clock of their own): the server feeds them bytes with the
monotonic time of arrival and, for idle-gap framing, calls `flush()` after the silence. Every
frame dropped is recorded in `drops` as a `gateway_messages_rejected_total` reason, which the
server counts and clears. Buffers never grow past `max_frame` plus one read chunk.
"""

from __future__ import annotations

from gateway.serial.spec import Framing


class Framer:
    """Base framer: `feed()` returns the complete frames; `drops` lists reasons of dropped ones."""

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self.max_frame = framing.max_frame
        self.buf = bytearray()
        self.drops: list[str] = []
        self._last = 0.0
        self._stale = framing.stale_ms / 1000.0

    def feed(self, data: bytes, now: float) -> list[bytes]:
        """Add bytes that arrived at monotonic time `now`; return the frames they complete."""
        raise NotImplementedError

    def flush(self) -> bytes | None:
        """The port went silent (idle mode) or closed: return the pending frame, if any."""
        self.buf.clear()
        return None

    @property
    def pending(self) -> int:
        """Bytes buffered towards the next frame."""
        return len(self.buf)

    def _drop_stale(self, now: float) -> bool:
        # A partial frame followed by silence is a device reset mid-line: drop it so it cannot
        # corrupt the next good frame.
        stale = bool(self._stale and self.buf and now - self._last > self._stale)
        if stale:
            self.buf.clear()
            self.drops.append("bad_frame")
        self._last = now
        return stale


class DelimiterFramer(Framer):
    """Frames end with a delimiter (any byte sequence, default `\\n`); it is not part of the frame.

    A frame longer than `max_frame` is dropped (one `frame_too_long`) and the bytes up to the
    next delimiter are discarded. Empty frames (two delimiters in a row) are skipped silently.
    """

    def __init__(self, framing: Framing) -> None:
        super().__init__(framing)
        self.delimiter = framing.delimiter
        self._scan = 0  # buffer offset before which no delimiter can start
        self._discarding = False

    def feed(self, data: bytes, now: float) -> list[bytes]:
        if self._stale and now - self._last > self._stale and self._discarding:
            self._discarding = False  # the over-long frame was counted already
            self.buf.clear()
        if self._drop_stale(now) or not self.buf:
            self._scan = 0
        buf, delim, dlen = self.buf, self.delimiter, len(self.delimiter)
        buf += data
        frames: list[bytes] = []
        start = 0
        while True:
            end = buf.find(delim, max(start, self._scan))
            if end < 0:
                break
            if self._discarding:
                self._discarding = False
            elif end - start > self.max_frame:
                self.drops.append("frame_too_long")
            elif end > start:
                frames.append(bytes(buf[start:end]))
            start = end + dlen
            self._scan = start
        if start:
            del buf[:start]
        self._scan = max(0, len(buf) - dlen + 1)
        # Up to dlen - 1 trailing bytes may be the start of a delimiter, not frame content.
        if len(buf) - (dlen - 1) > self.max_frame:
            if not self._discarding:
                self.drops.append("frame_too_long")
                self._discarding = True
            # Keep only what could be the start of a delimiter split across reads.
            del buf[: len(buf) - (dlen - 1)]
            self._scan = 0
        return frames


class FixedFramer(Framer):
    """Frames of exactly `length` bytes; `stale_ms` drops a partial frame after silence (resync)."""

    def feed(self, data: bytes, now: float) -> list[bytes]:
        self._drop_stale(now)
        self.buf += data
        length = self.framing.length
        count = len(self.buf) // length
        if not count:
            return []
        frames = [bytes(self.buf[i * length : (i + 1) * length]) for i in range(count)]
        del self.buf[: count * length]
        return frames


class IdleFramer(Framer):
    """A frame is whatever arrived before `idle_ms` of silence; the server calls `flush()` then."""

    def __init__(self, framing: Framing) -> None:
        super().__init__(framing)
        self._discarding = False

    def feed(self, data: bytes, now: float) -> list[bytes]:
        if self._discarding:
            return []
        self.buf += data
        if len(self.buf) > self.max_frame:
            self.drops.append("frame_too_long")
            self.buf.clear()
            self._discarding = True
        return []

    def flush(self) -> bytes | None:
        self._discarding = False
        if not self.buf:
            return None
        frame = bytes(self.buf)
        self.buf.clear()
        return frame


def make_framer(framing: Framing) -> Framer:
    """The framer for a port's framing settings."""
    if framing.mode == "fixed":
        return FixedFramer(framing)
    if framing.mode == "idle":
        return IdleFramer(framing)
    return DelimiterFramer(framing)
