"""The `/api/` plumbing every JSON view shares: orjson responses and the login/method guard.

A room of its own so the views of every room (devices, commands, discovery, alerts) can use it
without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from inspect import iscoroutinefunction
from typing import Any

import orjson
from django.http import HttpRequest, HttpResponse


def json_response(data: Any, status: int = 200) -> HttpResponse:
    """A JSON response serialised with orjson (strict JSON, fast for long point lists)."""
    return HttpResponse(orjson.dumps(data), status=status, content_type="application/json")


def json_error(status: int, message: str) -> HttpResponse:
    """``{"error": message}`` with `status`."""
    return json_response({"error": message}, status)


def api_view(view: Callable) -> Callable:
    """GET/HEAD only and a logged-in user (else 401/405 JSON); for sync and async views."""
    if iscoroutinefunction(view):

        @wraps(view)
        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in ("GET", "HEAD"):
                return json_error(405, "method not allowed")
            if not (await request.auser()).is_authenticated:
                return json_error(401, "authentication required")
            return await view(request, *args, **kwargs)

        return async_wrapper

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "method not allowed")
        if not request.user.is_authenticated:
            return json_error(401, "authentication required")
        return view(request, *args, **kwargs)

    return wrapper
