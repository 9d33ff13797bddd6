"""Acknowledging QoS 1/2 messages only when the application says they are safe (`mqtt.ack`).

The server hands every QoS > 0 `mqtt.message` an opaque `AckHandle`; the PUBACK (PUBREC for
QoS 2) goes to the broker only when the application sends `{"type": "mqtt.ack", "ack": handle}`,
e.g. once the reading is committed. Until then the broker holds the message in the session, so
a gateway that dies redelivers it on restart instead of losing it (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class AckHandle:
    """Which message of which broker connection to acknowledge; opaque to applications."""

    __slots__ = ("ledger", "mid", "qos", "done")

    def __init__(self, ledger: AckLedger, mid: int, qos: int) -> None:
        self.ledger = ledger
        self.mid = mid
        self.qos = qos
        self.done = False

    def __repr__(self) -> str:
        state = "acked" if self.done else "pending"
        return f"<AckHandle mid={self.mid} qos={self.qos} {state}>"


class AckLedger:
    """One connection's delivered, not yet acknowledged messages (paho in manual-ack mode).

    A handle acks at most once. After the connection is lost its handles are stale: acking
    them does nothing, since the broker redelivers those messages to the resumed session.
    """

    def __init__(self, paho: Any) -> None:
        self.paho = paho
        self.outstanding = 0
        self.closed = False
        # When the ledger last made progress: an ack, or the first message of a busy spell.
        self.progress = time.monotonic()
        self._drained = asyncio.Event()
        self._drained.set()

    def handle(self, mid: int, qos: int) -> AckHandle:
        """A handle for a message about to be delivered to the application."""
        if not self.outstanding:
            self.progress = time.monotonic()
        self.outstanding += 1
        self._drained.clear()
        return AckHandle(self, mid, qos)

    def ack(self, handle: AckHandle) -> None:
        """Acknowledge to the broker (once; nothing if the connection is gone)."""
        if handle.done:
            return
        handle.done = True
        self.outstanding -= 1
        self.progress = time.monotonic()
        if not self.closed:
            self.paho.ack(handle.mid, handle.qos)
        if self.outstanding == 0:
            self._drained.set()

    def stalled_for(self) -> float:
        """Seconds messages have waited with no acknowledgement at all (0 when none wait)."""
        return time.monotonic() - self.progress if self.outstanding and not self.closed else 0.0

    def close(self) -> None:
        """The connection is gone: later acks of its handles are no-ops."""
        self.closed = True
        self._drained.set()

    async def drained(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to `timeout` s until nothing is outstanding; True if so."""
        try:
            await asyncio.wait_for(self._drained.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True
