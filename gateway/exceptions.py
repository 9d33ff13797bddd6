"""The gateway's own exceptions: one base, subclasses that say what went wrong.

`InvalidEvent` is also a `ValueError` so code written against plain ASGI servers (which raise
ValueError/RuntimeError on bad events) keeps working.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class InvalidEvent(GatewayError, ValueError):
    """An application sent an event the protocol server cannot accept (bad type or keys)."""


class BrokerUnavailable(GatewayError):
    """The MQTT broker is not connected right now; the caller decides whether to hold or retry."""


class Rejected(GatewayError):
    """An inbound message was refused; `reason` is the `gateway_messages_rejected_total` label."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason
