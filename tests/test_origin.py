"""SameOriginValidator: WebSocket handshakes only from the page's own origin."""

from __future__ import annotations

import pytest
from channels.testing import HttpCommunicator, WebsocketCommunicator

from gateway.origin import SameOriginValidator, is_same_origin, origin_key


async def accepting(scope, receive, send):
    """A WebSocket app that accepts every handshake it is handed."""
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.disconnect":
            return


async def plain_http(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://example.com", "example.com"),
        ("http://example.com", "example.com:80"),
        ("http://example.com:80", "example.com"),
        ("https://example.com", "example.com"),
        ("https://example.com", "example.com:443"),
        ("https://example.com:443", "EXAMPLE.com"),
        ("http://Example.COM:8000", "example.com:8000"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://[::1]:8000", "[::1]:8000"),
        ("http://example.com/", "example.com"),
    ],
)
def test_same_origin(origin, host):
    assert is_same_origin(origin, host)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://evil.com", "example.com"),
        ("http://example.com.evil.com", "example.com"),
        ("http://example.com:8001", "example.com:8000"),
        ("http://example.com", "example.com:443"),
        ("https://example.com", "example.com:80"),
        ("http://example.com", "example.com:8000"),
        ("null", "example.com"),
        ("", "example.com"),
        ("file://", "example.com"),
        ("ftp://example.com", "example.com"),
        ("http://user@example.com", "example.com"),
        ("http://example.com/path", "example.com"),
        ("http://example.com:notaport", "example.com"),
        ("http://example.com", ""),
        ("http://example.com", "example.com:99999"),
    ],
)
def test_not_same_origin(origin, host):
    assert not is_same_origin(origin, host)


def test_trusted_origins_also_pass():
    trusted = ["https://dash.example.com", "http://localhost:3000"]
    assert is_same_origin("https://dash.example.com:443", "gateway:8000", trusted)
    assert is_same_origin("http://localhost:3000", "gateway:8000", trusted)
    assert not is_same_origin("http://dash.example.com", "gateway:8000", trusted)
    assert not is_same_origin("http://localhost:3001", "gateway:8000", trusted)


def test_origin_key_normalises_default_ports():
    assert origin_key("HTTPS://Example.com") == ("https", "example.com", 443)
    assert origin_key("http://example.com:8080") == ("http", "example.com", 8080)
    assert origin_key("gopher://x") is None


async def handshake(headers, app=None):
    comm = WebsocketCommunicator(app or SameOriginValidator(accepting), "/ws/", headers)
    connected, code = await comm.connect(timeout=5)
    await comm.disconnect()
    return connected, code


async def test_same_origin_handshake_is_accepted():
    headers = [(b"host", b"gateway.test:8000"), (b"origin", b"http://gateway.test:8000")]
    assert await handshake(headers) == (True, None)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"gateway.test:8000")],  # no Origin
        [(b"host", b"gateway.test:8000"), (b"origin", b"http://evil.test")],
        [(b"host", b"gateway.test:8000"), (b"origin", b"http://gateway.test:9000")],
        [(b"origin", b"http://gateway.test:8000")],  # no Host
        [(b"host", b"gateway.test:8000"), (b"origin", b"\xff\xfe")],
    ],
)
async def test_other_handshakes_are_refused_before_accept(headers):
    connected, _ = await handshake(headers)
    assert not connected


async def test_trusted_origins_come_from_settings(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://dash.example.com"]
    headers = [(b"host", b"gateway.test:8000"), (b"origin", b"https://dash.example.com")]
    assert (await handshake(headers))[0]
    headers = [(b"host", b"gateway.test:8000"), (b"origin", b"https://other.example.com")]
    assert not (await handshake(headers))[0]


async def test_explicit_trusted_origins_override_settings(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://dash.example.com"]
    app = SameOriginValidator(accepting, trusted_origins=[])
    headers = [(b"host", b"gateway.test:8000"), (b"origin", b"https://dash.example.com")]
    assert not (await handshake(headers, app))[0]


async def test_http_scopes_pass_through():
    comm = HttpCommunicator(SameOriginValidator(plain_http), "GET", "/healthz")
    response = await comm.get_response(timeout=5)
    assert response["status"] == 204


@pytest.mark.parametrize(
    ("origin", "secure", "same"),
    [
        ("http://example.com", False, True),
        ("https://example.com", True, True),
        ("https://example.com", False, False),  # an https page on a plain ws:// socket
        ("http://example.com", True, False),  # an http page on a wss:// socket
    ],
)
def test_the_origin_scheme_matches_the_connection(origin, secure, same):
    assert is_same_origin(origin, "example.com", secure=secure) is same


def test_a_trusted_origin_passes_whatever_the_connection():
    trusted = ["https://dash.example.com"]
    assert is_same_origin("https://dash.example.com", "gw:8000", trusted, secure=False)


async def test_the_handshake_scheme_is_compared():
    """`ws://host` refuses an `https://host` page; `wss://host` accepts it."""
    headers = [(b"host", b"gateway.test"), (b"origin", b"https://gateway.test")]
    plain = WebsocketCommunicator(SameOriginValidator(accepting), "/ws/", headers)
    assert not (await plain.connect(timeout=5))[0]
    await plain.disconnect()
    tls = WebsocketCommunicator(SameOriginValidator(accepting), "/ws/", headers)
    tls.scope["scheme"] = "wss"
    assert (await tls.connect(timeout=5))[0]
    await tls.disconnect()


async def test_behind_a_tls_proxy_its_header_makes_the_socket_secure(settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    base = [(b"host", b"gateway.test"), (b"origin", b"https://gateway.test")]
    assert (await handshake([*base, (b"x-forwarded-proto", b"https")]))[0]
    assert not (await handshake([*base, (b"x-forwarded-proto", b"http")]))[0]
    assert not (await handshake(base))[0]
