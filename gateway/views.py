"""`/healthz` and `/metrics` (docs/interface.md §5.4, §5.5): no login, for probes and Prometheus."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway import metrics as gateway_metrics
from gateway import runtime
from gateway.mqtt.url import parse_broker_url

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0  # seconds for the TCP probe of the broker
DB_TIMEOUT = 2.0  # seconds for SELECT 1

# Labelled series only appear once a label value is used; give the fixed ones a zero so
# scrapes and alerts see every docs/interface.md §5.5 name from the start.
for _reason in (
    "bad_topic bad_device_id too_large bad_encoding bad_json not_object too_deep bad_value "
    "bad_timestamp no_metrics bad_status unknown_command consumer_error bad_frame frame_too_long "
    "too_many_metrics not_admitted bad_checksum"
).split():
    gateway_metrics.MESSAGES_REJECTED.labels(reason=_reason)
for _status in ("pending", "sent", "acked", "failed", "timeout"):
    gateway_metrics.COMMANDS.labels(status=_status)
for _reason in ("unknown_device", "pending_full", "db_refused", "shutdown"):
    gateway_metrics.REJECTIONS_UNRECORDED.labels(reason=_reason)


def _connect_packet(username: str | None, password: str | None) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, keepalive 10 s) with the URL's credentials.

    Written here rather than probing with aiomqtt: aiomqtt runs paho's TCP connect in a worker
    thread that a timeout cannot cancel, so a broker dropping SYNs would hold a thread (and the
    response) for paho's 5 s instead of PROBE_TIMEOUT (tests/test_health_metrics.py).
    """

    def field(data: bytes) -> bytes:
        return len(data).to_bytes(2, "big") + data

    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = field(b"MQTT") + bytes([4, flags]) + (10).to_bytes(2, "big")
    body += field(f"healthz-{secrets.token_hex(4)}".encode())
    if username is not None:
        body += field(username.encode())
    if password is not None:
        body += field(password.encode())
    length, encoded = len(body), b""
    while True:  # the remaining length as MQTT's variable-length integer
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            return b"\x10" + encoded + body


async def probe_broker(url: str, within: float = PROBE_TIMEOUT) -> bool:
    """True when the broker lets us in within `within` seconds: TCP, then TLS for `mqtts://`
    (same CA and client certificate as the bridge), then an MQTT CONNECT with the URL's
    credentials answered by a CONNACK that accepts them."""
    try:
        broker = parse_broker_url(url)
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(
                broker.host,
                broker.port,
                ssl=broker.ssl_context(),
                server_hostname=broker.host if broker.tls else None,
            )
            try:
                writer.write(_connect_packet(broker.username, broker.password))
                await writer.drain()
                connack = await reader.readexactly(4)
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
    except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
        # ssl.SSLError is an OSError: a wrong CA or a refused client certificate lands here.
        logger.debug("health check: broker %s unreachable: %s", url.split("@")[-1], exc)
        return False
    if connack[0] != 0x20 or connack[3] != 0:
        logger.warning(
            "health check: broker %s refused the connection (CONNACK code %d)",
            broker,
            connack[3],
        )
        return False
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
    """200 when the broker and database are reachable and ingest moves, else 503 (never hangs).

    Ingest is stalled when the in-process bridge holds un-acknowledged messages and has
    acknowledged none for ``GATEWAY_HEALTH_STALL_SECONDS``: connected, yet storing nothing.
    """
    (mqtt, source), db_ok = await asyncio.gather(mqtt_state(), database_ok())
    bridge = runtime.get("mqtt")
    stalled = float(getattr(bridge, "stalled_for", 0.0)) if bridge is not None else 0.0
    moving = stalled < settings.GATEWAY["HEALTH_STALL_SECONDS"]
    body: dict[str, Any] = {
        "mqtt": mqtt,
        "mqtt_check": source,
        "database": "ok" if db_ok else "error",
        "ingest": "ok" if moving else "stalled",
        "gateway_id": settings.GATEWAY["GATEWAY_ID"],
    }
    if not moving:
        body["ingest_stalled_seconds"] = round(stalled, 1)
    healthy = mqtt == "connected" and db_ok and moving
    return JsonResponse(body, status=200 if healthy else 503)


@require_GET
def favicon(request: HttpRequest) -> HttpResponse:
    """No icon, said without a 404: browsers ask for it on the login and admin pages."""
    response = HttpResponse(status=204)
    response["Cache-Control"] = "public, max-age=86400"
    return response


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
