"""Opening a port: the native asyncio transport where there is a file descriptor, else a thread.

`/dev/tty*`, by-id symlinks and ptys get `serial_asyncio_fast.SerialTransport` (the event loop
watches the fd; no thread per port). `socket://` becomes a plain asyncio socket connection.
URL handlers without a pollable fd (`loop://`, `rfc2217://`) get `ThreadTransport`: one reader
thread per port handing each read to the loop with `call_soon_threadsafe`, writes serialised on
one writer thread. Both present the same asyncio Transport/Protocol interface to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import serial
import serial_asyncio_fast
from serial.serialposix import Serial as PosixSerial

from gateway.serial.spec import SerialSpec

READ_SIZE = 4096
#: Reader threads wake this often to notice a close on handlers that cannot cancel a read.
THREAD_READ_TIMEOUT = 0.2
WRITE_HIGH_WATER = 64 * 1024


class ThreadTransport(asyncio.Transport):
    """pyserial in a reader thread with a clean hand-off to the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, ser: Any
    ) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._serial = ser
        self._closing = False
        self._lost = False
        self._resume = threading.Event()
        self._resume.set()
        self._pending_write = 0
        self._writing_paused = False
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"serial[{ser.port}].write")
        ser.timeout = THREAD_READ_TIMEOUT
        self._reader = threading.Thread(
            target=self._read_loop, name=f"serial[{ser.port}].read", daemon=True
        )
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._reader.start)

    def _read_loop(self) -> None:
        ser, loop = self._serial, self._loop
        while not self._closing:
            self._resume.wait()
            if self._closing:
                break
            try:
                data = ser.read(max(1, min(ser.in_waiting, READ_SIZE)))
            except Exception as exc:  # SerialException, OSError: the port is gone
                with contextlib.suppress(RuntimeError):  # loop already closed
                    loop.call_soon_threadsafe(self._connection_lost, exc)
                return
            if data and not self._closing:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._data, data)

    def _data(self, data: bytes) -> None:
        if not self._closing:
            self._protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for the writer thread (order kept); pauses the protocol past 64 KiB."""
        if self._closing:
            return
        data = bytes(data)
        self._pending_write += len(data)
        self._writer.submit(self._write_blocking, data)
        if self._pending_write > WRITE_HIGH_WATER and not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _write_blocking(self, data: bytes) -> None:
        try:
            self._serial.write(data)
        except Exception as exc:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._connection_lost, exc)
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._written, len(data))

    def _written(self, size: int) -> None:
        self._pending_write -= size
        if self._writing_paused and self._pending_write <= WRITE_HIGH_WATER // 4:
            self._writing_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self._pending_write

    def pause_reading(self) -> None:
        self._resume.clear()

    def resume_reading(self) -> None:
        self._resume.set()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading, let queued writes finish, close the port, then `connection_lost(None)`."""
        if not self._closing:
            self._connection_lost(None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._serial if name == "serial" else default

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._resume.set()
        asyncio.ensure_future(self._finish(exc), loop=self._loop)

    async def _finish(self, exc: BaseException | None) -> None:
        def stop() -> None:
            self._writer.shutdown(wait=True, cancel_futures=exc is not None)
            if hasattr(self._serial, "cancel_read"):
                with contextlib.suppress(Exception):
                    self._serial.cancel_read()
            self._reader.join(timeout=2 * THREAD_READ_TIMEOUT + 1)
            with contextlib.suppress(Exception):
                self._serial.close()

        await self._loop.run_in_executor(None, stop)
        self._protocol.connection_lost(exc)  # type: ignore[arg-type]


async def open_port(
    spec: SerialSpec, protocol_factory: Any
) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    """Open the port of `spec` (blocking parts in the executor) and wire `protocol_factory` to it.

    Raises `serial.SerialException` / `OSError` when the port is absent or refuses to open.
    """
    loop = asyncio.get_running_loop()
    kwargs = {"baudrate": spec.baudrate, **spec.serial_kwargs}
    if spec.url.startswith("socket://") and spec.io != "thread":
        transport, protocol = await serial_asyncio_fast.create_serial_connection(
            loop, protocol_factory, spec.url, **kwargs
        )
        return transport, protocol
    ser = await loop.run_in_executor(None, partial(serial.serial_for_url, spec.url, **kwargs))
    native = isinstance(ser, PosixSerial) and spec.io != "thread"
    if spec.io == "async" and not native:
        ser.close()
        raise serial.SerialException(f"{spec.url}: io=async needs a port with a file descriptor")
    protocol = protocol_factory()
    if native:
        transport: asyncio.BaseTransport = serial_asyncio_fast.SerialTransport(loop, protocol, ser)
        transport._max_read_size = READ_SIZE  # type: ignore[attr-defined]  # default 1024
    else:
        transport = ThreadTransport(loop, protocol, ser)
    return transport, protocol
