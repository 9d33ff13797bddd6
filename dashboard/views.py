"""The dashboard pages: the device list at `/` and one device at `/devices/<id>/`.

The list page is a shell of a few kilobytes whatever the fleet's size: its rows come one page
at a time over `/ws/dashboard/` (a `view`, docs/interface.md §6.3). The device page is rendered
on the server (Django autoescapes every value). Both are kept live by the static scripts in
``dashboard/static/dashboard/``.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from alerts.views import can_acknowledge
from dashboard.fleet import DEFAULT_LIMIT, STALE_SECONDS, rejecting_seconds
from devices.commands.service import can_command
from devices.conventions.kinds import LABELS, command_buttons, convention, is_diagnostic
from devices.models import Command, Device
from devices.telemetry.parsing import valid_device_id

#: Commands listed on a device page when it is opened (newer ones arrive as frames).
RECENT_COMMANDS = 20


def _facts(device: Device) -> dict[str, Any]:
    return {"id": device.id, "transport": device.transport, "metrics": device.metrics or {}}


def _row(device: Device) -> dict[str, Any]:
    # Metrics as a sorted list: a metric named "items" must not shadow dict.items in templates.
    metrics = sorted((device.metrics or {}).items())
    kind = convention(_facts(device))
    return {
        "id": device.id,
        "name": device.name or device.id,
        "online": device.online,
        "transport": device.transport,
        "convention": kind,
        "convention_label": LABELS.get(kind, kind),
        "last_seen": device.last_seen,
        "metrics": metrics,
        "primary": [(name, value) for name, value in metrics if not is_diagnostic(name)],
        "diagnostic": [(name, value) for name, value in metrics if is_diagnostic(name)],
        "rejected": device.rejected,
        "last_rejected_at": device.last_rejected_at,
        "last_rejection_reason": device.last_rejection_reason,
        "last_rejection": device.last_rejection,
    }


@never_cache
@login_required
def index(request: HttpRequest) -> HttpResponse:
    """The dashboard (login required): the fleet overview and device list, filled by app.js."""
    window = rejecting_seconds()
    context = {
        "page_size": DEFAULT_LIMIT,
        "stale_seconds": STALE_SECONDS,
        "rejecting_seconds": f"{window:g}",
        "rejecting_minutes": f"{window / 60:g} min" if window >= 60 else f"{window:g} s",
        "can_ack": can_acknowledge(request.user),
    }
    return render(request, "dashboard/index.html", context)


def _command_row(command: Command) -> dict[str, Any]:
    return {
        "id": str(command.id),
        "name": command.name,
        "args": json.dumps(command.args, sort_keys=True),
        "status": command.status,
        "result": None if command.result is None else json.dumps(command.result, sort_keys=True),
        "error": command.error,
        "created_at": command.created_at,
        "created_by": command.created_by.get_username() if command.created_by else "",
    }


@never_cache
@login_required
def device(request: HttpRequest, device_id: str) -> HttpResponse:
    """One device: live charts of its numeric metrics and, for permitted users, commands."""
    if not valid_device_id(device_id):
        raise Http404("no such device")
    # A device the list already shows may still be on its way to the database (batched
    # writes): render it from its id and let the snapshot fill it in, rather than 404.
    dev = Device.objects.filter(pk=device_id).first() or Device(id=device_id)
    allowed = can_command(request.user)
    commands = Command.objects.filter(device_id=device_id).select_related("created_by")
    row = _row(dev)
    buttons = command_buttons(_facts(dev))
    context = {
        "device": row,
        "can_command": allowed,
        "buttons": buttons if allowed else [],
        "commands": [_command_row(c) for c in commands[:RECENT_COMMANDS]],
        "stale_seconds": STALE_SECONDS,
    }
    return render(request, "dashboard/device.html", context)
