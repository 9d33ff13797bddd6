"""`/healthz` and `/metrics` (CONTRACT §5): no login, so probes and Prometheus can use them."""

from __future__ import annotations

import asyncio
import hmac
import logging
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway import metrics as gateway_metrics
from gateway import runtime

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0  # seconds for the TCP probe of the broker
DB_TIMEOUT = 2.0  # seconds for SELECT 1
MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

# Labelled series only appear once a label value is used; give the fixed ones a zero so
# scrapes and alerts see every CONTRACT §5 name from the start.
for _reason in (
    "bad_topic bad_device_id too_large bad_encoding bad_json not_object too_deep bad_value "
    "bad_timestamp no_metrics bad_status unknown_command consumer_error bad_frame frame_too_long"
).split():
    gateway_metrics.MESSAGES_REJECTED.labels(reason=_reason)
for _status in ("pending", "sent", "acked", "failed", "timeout"):
    gateway_metrics.COMMANDS.labels(status=_status)


def broker_address(url: str) -> tuple[str, int]:
    """(host, port) of an `mqtt://` / `mqtts://` broker URL (CONTRACT §1)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in MQTT_DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not a broker URL: {url!r}")
    return parts.hostname, parts.port or MQTT_DEFAULT_PORTS[scheme]


async def probe_broker(url: str, within: float = PROBE_TIMEOUT) -> bool:
    """True when the broker accepts a TCP connection within `within` seconds."""
    try:
        host, port = broker_address(url)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except (OSError, ValueError, TimeoutError):
        return False
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), within)
    except (OSError, TimeoutError):
        pass
    return True


def _select_one() -> None:
    # Runs in a pool thread of its own (not Django's shared sync thread) so a hung database
    # cannot stall every other sync call; its connection is closed again afterwards.
    connection = connections["default"]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()


async def database_ok(within: float = DB_TIMEOUT) -> bool:
    """True when the default database answers `SELECT 1` within `within` seconds."""
    try:
        await asyncio.wait_for(sync_to_async(_select_one, thread_sensitive=False)(), within)
    except Exception as exc:  # any failure, including a timeout, means "not ok"
        logger.warning("health check: database unavailable: %s", exc)
        return False
    return True


async def mqtt_state() -> tuple[str, str]:
    """("connected" | "disconnected", "bridge" | "probe"): the in-process bridge if any."""
    bridge = runtime.get("mqtt")
    if bridge is not None:
        return ("connected" if bridge.connected else "disconnected"), "bridge"
    reachable = await probe_broker(settings.GATEWAY["MQTT_URL"])
    return ("connected" if reachable else "disconnected"), "probe"


@never_cache
@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the broker and the database are reachable, else 503 (never hangs)."""
    (mqtt, source), db_ok = await asyncio.gather(mqtt_state(), database_ok())
    body = {
        "mqtt": mqtt,
        "mqtt_check": source,
        "database": "ok" if db_ok else "error",
        "gateway_id": settings.GATEWAY["GATEWAY_ID"],
    }
    healthy = mqtt == "connected" and db_ok
    return JsonResponse(body, status=200 if healthy else 503)


def _authorized(request: HttpRequest, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format of the default registry; Bearer token when METRICS_TOKEN is set."""
    token = settings.GATEWAY.get("METRICS_TOKEN") or ""
    if token and not _authorized(request, token):
        response = HttpResponse("authorization required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
