"""The live dashboard page: the device table rendered on the server, then kept live by app.js."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from devices.models import Device


def _row(device: Device) -> dict[str, Any]:
    # Metrics as a sorted list: a metric named "items" must not shadow dict.items in templates.
    return {
        "id": device.id,
        "name": device.name or device.id,
        "online": device.online,
        "transport": device.transport,
        "last_seen": device.last_seen,
        "metrics": sorted((device.metrics or {}).items()),
    }


@never_cache
@login_required
def index(request: HttpRequest) -> HttpResponse:
    """The dashboard (login required): the device table as stored, which app.js keeps live."""
    devices = [_row(d) for d in Device.objects.all()]
    return render(request, "dashboard/index.html", {"devices": devices})
