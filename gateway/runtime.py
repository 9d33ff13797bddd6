"""What runs in this process: the interface servers the runner started, for /healthz.

The web tier may run alone (daphne/uvicorn) or beside the bridges (`rungateway`); views ask
here instead of guessing.
"""

from __future__ import annotations

from typing import Protocol


class Bridge(Protocol):
    """An interface server as /healthz sees it (and, optionally, `stalled_for` seconds)."""

    @property
    def connected(self) -> bool: ...


_bridges: dict[str, Bridge] = {}


def register(name: str, bridge: Bridge) -> None:
    """Record a running bridge ("mqtt", "serial") of this process."""
    _bridges[name] = bridge


def unregister(name: str) -> None:
    _bridges.pop(name, None)


def get(name: str) -> Bridge | None:
    """The bridge of that name running in this process, or None."""
    return _bridges.get(name)
