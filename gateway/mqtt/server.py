"""The `mqtt` interface server: one broker connection (aiomqtt), topic routing, app instances.

Lifecycle in three beats: `serve()` connects, subscribes and routes, reconnecting forever with
backoff, keeping its retained status `online` (gateway/mqtt/status.py); `shutdown()` publishes
`offline`, retires instances and disconnects within its timeout. Specified in docs/asgi-mqtt.md.

Over 400 lines on purpose: one protocol class, as daphne's and uvicorn's servers are; its
connect, session, receive and send paths share the connection state. Everything that does not
need that state lives beside it (routing, instances, acks, status, events, url, tuning).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics
from gateway.exceptions import BrokerUnavailable, InvalidEvent
from gateway.mqtt.acks import AckHandle, AckLedger
from gateway.mqtt.events import (
    ASGI,
    properties_from_dict,
    properties_to_dict,
    validate_app_event,
)
from gateway.mqtt.instances import InstancePool
from gateway.mqtt.routing import find_topic_router
from gateway.mqtt.status import OFFLINE, ONLINE, StatusTopic
from gateway.mqtt.tuning import (
    NoTopicCallbacks,
    SocketReader,
    fast_publish_decoding,
    inbox_type,
    read_burst,
)
from gateway.mqtt.url import SOCKET_OPTIONS, parse_broker_url

logger = logging.getLogger("gateway.mqtt")

PROTOCOLS = {"v5": aiomqtt.ProtocolVersion.V5, "v311": aiomqtt.ProtocolVersion.V311}
# CONNACK codes meaning "this broker does not speak the protocol version we asked for".
_UNSUPPORTED_VERSION = {1, 0x84}


class MqttServer:
    """Serves the `mqtt` routes of an ASGI application over one broker connection."""

    def __init__(
        self,
        application: Any,
        *,
        url: str,
        client_id: str,
        status_topic: str | None = None,
        shared_group: str | None = None,
        instance_queue: int = 256,
        idle_seconds: float = 600.0,
        max_instances: int = 50_000,
        protocol: str = "v5",
        keepalive: int = 30,
        subscribe_qos: int = 1,
        receive_maximum: int = 1000,
        inbox_size: int = 10_000,
        clean_start: bool = True,
        session_expiry: int = 0,
        backoff_initial: float = 0.1,
        backoff_max: float = 1.5,
        retire_grace: float = 1.0,
        operation_timeout: float = 10.0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}")
        fast_publish_decoding()
        self.application = application
        self.router = find_topic_router(application)
        self.broker = parse_broker_url(url)
        self.client_id = client_id
        self.status_topic = status_topic
        self._status = StatusTopic(status_topic) if status_topic else None
        self.shared_group = shared_group
        self.protocol = protocol
        self.keepalive = keepalive
        self.subscribe_qos = subscribe_qos
        self.receive_maximum = receive_maximum
        self.inbox_size = inbox_size
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.operation_timeout = operation_timeout
        self.app_subscriptions: dict[str, int] = {}
        self._pool = InstancePool(
            application,
            {
                "type": "mqtt",
                "asgi": dict(ASGI),
                "broker": {
                    "host": self.broker.host,
                    "port": self.broker.port,
                    "tls": self.broker.tls,
                },
                "client_id": client_id,
            },
            self._app_send,
            limit=instance_queue,
            idle_seconds=idle_seconds,
            max_instances=max_instances,
            retire_grace=retire_grace,
            connect_event=self._connect_event,
        )
        self._client: aiomqtt.Client | None = None
        self._ledger: AckLedger | None = None  # this connection's un-acked QoS>0 messages
        self._connected = False
        self._session_present = False
        self._connected_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._release = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._receiving: asyncio.Task[None] | None = None
        self._conn_task: asyncio.Task[None] | None = None

    # --- public state -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the broker session is up (subscribed, `online` published)."""
        return self._connected

    @property
    def instances(self) -> int:
        """The number of live application instances."""
        return len(self._pool)

    @property
    def stalled_for(self) -> float:
        """Seconds un-acknowledged messages have waited with no ack at all: ingest is stuck."""
        ledger = self._ledger
        return ledger.stalled_for() if ledger is not None else 0.0

    @property
    def unacknowledged(self) -> int:
        """QoS>0 messages of this connection handed to the app and not yet acknowledged."""
        return self._ledger.outstanding if self._ledger is not None else 0

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until connected; raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._connected_event.wait()

    # --- lifecycle ----------------------------------------------------------------------
    async def serve(self) -> None:
        """Connect, subscribe and route messages, reconnecting forever; return after shutdown()."""
        self._pool.start()
        self._conn_task = asyncio.create_task(
            self._connection_loop(), name=f"mqtt-server[{self.client_id}]"
        )
        try:
            await self._conn_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._stopping or (current is not None and current.cancelling()):
                self._conn_task.cancel()
                self._pool.closing = True
                raise
        await self._stopped.wait()

    async def shutdown(self, timeout: float = 4.0) -> None:  # noqa: ASYNC109
        """Publish retained `offline`, retire instances, disconnect; done within `timeout` s."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._stop_event.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if self._receiving is not None:
                self._receiving.cancel()
            client = self._client if self._connected else None
            if client is not None and self._status is not None:
                self._status.cancel()
                budget = min(1.0, timeout / 4)
                try:
                    await asyncio.wait_for(self._status.publish(client, OFFLINE), budget)
                except (aiomqtt.MqttError, TimeoutError) as exc:
                    logger.warning("could not publish 'offline' status: %s", exc)
            grace = max(0.0, min(self._pool.retire_grace, (deadline - loop.time()) / 2))
            await self._pool.close(grace)
            if self._ledger is not None and self._ledger.outstanding:
                # Acks still coming (readings being committed): sent now, they spare the
                # broker redelivering those messages to the next run as duplicates.
                budget = (deadline - loop.time()) / 2
                if not await self._ledger.drained(budget):
                    logger.warning(
                        "%d messages not acknowledged at shutdown; the broker will redeliver them",
                        self._ledger.outstanding,
                    )
            self._release.set()
            if self._conn_task is not None and not self._conn_task.done():
                remaining = max(0.05, deadline - loop.time())
                if client is None:
                    self._conn_task.cancel()
                _, pending = await asyncio.wait({self._conn_task}, timeout=remaining)
                for task in pending:
                    task.cancel()
        finally:
            self._set_disconnected("shutdown", notify=False)
            self._stopped.set()

    # --- connection ---------------------------------------------------------------------
    def _make_client(self) -> tuple[aiomqtt.Client, list[asyncio.Queue[Any]]]:
        v5 = self.protocol == "v5"
        holder: list[asyncio.Queue[Any]] = []
        connect_props = None
        if v5 and (self.receive_maximum != 65535 or self.session_expiry):
            # Absent properties mean Receive Maximum 65535 and Session Expiry 0 (MQTT v5 §3.1.2).
            # Receive Maximum bounds the QoS>0 messages delivered and not acknowledged, i.e.
            # not yet stored: 1000 keeps the pipeline's group commits large (100 halved QoS 1
            # ingest, docs/reliability.md).
            connect_props = Properties(PacketTypes.CONNECT)
            connect_props.ReceiveMaximum = self.receive_maximum
            connect_props.SessionExpiryInterval = self.session_expiry
        will = self._status.will() if self._status is not None else None
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            logger=logging.getLogger("aiomqtt"),
            identifier=self.client_id,
            queue_type=inbox_type(self.inbox_size, holder),
            protocol=PROTOCOLS[self.protocol],
            will=will,
            clean_session=None if v5 else self.clean_start,
            keepalive=self.keepalive,
            # paho refuses an explicit clean_start on 3.1.1 (clean_session says it there).
            clean_start=self.clean_start if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_props,
            tls_context=self.broker.ssl_context(),
            socket_options=SOCKET_OPTIONS,
            timeout=self.operation_timeout,
        )
        # Many instances may publish at once; aiomqtt's default warns past 10 pending calls.
        client.pending_calls_threshold = 10_000
        # aiomqtt has no option for these two paho features, so set them on its paho client:
        # manual acks (PUBACK only when the app sends `mqtt.ack`, e.g. once stored: no loss
        # on a crash, and flow control by the broker's in-flight window) and the CONNACK
        # session-present flag (mqtt.connect).
        paho = client._client
        paho.manual_ack_set(True)
        on_connect = paho.on_connect

        def record_connack(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            self._session_present = bool(getattr(flags, "session_present", False))
            on_connect(c, userdata, flags, rc, props)

        paho.on_connect = record_connack

        # aiomqtt calls paho's loop_read() once per "socket readable" event, and paho reads one
        # packet per call, so each message cost a whole event-loop turn (and its own fan-out).
        # paho reads each packet with three recv calls; one large read serves many packets.
        def resume() -> None:  # as aiomqtt's socket-readable callback does
            try:
                paho.loop_read()
            except Exception as exc:
                if not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        reader = SocketReader(paho._sock_recv, resume, asyncio.get_running_loop())
        paho._sock_recv = reader
        paho.loop_read = functools.partial(read_burst, paho, self._pool, reader)
        paho._on_message_filtered = NoTopicCallbacks()
        return client, holder

    async def _connection_loop(self) -> None:
        delay = self.backoff_initial
        last_reason = ""
        while not self._stopping:
            client, holder = self._make_client()
            reason = ""
            try:
                async with client:
                    if last_reason:
                        logger.info("reconnected to %s", self.broker)
                    delay, last_reason = self.backoff_initial, ""
                    await self._session(client, holder[0])
            except MqttConnectError as exc:
                code = getattr(exc.rc, "value", exc.rc)
                if self.protocol == "v5" and code in _UNSUPPORTED_VERSION:
                    logger.warning("%s refused MQTT v5; falling back to 3.1.1", self.broker)
                    self.protocol = "v311"
                    continue
                reason = f"connect refused: {exc}"
            except aiomqtt.MqttError as exc:
                reason = str(exc) or type(exc).__name__
                if exc.__cause__ is not None:
                    reason = f"{reason}: {exc.__cause__}"
            except Exception as exc:  # a bug must not end the bridge: log it and reconnect
                reason = f"{type(exc).__name__}: {exc}"
                if reason != last_reason:
                    logger.exception("mqtt connection to %s failed unexpectedly", self.broker)
                    last_reason = reason
            finally:
                self._set_disconnected(reason or "connection closed")
            if self._stopping:
                break
            if reason != last_reason:
                logger.warning("mqtt broker %s unavailable: %s (retrying)", self.broker, reason)
                last_reason = reason
            else:
                logger.debug("mqtt broker %s still unavailable: %s", self.broker, reason)
            with contextlib.suppress(TimeoutError):
                sleep = random.uniform(delay / 2, delay)
                await asyncio.wait_for(self._stop_event.wait(), sleep)
            delay = min(delay * 2, self.backoff_max)

    async def _session(self, client: aiomqtt.Client, inbox: asyncio.Queue[Any]) -> None:
        if self._stopping:
            return
        self._client = client
        self._ledger = AckLedger(client._client)
        try:
            await self.router.prepare()  # e.g. the devices a route admits, before any message
        except Exception:
            logger.exception("preparing the routes' admission failed; subscribing anyway")
        filters = [(self._shared(f), self.subscribe_qos) for f in self.router.subscriptions]
        filters += list(self.app_subscriptions.items())
        if self._status is not None:  # to hear another bridge's `offline` (status.py)
            filters.append(self._status.subscription(self.protocol == "v5"))
        if filters:
            codes = await client.subscribe(filters)
            for (name, _), code in zip(filters, codes, strict=False):
                value = getattr(code, "value", code)
                if value not in (0, 1, 2):
                    logger.warning("broker refused subscription %s: %s", name, code)
        if self._status is not None:
            await self._status.publish(client, ONLINE)
        self._connected = True
        metrics.MQTT_CONNECTED.set(1)
        metrics.MQTT_RECONNECTS.inc()
        self._connected_event.set()
        self._pool.broadcast({"type": "mqtt.connect", "session_present": self._session_present})
        self._pool.start_static(self.router.static_matches)  # each gets its own mqtt.connect
        self._receiving = asyncio.create_task(
            self._receive(client, inbox), name=f"mqtt-server[{self.client_id}].receive"
        )
        try:
            await self._receiving
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._stopping or (current is not None and current.cancelling()):
                raise
            # shutdown() stopped the receive loop; hold the connection for its last publishes.
            await self._release.wait()

    def _shared(self, mqtt_filter: str) -> str:
        return f"$share/{self.shared_group}/{mqtt_filter}" if self.shared_group else mqtt_filter

    def _set_disconnected(self, reason: str, notify: bool = True) -> None:
        self._client = None
        self._receiving = None
        if self._status is not None:
            self._status.cancel()
        if self._ledger is not None:
            self._ledger.close()  # the broker redelivers what was not acknowledged
            self._ledger = None
        if not self._connected:
            return
        self._connected = False
        self._connected_event.clear()
        metrics.MQTT_CONNECTED.set(0)
        if notify:
            self._pool.broadcast({"type": "mqtt.disconnect", "reason": reason})

    def _connect_event(self) -> dict[str, Any] | None:
        if not self._connected:
            return None
        return {"type": "mqtt.connect", "session_present": self._session_present}

    # --- receive path -------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client, inbox: asyncio.Queue[Any]) -> None:
        """Route every message; raises MqttError when the connection is lost."""
        # `client.messages` creates a task and an asyncio.wait per message to race the queue
        # against disconnection; we use it only to sleep when the inbox is empty and drain
        # with get_nowait() otherwise, so a busy connection pays no task per message.
        # QoS>0 messages are acknowledged when the app says so (`mqtt.ack`, gateway/mqtt/acks.py);
        # one that fails to be delivered is not, so the broker redelivers it after a reconnect.
        messages = client.messages
        paho = client._client
        ledger = self._ledger
        assert ledger is not None
        resolve, refusal = self.router.resolve, self.router.refusal
        pool = self._pool
        deliver = pool.deliver
        rejected = metrics.MESSAGES_REJECTED
        received = metrics.MQTT_MESSAGES_RECEIVED
        status, status_topic = self._status, self.status_topic
        heard = 0  # messages not yet counted: one increment per burst, not per message
        while True:
            if inbox.qsize():
                message = inbox.get_nowait()
            else:  # counted before waiting, so before any instance handles the burst
                if heard:
                    received.inc(heard)
                    heard = 0
                message = await anext(messages)
            heard += 1
            topic = message.topic.value
            if topic == status_topic:  # the gateway's own status: handled here, not routed
                status.heard(client, message)  # type: ignore[union-attr]
                continue
            match = resolve(topic)
            if match is None or (
                match.instance_key not in pool and (reason := refusal(match)) is not None
            ):
                if match is None:  # nothing is allocated for a refused message
                    metrics.MQTT_MESSAGES_DROPPED.labels("no_route").inc()
                    reason = "bad_topic"
                rejected.labels(reason).inc()
                if message.qos:
                    paho.ack(message.mid, message.qos)
                continue
            event = {
                "type": "mqtt.message",
                "topic": topic,
                "payload": message.payload,
                "qos": message.qos,
                "retain": message.retain,
                "properties": properties_to_dict(message.properties),
                "params": match.params,
                "pattern": match.pattern,
            }
            if message.qos:
                event["ack"] = ledger.handle(message.mid, message.qos)
            deliver(match, event, message.qos)

    # --- send path ----------------------------------------------------------------------
    async def _app_send(self, event: Any) -> None:
        """The ASGI `send` of every instance: validate, then ack, publish or (un)subscribe."""
        if type(event) is dict and event.get("type") == "mqtt.ack":
            handle = event.get("ack")
            if type(handle) is AckHandle:  # the hot path: one per QoS>0 message
                handle.ledger.ack(handle)
                return
        event = validate_app_event(event)
        kind = event["type"]
        client = self._client if self._connected else None
        if kind == "mqtt.ack":
            raise InvalidEvent(f"mqtt.ack: {event['ack']!r} is not a handle from this server")
        if kind == "mqtt.publish":
            if client is None:
                raise BrokerUnavailable(f"not connected to {self.broker}")
            props = properties_from_dict(event["properties"]) if self.protocol == "v5" else None
            try:
                await client.publish(
                    event["topic"], event["payload"], event["qos"], event["retain"], props
                )
            except aiomqtt.MqttError as exc:
                raise BrokerUnavailable(f"publish to {event['topic']!r} failed: {exc}") from exc
        elif kind == "mqtt.subscribe":
            self.app_subscriptions[event["topic"]] = event["qos"]
            if client is not None:
                with contextlib.suppress(aiomqtt.MqttError):  # replayed on reconnect anyway
                    await client.subscribe(event["topic"], event["qos"])
        else:
            self.app_subscriptions.pop(event["topic"], None)
            if client is not None:
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.unsubscribe(event["topic"])
