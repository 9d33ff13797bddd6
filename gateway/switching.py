"""How often Python hands the GIL from a busy thread to the event loop's thread.

A thread that keeps the GIL (the telemetry writer building and storing a batch, a sync view
in ``sync_to_async``'s thread, a CSV export) makes the event loop wait for it each time the
loop comes back from ``select``: Python's default switch interval, 5 ms, per loop turn. A
reading crosses several loop turns on its way to a dashboard (MQTT read, its device's
instance, the fan-out, the dashboard's writer), so one that arrived while the writer held the
GIL waited several intervals (docs/performance.md, "The latency tail"). At 0.5 ms a waiting
loop gets the GIL back ten times sooner, for a few microseconds more per forced switch.
"""

from __future__ import annotations

import sys

#: Seconds a thread may hold the GIL while another waits for it (Python's default: 0.005).
SWITCH_INTERVAL = 0.0005


def tune_switch_interval() -> None:
    """Lower the GIL switch interval to `SWITCH_INTERVAL`; a process that set a shorter
    one itself keeps it."""
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)
