"""One bus's pymodbus client: RTU over a serial port or Modbus TCP, with CRC errors reported.

pymodbus discards an RTU frame whose CRC is wrong and lets the request time out; the framer
here also tells the bus, so a garbled answer is counted as ``crc_error`` rather than a silent
timeout. The client never reconnects by itself: the bus decides when (gateway/modbus/server.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU

from gateway.modbus.config import BusConfig

# pymodbus logs every unanswered request at ERROR; the bus counts and logs them itself.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

#: Never let pymodbus close a TCP connection because one unit stopped answering.
NO_DISCONNECT = 1 << 30


class CrcCountingFramer(FramerRTU):
    """The RTU framer, calling `on_crc_error` for every frame discarded by its CRC check."""

    def __init__(self, decoder: DecodePDU, on_crc_error: Callable[[], None]) -> None:
        super().__init__(decoder)
        self.on_crc_error = on_crc_error

    def decode(self, data: bytes) -> tuple[int, int, int, bytes]:
        """FramerRTU.decode; its only "consumed bytes but no frame" answer is a bad CRC."""
        used, dev_id, tid, frame = super().decode(data)
        if used and not frame:
            self.on_crc_error()
        return used, dev_id, tid, frame


def make_client(
    bus: BusConfig,
    on_crc_error: Callable[[], None],
    on_connection: Callable[[bool], None],
) -> AsyncModbusSerialClient | AsyncModbusTcpClient:
    """A client for `bus`: one try per request (the bus counts failures), no auto-reconnect."""
    common = {
        "timeout": bus.timeout,
        "retries": 0,
        "reconnect_delay": 0,
        "name": f"modbus[{bus.port}]",
        "trace_connect": on_connection,
    }
    tcp = bus.tcp
    if tcp is not None:
        client: AsyncModbusSerialClient | AsyncModbusTcpClient = AsyncModbusTcpClient(
            tcp[0], port=tcp[1], **common
        )
    else:
        client = AsyncModbusSerialClient(
            bus.port,
            baudrate=bus.baudrate,
            parity=bus.parity,
            stopbits=bus.stopbits,
            bytesize=bus.bytesize,
            **common,
        )
        client.ctx.framer = CrcCountingFramer(DecodePDU(False), on_crc_error)
    client.set_max_no_responses(NO_DISCONNECT)
    return client
