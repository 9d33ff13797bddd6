"""Mirror serial devices to the broker, so other MQTT clients see them as ordinary devices.

The serial device consumer calls `get_mirror()` and then `telemetry()` / `status()` (sync,
never block). One `Mirror` per event loop owns one aiomqtt client, started lazily on first
use, publishing ``devices/<id>/telemetry`` (JSON, QoS 0) and ``devices/<id>/status``
(``online``/``offline``, QoS 1, retained). The serial and MQTT protocol servers stay unaware
of each other.

Outbox: statuses are coalesced per device (only the latest matters, it is retained);
telemetry waits in a deque of `OUTBOX_LIMIT` messages, the oldest dropped and counted
(`gateway_serial_mirror_dropped_total`) while the broker is away. On every (re)connect the
last status of each device is published again (a broker without persistence forgets retained
messages when it restarts).

Echoes: the gateway's own MQTT bridge is subscribed to ``devices/+/...`` and receives these
publishes back. Each mirrored publish carries the MQTT v5 user property
``gateway-mirror: <mark>``, an HMAC of its topic and payload under a key derived from the
gateway's secret key and id (`mirror_mark`); `is_mirror_echo(topic, payload, properties)`
tells the MQTT device consumer to skip it, so a serial reading is stored once, with transport
``serial``. Every process of one gateway shares the secret key, so runserial and runmqtt may be
separate; another publisher cannot forge a mark for its own payload, so copying the property
never makes its messages vanish. (Recognising the device's transport instead would need
shared state across processes and races on a device's first message; the mark is exact and
stateless.) Mirroring is on by default; ``SERIAL_MIRROR=0`` or `configure(enabled=False)`
turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import secrets
import time
import weakref
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiomqtt
import orjson
from django.conf import settings
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.metrics import SERIAL_MIRROR_DROPPED
from gateway.mqtt.url import SOCKET_OPTIONS, parse_broker_url

logger = logging.getLogger(__name__)

OUTBOX_LIMIT = 1000
MIRROR_PROPERTY = "gateway-mirror"
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0

_config: dict[str, Any] = {"enabled": None, "url": None}
_mirrors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mirror] = weakref.WeakKeyDictionary()


def _gateway_id() -> str:
    return settings.GATEWAY["GATEWAY_ID"]


def configure(enabled: bool | None = None, url: str | None = None) -> None:
    """Override the settings for this process (runserial's ``--no-mirror`` / ``--mqtt``)."""
    if enabled is not None:
        _config["enabled"] = enabled
    if url is not None:
        _config["url"] = url


def enabled() -> bool:
    """Whether serial devices are mirrored: `configure()`, else SERIAL_MIRROR (default on)."""
    if _config["enabled"] is not None:
        return bool(_config["enabled"])
    return bool(settings.GATEWAY["SERIAL_MIRROR"])


@functools.cache
def _mark_key(secret_key: str, gateway_id: str) -> bytes:
    return hashlib.sha256(f"gateway-mirror\0{gateway_id}\0{secret_key}".encode()).digest()


def mirror_mark(topic: str, payload: bytes) -> str:
    """The mark of this gateway's mirrored publish: HMAC-SHA256 of topic and payload, 32 hex."""
    key = _mark_key(settings.SECRET_KEY, _gateway_id())
    return hmac.new(key, topic.encode() + b"\0" + payload, hashlib.sha256).hexdigest()[:32]


def is_mirror_echo(topic: str, payload: bytes, properties: Mapping[str, Any] | None) -> bool:
    """True when an incoming MQTT message is this gateway's own mirror of a serial device."""
    if not properties:
        return False
    for key, value in properties.get("user_properties") or ():
        if key == MIRROR_PROPERTY:
            return isinstance(value, str) and hmac.compare_digest(
                value, mirror_mark(topic, payload)
            )
    return False


def marked(topic: str, payload: bytes) -> Properties:
    """PUBLISH properties carrying this publish's mirror mark."""
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [(MIRROR_PROPERTY, mirror_mark(topic, payload))]
    return props


def get_mirror() -> Mirror | None:
    """The running loop's mirror (created on first use), or None when mirroring is off."""
    if not enabled():
        return None
    loop = asyncio.get_running_loop()
    mirror = _mirrors.get(loop)
    if mirror is None or mirror.closed:
        mirror = _mirrors[loop] = Mirror(_config["url"] or settings.GATEWAY["MQTT_URL"])
    return mirror


async def close_mirror(timeout: float = 2.0) -> None:  # noqa: ASYNC109
    """Publish what is pending (up to `timeout`) and stop the running loop's mirror."""
    mirror = _mirrors.pop(asyncio.get_running_loop(), None)
    if mirror is not None:
        await mirror.close(timeout)


class Mirror:
    """One loop's publisher of mirrored serial devices (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.broker = parse_broker_url(url)
        self.closed = False
        self.connected = False
        self._tag = secrets.token_hex(3)  # unique client id (id(self) may be reused)
        self._telemetry: deque[tuple[str, bytes]] = deque()
        self._status: dict[str, bool] = {}
        self._known: dict[str, bool] = {}  # last status of every device, republished on connect
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def telemetry(self, device_id: str, ts: float, metrics: Mapping[str, float | bool]) -> None:
        """Queue ``devices/<id>/telemetry`` with the reading's metrics and ``ts``."""
        if self.closed:
            return
        if len(self._telemetry) >= OUTBOX_LIMIT:
            self._telemetry.popleft()
            SERIAL_MIRROR_DROPPED.inc()
        self._telemetry.append((device_id, orjson.dumps({**metrics, "ts": ts})))
        self._kick()

    def status(self, device_id: str, online: bool) -> None:
        """Queue the retained ``devices/<id>/status`` (only the latest per device is kept)."""
        if self.closed:
            return
        self._status.pop(device_id, None)
        self._status[device_id] = online
        self._known[device_id] = online
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="devices.conventions.mirror.publisher"
            )

    async def _run(self) -> None:
        backoff, warned = BACKOFF_FIRST, False
        b = self.broker
        while True:
            try:
                async with aiomqtt.Client(
                    b.host,
                    b.port,
                    username=b.username,
                    password=b.password,
                    identifier=f"{_gateway_id()}-serial-mirror-{os.getpid()}-{self._tag}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    tls_context=b.ssl_context(),
                    socket_options=SOCKET_OPTIONS,
                    timeout=5,
                ) as client:
                    self.connected, backoff, warned = True, BACKOFF_FIRST, False
                    # A broker without persistence forgets retained statuses when it restarts.
                    for device_id, online in self._known.items():
                        self._status.setdefault(device_id, online)
                    logger.info("serial mirror connected to %s", b)
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                self.connected = False
                log = logger.debug if warned else logger.warning
                log("serial mirror: broker %s unavailable (%s); retrying", b, exc)
                warned = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _serve(self, client: aiomqtt.Client) -> None:
        # aiomqtt does not interrupt the body of `async with Client` when the connection
        # drops; an idle publisher would only notice on its next publish. The message
        # iterator raises MqttError on disconnection, so watch it beside the drain.
        drain = asyncio.create_task(self._drain(client), name="devices.conventions.mirror.drain")
        watch = asyncio.create_task(self._watch(client), name="devices.conventions.mirror.watch")
        try:
            done, _ = await asyncio.wait({drain, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (drain, watch):
                task.cancel()
            await asyncio.gather(drain, watch, return_exceptions=True)
        for task in done:
            task.result()  # the MqttError that ended the session

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        async for _ in client.messages:  # no subscriptions: this only ends by MqttError
            pass

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            while self._status or self._telemetry:
                if self._status:
                    device_id, online = next(iter(self._status.items()))
                    topic = f"devices/{device_id}/status"
                    payload = b"online" if online else b"offline"
                    await client.publish(
                        topic, payload, qos=1, retain=True, properties=marked(topic, payload)
                    )
                    if self._status.get(device_id) is online:  # unchanged while publishing
                        del self._status[device_id]
                else:
                    device_id, payload = self._telemetry[0]
                    topic = f"devices/{device_id}/telemetry"
                    await client.publish(topic, payload, qos=0, properties=marked(topic, payload))
                    self._telemetry.popleft()
            self._idle.set()
            self._wake.clear()
            await self._wake.wait()

    async def flush(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """Wait until everything queued is published; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Flush (bounded by `timeout`), then stop the publisher."""
        started = time.monotonic()
        if self._task is not None and not self._idle.is_set():
            await self.flush(timeout)
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, max(0.1, timeout - (time.monotonic() - started)))
        self.connected = False
