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
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt


def json_response(data: Any, status: int = 200) -> HttpResponse:
    """A JSON response serialised with orjson (strict JSON, fast for long point lists)."""
    return HttpResponse(orjson.dumps(data), status=status, content_type="application/json")


def json_error(status: int, message: str) -> HttpResponse:
    """``{"error": message}`` with `status`."""
    return json_response({"error": message}, status)


def api_view(view: Callable) -> Callable:
    """GET/HEAD only and a logged-in user (else 401/405 JSON); for sync and async views.

    Exempt from the CSRF middleware, which would otherwise answer an unsafe method with its
    HTML 403 page before the view could say 405 (docs/interface.md §5.1): the view serves no
    unsafe method at all, so there is nothing for a forged request to do here."""
    if iscoroutinefunction(view):

        @wraps(view)
        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in ("GET", "HEAD"):
                return json_error(405, "method not allowed")
            if not (await request.auser()).is_authenticated:
                return json_error(401, "authentication required")
            return await view(request, *args, **kwargs)

        return csrf_exempt(async_wrapper)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "method not allowed")
        if not request.user.is_authenticated:
            return json_error(401, "authentication required")
        return view(request, *args, **kwargs)

    return csrf_exempt(wrapper)


def coded_error(status: int, message: str, code: str) -> HttpResponse:
    """``{"error": message, "code": code}`` with `status`: the unsafe methods' error body."""
    return json_response({"error": message, "code": code}, status)


class _CsrfCheck(CsrfViewMiddleware):
    """Django's CSRF check as a function: returns the failure reason instead of a 403 page."""

    def _reject(self, request: HttpRequest, reason: str) -> str:  # type: ignore[override]
        return reason


def csrf_failure(request: HttpRequest) -> str | None:
    """Why `request` fails Django's CSRF check, or None when it passes."""
    check = _CsrfCheck(lambda _request: HttpResponse())
    check.process_request(request)
    return check.process_view(request, None, (), {})  # type: ignore[return-value]


async def unsafe_guard(
    request: HttpRequest, allowed: Callable[[Any], bool], what: str
) -> HttpResponse | None:
    """The checks of a session-authenticated unsafe request, in order: 401 anonymous, 403 CSRF,
    403 `allowed(user)` false ("you may not <what>"); None when it may go on."""
    user = await request.auser()
    if not user.is_authenticated:
        return coded_error(401, "authentication required", "unauthenticated")
    reason = csrf_failure(request)
    if reason is not None:
        return coded_error(
            403,
            f"CSRF verification failed ({reason}): send the csrftoken cookie's value "
            "in an X-CSRFToken header",
            "csrf_failed",
        )
    if not await database_sync_to_async(allowed)(user):
        return coded_error(403, f"you may not {what}", "forbidden")
    return None
