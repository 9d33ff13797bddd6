"""Same-origin check for WebSocket handshakes (docs/interface.md §6: "same-origin only").

Browsers send cookies with cross-site WebSocket handshakes (there is no CORS preflight), so a
page on another site could ride a user's session. We refuse any handshake whose ``Origin`` is
not the ``Host`` it was sent to (or an origin listed in ``settings.CSRF_TRUSTED_ORIGINS``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from django.conf import settings

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _split_host(hostport: str, default_port: int | None) -> tuple[str, int | None] | None:
    """``host[:port]`` → (lower-case host, port or the default); None when malformed."""
    try:
        parts = urlsplit("//" + hostport)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return host.rstrip("."), port if port is not None else default_port


def origin_key(origin: str) -> tuple[str, str, int | None] | None:
    """An ``Origin`` value as (scheme, host, port) with the scheme's default port filled in."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or parts.path not in ("", "/") or parts.query:
        return None
    split = _split_host(parts.netloc, DEFAULT_PORTS[scheme])
    return (scheme, *split) if split else None


def is_same_origin(origin: str, host: str, trusted: Iterable[str] = ()) -> bool:
    """True when ``origin`` names ``host`` (default ports normalised) or a trusted origin."""
    key = origin_key(origin)
    if key is None:
        return False
    scheme, origin_host, origin_port = key
    # The Host header has no scheme; the origin's scheme decides its default port.
    target = _split_host(host.strip(), DEFAULT_PORTS[scheme]) if host.strip() else None
    if target is not None and target == (origin_host, origin_port):
        return True
    return any(origin_key(t) == key for t in trusted)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class SameOriginValidator:
    """ASGI middleware: refuse WebSocket handshakes whose Origin is not the request's Host.

    Other scope types pass through untouched. A refusal is a ``websocket.close`` before
    ``websocket.accept`` (servers answer the handshake with HTTP 403), like Channels'
    ``OriginValidator``; a missing ``Origin`` header is refused too.
    """

    def __init__(self, application, trusted_origins: Iterable[str] | None = None) -> None:
        self.application = application
        self._trusted = None if trusted_origins is None else list(trusted_origins)

    @property
    def trusted_origins(self) -> list[str]:
        """Extra allowed origins: the constructor's, else ``settings.CSRF_TRUSTED_ORIGINS``."""
        if self._trusted is not None:
            return self._trusted
        return list(getattr(settings, "CSRF_TRUSTED_ORIGINS", []))

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "websocket":
            return await self.application(scope, receive, send)
        origin = _header(scope, b"origin")
        host = _header(scope, b"host") or ""
        if origin is not None and is_same_origin(origin, host, self.trusted_origins):
            return await self.application(scope, receive, send)
        logger.info("refused WebSocket %s: origin %r, host %r", scope.get("path"), origin, host)
        await _deny(receive, send)


async def _deny(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Wait for the handshake, refuse it, then drain until the server says disconnect."""
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})
        elif message["type"] == "websocket.disconnect":
            return
