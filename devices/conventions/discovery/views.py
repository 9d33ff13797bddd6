"""``GET /api/discovery/``: the discovered devices and entities of this process
(docs/interface.md §3.7), unsupported ones with the reason."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from devices.api import api_view, json_response
from devices.conventions.discovery.consumer import describe


@api_view
async def discovered(request: HttpRequest) -> HttpResponse:
    """Read on the event loop that owns the registry (rungateway: web and bridge share it).
    ``[{"device", "name", "entities": [{"metric", "name", "component", "unit",
    "device_class", "commandable", "unsupported"}]}]``, sorted by device id."""
    return json_response(describe())
