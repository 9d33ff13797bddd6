"""The commands REST API (docs/interface.md §5): send a command, read its status.

``POST /api/devices/<id>/commands`` with ``{"name": …, "args": {…}, "timeout"?: s}`` answers
``202 {"id", "status": "pending", "device", "name", "url"}`` (and ``Location``); errors are JSON
``{"error": message, "code": …}``: 401 anonymous, 403 no permission or CSRF failure, 404
unknown device, 400 bad input, 429 rate limited (with ``Retry-After``).

CSRF stays on for this session-authenticated unsafe method: a script logs in through
``/accounts/login/`` and sends the ``csrftoken`` cookie's value back in an ``X-CSRFToken``
header (and a same-origin ``Referer`` over HTTPS), as Django's own forms and fetch() do. The
check runs after authentication, so an anonymous caller always gets a clear 401.

``GET /api/commands/<id>`` answers `describe(command)`: the ``command`` frame's fields plus
args, who sent it and when each change happened (epoch seconds, null until it happens).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any

import orjson
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from devices.api import api_view, coded_error, json_error, json_response, unsafe_guard
from devices.commands import service as commands
from devices.models import Command

MAX_BODY_BYTES = 64 * 1024


@csrf_exempt  # checked below, after authentication (401 before 403)
async def send_command(request: HttpRequest, device_id: str) -> HttpResponse:
    """Store a command for the device and start it on its way (202), or say why not."""
    if request.method != "POST":
        response = json_error(405, "method not allowed; POST a command")
        response["Allow"] = "POST"
        return response
    # Before reading the body (has_perm may query the database): nothing reaches the device.
    denied = await unsafe_guard(request, commands.can_command, "send commands")
    if denied is not None:
        return denied
    user = await request.auser()
    if len(request.body) > MAX_BODY_BYTES:
        return coded_error(400, f"body larger than {MAX_BODY_BYTES} bytes", "bad_request")
    try:
        data = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return coded_error(400, "body must be a JSON object: {name, args, timeout?}", "bad_request")
    try:
        command = await commands.submit(user, device_id, data)
    except commands.CommandError as exc:
        response = coded_error(exc.status, exc.message, exc.code)
        if exc.retry_after is not None:
            response["Retry-After"] = str(math.ceil(exc.retry_after))
        return response
    url = f"/api/commands/{command.id}"
    response = json_response(
        {
            "id": str(command.id),
            "status": command.status,
            "device": command.device_id,
            "name": command.name,
            "url": url,
        },
        status=202,
    )
    response["Location"] = url
    return response


def get_command(command_id: Any) -> Command | None:
    """The stored command with this id (None for an unknown or malformed id)."""
    try:
        key = uuid.UUID(str(command_id))
    except ValueError:
        return None
    return Command.objects.select_related("created_by").filter(pk=key).first()


def _epoch(value: datetime | None) -> float | None:
    return round(value.timestamp(), 3) if value is not None else None


def describe(command: Command) -> dict[str, Any]:
    """A command for `/api/commands/<id>`: frame fields (no ``type``), args, who, when.

    Times are epoch seconds like ``ts`` and ``last_seen`` elsewhere; null until they happen.
    """
    body = command.as_frame()
    body.pop("type")
    body.update(
        args=command.args,
        result=command.result,
        error=command.error or None,
        created_by=command.created_by.get_username() if command.created_by else None,
        created_at=_epoch(command.created_at),
        sent_at=_epoch(command.sent_at),
        finished_at=_epoch(command.finished_at),
        timeout=command.timeout,
        expires_at=_epoch(command.expires_at),
    )
    return body


@api_view
async def command_status(request: HttpRequest, command_id: str) -> HttpResponse:
    """The command's current status (any logged-in user may read it), 404 if unknown."""
    command = await database_sync_to_async(get_command)(command_id)
    if command is None:
        return json_error(404, f"no command {command_id!r}")
    return json_response(describe(command))
