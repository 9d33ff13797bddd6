"""Same-origin check for WebSocket handshakes (docs/interface.md §6: "same-origin only").

Browsers send cookies with cross-site WebSocket handshakes (there is no CORS preflight), so a
page on another site could ride a user's session. We refuse any handshake whose ``Origin`` is
not the ``Host`` it was sent to, reached the same way (an ``https`` page for a ``wss``
connection, ``http`` for ``ws``), unless it is listed in ``settings.CSRF_TRUSTED_ORIGINS``.
Behind a TLS proxy the connection counts as secure when ``SECURE_PROXY_SSL_HEADER`` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from django.conf import settings

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
SECURE_SCHEMES = {"https", "wss"}


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


def is_same_origin(
    origin: str, host: str, trusted: Iterable[str] = (), secure: bool | None = None
) -> bool:
    """True when ``origin`` names ``host`` (default ports normalised) or a trusted origin.

    With ``secure`` given (the connection is TLS or not), the origin's scheme must match it.
    """
    key = origin_key(origin)
    if key is None:
        return False
    scheme, origin_host, origin_port = key
    if any(origin_key(t) == key for t in trusted):
        return True
    if secure is not None and (scheme in SECURE_SCHEMES) != secure:
        return False
    # The Host header has no scheme; the origin's scheme decides its default port.
    target = _split_host(host.strip(), DEFAULT_PORTS[scheme]) if host.strip() else None
    return target is not None and target == (origin_host, origin_port)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def is_secure(scope: Scope) -> bool:
    """Whether the handshake came over TLS: ``wss``, or the trusted proxy header says https."""
    if scope.get("scheme") in SECURE_SCHEMES:
        return True
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        meta_name, value = proxy  # Django's form: ("HTTP_X_FORWARDED_PROTO", "https")
        name = meta_name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
        given = _header(scope, name)
        return given is not None and given.split(",")[0].strip().lower() == value
    return False


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
        secure = is_secure(scope)
        if origin is not None and is_same_origin(origin, host, self.trusted_origins, secure):
            return await self.application(scope, receive, send)
        logger.info(
            "refused WebSocket %s: origin %r, host %r, %s",
            scope.get("path"),
            origin,
            host,
            "TLS" if secure else "no TLS",
        )
        await _deny(receive, send)


async def _deny(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Wait for the handshake, refuse it, then drain until the server says disconnect."""
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})
        elif message["type"] == "websocket.disconnect":
            return
