"""The `/ws/dashboard/` stack of gateway/asgi.py for WebsocketCommunicator tests, and a login."""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.urls import path

from dashboard.consumers import DashboardConsumer
from dashboard.routing import websocket_urlpatterns
from gateway.origin import SameOriginValidator

HOST = "gateway.test:8000"
ORIGIN = f"http://{HOST}"


def websocket_app(**consumer_kwargs):
    """The `websocket` branch of gateway/asgi.py, optionally with tuned consumer settings."""
    routes = websocket_urlpatterns
    if consumer_kwargs:
        routes = [path("ws/dashboard/", DashboardConsumer.as_asgi(**consumer_kwargs))]
    return SameOriginValidator(AuthMiddlewareStack(URLRouter(routes)))


def ws_headers(cookie: str | None, origin: str | None = ORIGIN, host: str = HOST):
    """The handshake's headers: Host, Origin (None: none) and the session cookie."""
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if cookie is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    return headers


def session_of(user) -> str:
    """A real session cookie value of `user`, as the browser carries it after logging in."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def connect(cookie, app=None, query: str = "", **header_kwargs) -> WebsocketCommunicator:
    """A connected communicator on `/ws/dashboard/` (with `?query` when given)."""
    url = "/ws/dashboard/" + (f"?{query}" if query else "")
    comm = WebsocketCommunicator(
        app or websocket_app(), url, headers=ws_headers(cookie, **header_kwargs)
    )
    connected, _ = await comm.connect(timeout=5)
    assert connected
    return comm
