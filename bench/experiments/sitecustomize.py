"""Bench-only experiments, applied inside the gateway process at start-up (never in production).

``python -m bench --experiment NAME`` puts this directory on the gateway's PYTHONPATH and sets
``BENCH_EXPERIMENTS=NAME,…``; Python imports this module at start-up. Each experiment shows
what a fix the profile points at would buy, before anyone changes the gateway's own code.

- ``amortized-clean``: channels' ``InMemoryChannelLayer._clean_expired`` walks every channel and
  every group on each ``group_send`` and ``receive`` (O(devices) per fan-out); run it at most
  once a second instead (messages expire after 60 s, so nothing is kept noticeably longer).
- ``no-deflate``: uvicorn without permessage-deflate on WebSockets.
(``fast-properties``, sharing paho's Properties tables, was one; it is now in
``gateway/mqtt/server.py``.)
"""

from __future__ import annotations

import os
import time

_EXPERIMENTS = set(filter(None, os.environ.get("BENCH_EXPERIMENTS", "").split(",")))


def _amortize_clean() -> None:
    from channels.layers import InMemoryChannelLayer

    original = InMemoryChannelLayer._clean_expired

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now >= getattr(self, "_bench_next_clean", 0.0):
            self._bench_next_clean = now + 1.0
            original(self)

    InMemoryChannelLayer._clean_expired = _clean_expired


def _no_deflate() -> None:
    import uvicorn.config

    init = uvicorn.config.Config.__init__

    def __init__(self, *args, **kwargs) -> None:
        kwargs["ws_per_message_deflate"] = False
        init(self, *args, **kwargs)

    uvicorn.config.Config.__init__ = __init__


if "amortized-clean" in _EXPERIMENTS:
    _amortize_clean()
if "no-deflate" in _EXPERIMENTS:
    _no_deflate()
