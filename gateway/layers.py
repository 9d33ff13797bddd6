"""The in-memory channel layer, tuned for thousands of long-lived consumers.

Channels' `InMemoryChannelLayer` runs `_clean_expired()` — a walk over every channel and every
group membership — on each `send`, `receive` and `group_send`. With one consumer instance per
device that is O(devices) work per message: at 10,000 devices it was a quarter of the event
loop's time and the per-message cost grew from 99 to 1,317 µs (docs/performance.md). Expired
messages and memberships only need to go eventually, so we clean at most once a second.
"""

from __future__ import annotations

import time

from channels.layers import InMemoryChannelLayer

CLEAN_INTERVAL = 1.0


class ThrottledInMemoryChannelLayer(InMemoryChannelLayer):
    """`InMemoryChannelLayer` whose expiry sweep runs at most once per `CLEAN_INTERVAL` s."""

    _next_clean = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now < self._next_clean:
            return
        self._next_clean = now + CLEAN_INTERVAL
        super()._clean_expired()
