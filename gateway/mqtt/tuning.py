"""How the MQTT server adapts aiomqtt and paho for throughput (each measured, see
docs/performance.md): a bounded inbox with our drop policy, bursts of packets per socket read,
paho `Properties` lookup tables shared instead of rebuilt per message, and PUBLISH packets
without MQTT v5 properties decoded without paho's property parser.

These reach into paho/aiomqtt internals (`_sock`, `_packet_read`, `_loop_rc_handle`,
`Properties.__init__`, `_packet.decode_publish`); re-check them when either is upgraded
(pinned in requirements.txt).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
from paho.mqtt import _packet
from paho.mqtt.client import MQTTErrorCode
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics
from gateway.mqtt.instances import InstancePool

# Packets read per "socket readable" event at most (bounds one loop turn's work).
READ_BURST = 64


def inbox_type(limit: int, holder: list[asyncio.Queue[Any]]) -> type[asyncio.Queue[Any]]:
    """aiomqtt's incoming-message queue, bounded our way and visible to the receive loop.

    QoS 0 messages past `limit` are dropped and counted (reason `inbox_full`). QoS≥1 messages are
    always kept: we acknowledge them only once the app has (`mqtt.ack`), so the broker never has
    more than Receive Maximum (v5) / its max_inflight_messages (v3.1.1) of them outstanding to us.
    """

    class Inbox(asyncio.Queue):  # type: ignore[type-arg]
        def __init__(self, maxsize: int = 0) -> None:
            super().__init__()
            holder.append(self)

        def put_nowait(self, item: aiomqtt.Message) -> None:
            if item.qos == 0 and self.qsize() >= limit:
                metrics.MQTT_MESSAGES_DROPPED.labels("inbox_full").inc()
                return
            super().put_nowait(item)

    return Inbox


# Bytes one socket read asks the kernel for (`SocketReader`).
READ_CHUNK = 65536


class SocketReader:
    """paho's `_sock_recv`, reading the socket `READ_CHUNK` bytes at a time.

    paho reads a packet with three `recv` calls (its type byte, its length byte by byte, the
    rest): three system calls per message, 12 % of the event loop's time under load
    (docs/performance.md). This hands paho the same bytes from one large read.
    Bytes held here do not make the socket readable, so `read_burst` schedules `resume`
    (the server's read callback) for the next loop turn while any are left.
    """

    __slots__ = ("recv", "data", "pos", "resume", "scheduled", "loop")

    def __init__(self, recv: Any, resume: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.recv = recv  # paho's own `_sock_recv`: its errors (TLS, closed socket) as paho's
        self.resume = resume
        self.loop = loop
        self.data = b""
        self.pos = 0
        self.scheduled = False

    def __call__(self, bufsize: int) -> bytes:
        data, pos = self.data, self.pos
        if pos >= len(data):
            data = self.recv(READ_CHUNK)
            if len(data) <= bufsize:  # all of it wanted (b"": the connection closed)
                return data
            pos = 0
        end = pos + bufsize
        if end >= len(data):
            self.data, self.pos = b"", 0
        else:
            self.data, self.pos = data, end
        return data[pos:end]

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not yet handed to paho."""
        return len(self.data) - self.pos

    def resume_later(self) -> None:
        """Read the held bytes on the next loop turn (once, however often asked)."""
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self.scheduled = False
        self.resume()


def read_burst(
    paho: Any, pool: InstancePool, reader: SocketReader | None = None, max_packets: int = 1
) -> Any:
    """paho's loop_read, reading up to READ_BURST packets while the socket has data.

    Profiled (docs/performance.md): one packet per loop turn made every message pay a loop
    turn, a group_send and a WebSocket frame; a burst lets the pipeline batch them. The burst
    ends as soon as an instance's queue passes its high-water mark (checked after every
    packet, so one burst cannot overshoot it), and then one packet per turn as paho does, so
    busy instances catch up instead of overflowing (QoS 0 drops). Packets `reader` holds past
    the burst are read on the next turn.
    """
    for _ in range(READ_BURST):
        if paho._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        rc = paho._packet_read()
        if rc > 0:
            return paho._loop_rc_handle(rc)
        if rc == MQTTErrorCode.MQTT_ERR_AGAIN or pool.pressured:
            break  # a queue passed its high-water mark: the rest waits for the next turn
    if reader is not None and reader.buffered:
        reader.resume_later()
    return MQTTErrorCode.MQTT_ERR_SUCCESS


class NoTopicCallbacks:
    """Stands in for paho's per-topic callback matcher, which the bridge never uses.

    paho looks every received topic up in its `message_callback_add` matcher even when that
    is empty: a `topic.split("/")` held by a self-referencing closure, a reference cycle per
    message that only the cyclic GC frees. With the GC's young generation raised
    (`tune_gc`) thousands of them wait for a collection: 5,000 publishes to 60 kB topics grew
    a gateway's RSS by 190 MiB. Every message goes to `on_message` instead.
    """

    __slots__ = ()

    def iter_match(self, topic: str) -> tuple[()]:
        return ()


def share_property_tables() -> None:
    """Make paho's `Properties()` share its lookup tables instead of rebuilding them.

    paho 2.2 builds three tables (27 entries, a `list.index` each) in every `Properties`, and
    decodes one for each MQTT v5 PUBLISH received: 17 % of the gateway's CPU under load
    (docs/performance.md, profile finding 3). They are only ever read, so one copy is shared.
    """
    if getattr(Properties, "_gateway_shared_tables", False):
        return
    template = Properties(PacketTypes.PUBLISH)
    tables = (template.types, template.names, template.properties)

    def __init__(self: Properties, packetType: int) -> None:
        # Straight into __dict__: paho's __setattr__ builds a list per call to check a name.
        self.__dict__.update(
            packetType=packetType, types=tables[0], names=tables[1], properties=tables[2]
        )

    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties._gateway_shared_tables = True  # type: ignore[attr-defined]


_paho_decode_publish = _packet.decode_publish


def decode_publish(header: int, packet: bytearray, protocol: int) -> _packet.PublishPacket:
    """paho's `decode_publish`, without its property parser when a v5 PUBLISH has none.

    paho parses the properties of every v5 PUBLISH, even an empty set: a `Properties.clear()`
    of 27 `hasattr` calls and two buffer copies, 8 µs of the 10 µs it spends per message
    (docs/performance.md). Most devices send no properties, so a zero property
    length gets an empty `Properties` at once; anything else (properties present, a short or
    malformed packet) goes to paho's own decoder, errors included.
    """
    qos = (header & 0x06) >> 1
    size = len(packet)
    if size < 2:
        return _paho_decode_publish(header, packet, protocol)
    start = 2 + ((packet[0] << 8) | packet[1])  # after the topic
    pos = start + 2 if qos else start  # after the packet id
    properties = None
    if protocol == MQTTProtocolVersion.MQTTv5:
        if size <= pos or packet[pos]:
            return _paho_decode_publish(header, packet, protocol)
        properties = Properties(PacketTypes.PUBLISH)
        pos += 1
    elif start == 2 or size < pos:  # 3.1.1 forbids an empty topic: paho says so
        return _paho_decode_publish(header, packet, protocol)
    return _packet.PublishPacket(
        dup=bool(header & 0x08),
        qos=qos,
        retain=bool(header & 0x01),
        topic=bytes(packet[2:start]),
        mid=(packet[start] << 8) | packet[start + 1] if qos else 0,
        properties=properties,
        payload=bytes(packet[pos:]),
    )


def fast_publish_decoding() -> None:
    """Install `decode_publish` for every paho client of this process (idempotent).

    Needs the shared `Properties` tables (`share_property_tables`), which it installs too:
    an empty `Properties` must cost no more than the parser it replaces.
    """
    share_property_tables()
    _packet.decode_publish = decode_publish  # type: ignore[assignment]
