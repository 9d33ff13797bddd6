"""Broker URLs: `mqtt://[user:pass@]host[:port]` and `mqtts://…` (TLS), docs/interface.md §1.

A `mqtts://` URL may name its TLS files in the query, so one URL (`MQTT_URL`, `--mqtt`) says
everything about the connection, for the bridge, the serial mirror and the /healthz probe:
`mqtts://user:pass@broker:8883?cafile=/etc/gw/ca.pem&certfile=/etc/gw/gw.pem&keyfile=/etc/gw/gw.key`.
`cafile` trusts only that CA (a private broker), else the system's CAs; `certfile`/`keyfile`
is the client certificate for brokers that require one.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
#: Query parameters of a `mqtts://` URL: files for the TLS context.
TLS_OPTIONS = ("cafile", "certfile", "keyfile")

#: Socket options for every broker connection we open. paho leaves Nagle's algorithm on, and
#: with the broker's delayed ACKs each small publish then waits ~40 ms (a command round trip
#: measured 88 ms on loopback, ~4 ms with TCP_NODELAY on both ends).
SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True)
class BrokerURL:
    """A parsed broker URL; `tls` is True for `mqtts://`."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context for `mqtts://` (its CA and client certificate), else None.

        Raises ssl.SSLError or OSError when a named file is unreadable or not a certificate.
        """
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.cafile)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context

    def __str__(self) -> str:  # never prints the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL; raise ValueError with a clear message when it is not one."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"unsupported broker URL scheme {parts.scheme!r} in {url!r}: "
            "use mqtt://[user:pass@]host[:port] or mqtts://…"
        )
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"broker URL {url!r} must not have a path or fragment")
    options = _tls_options(parts.query, scheme, url)
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has an invalid port") from exc
    broker = BrokerURL(
        host=parts.hostname,
        port=port,
        tls=scheme == "mqtts",
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        **options,
    )
    if options:
        try:  # a wrong path or file is a clear error at start, not a reconnect loop later
            broker.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"broker URL {broker}: cannot use its TLS files: {exc}") from exc
    return broker


def _tls_options(query: str, scheme: str, url: str) -> dict[str, str]:
    """The `cafile`/`certfile`/`keyfile` query parameters, checked."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has a malformed query") from exc
    options = dict(pairs)
    unknown = sorted(set(options) - set(TLS_OPTIONS))
    if unknown or len(options) != len(pairs):
        raise ValueError(
            f"broker URL {url!r}: unknown or repeated query parameters {unknown or pairs}; "
            f"allowed: {', '.join(TLS_OPTIONS)}"
        )
    if options and scheme != "mqtts":
        raise ValueError(f"broker URL {url!r}: TLS files need an mqtts:// URL")
    if "keyfile" in options and "certfile" not in options:
        raise ValueError(f"broker URL {url!r}: keyfile without certfile")
    if not all(options.values()):
        raise ValueError(f"broker URL {url!r}: an empty TLS file name")
    return options
