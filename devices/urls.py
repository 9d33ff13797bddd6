"""`/api/` routes of the devices app (docs/interface.md §5)."""

from django.urls import path, re_path

from devices import views
from devices.commands import views as command_views
from devices.conventions.discovery import views as discovery_views

app_name = "devices"

urlpatterns = [
    path("devices/", views.device_list, name="device-list"),
    # The contract spells it without a trailing slash; accept both.
    re_path(
        r"^devices/(?P<device_id>[^/]+)/telemetry/?$",
        views.device_telemetry,
        name="device-telemetry",
    ),
    re_path(
        r"^devices/(?P<device_id>[^/]+)/commands/?$",
        command_views.send_command,
        name="device-commands",
    ),
    re_path(
        r"^commands/(?P<command_id>[^/]+)/?$",
        command_views.command_status,
        name="command-status",
    ),
    path("discovery/", discovery_views.discovered, name="discovery"),
]
