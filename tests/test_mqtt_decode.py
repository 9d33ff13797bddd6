"""The bridge's PUBLISH decoder (gateway/mqtt/tuning.py) says what paho's says, for any packet.

It skips paho's property parser when a v5 PUBLISH carries no properties; everything else,
errors included, must come out exactly as paho decodes it.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mqtt.tuning import _paho_decode_publish, decode_publish, fast_publish_decoding

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


def _outcome(decode, header: int, packet: bytes, protocol: int):
    """The decoded fields (properties as their JSON form), or the exception type raised."""
    try:
        result = decode(header, bytearray(packet), protocol)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return type(exc)
    props = result.properties.json() if result.properties is not None else None
    return (*result._replace(properties=None), props)


def _publish(topic: bytes, qos: int, props: bytes | None, payload: bytes) -> bytes:
    mid = struct.pack("!H", 7) if qos else b""
    return struct.pack("!H", len(topic)) + topic + mid + (props or b"") + payload


def _user_property(key: str, value: str) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [(key, value)]
    return props.pack()


@pytest.mark.parametrize("protocol", [V5, V311])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("payload", [b"", b'{"n": 1, "temperature": 21.5}'])
def test_well_formed_publish_decodes_as_paho_does(protocol, qos, payload):
    props = b"\x00" if protocol == V5 else None
    packet = _publish(b"devices/d1/telemetry", qos, props, payload)
    header = 0x30 | (qos << 1) | 0x09  # dup and retain set
    fast = _outcome(decode_publish, header, packet, protocol)
    assert fast == _outcome(_paho_decode_publish, header, packet, protocol)
    assert fast[-2] == payload and type(fast[-2]) is bytes and type(fast[3]) is bytes


def test_v5_properties_are_still_parsed():
    packet = _publish(b"devices/d1/telemetry", 1, _user_property("gateway-mirror", "ab"), b"1")
    result = decode_publish(0x32, bytearray(packet), V5)
    assert result.properties.UserProperty == [("gateway-mirror", "ab")]
    assert result.payload == b"1"


@given(
    header=st.integers(0x30, 0x3F),
    packet=st.binary(max_size=40),
    protocol=st.sampled_from([V5, V311]),
)
def test_any_packet_decodes_or_fails_as_paho_does(header, packet, protocol):
    fast = _outcome(decode_publish, header, packet, protocol)
    assert fast == _outcome(_paho_decode_publish, header, packet, protocol)


def test_installed_for_paho_clients():
    fast_publish_decoding()
    assert _packet.decode_publish is decode_publish
