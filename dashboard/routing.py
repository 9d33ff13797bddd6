"""WebSocket routes of the dashboard; `gateway/asgi.py` wraps them in auth and origin checks."""

from django.urls import path

from dashboard.consumers import DashboardConsumer

websocket_urlpatterns = [
    path("ws/dashboard/", DashboardConsumer.as_asgi(), name="ws-dashboard"),
]
