"""Measure the two serial I/O approaches on a pty: `python -m gateway.serial.bench [lines]`.

Writes N telemetry-sized lines into a pseudo-terminal as fast as the tty accepts them and
times how long the server takes to deliver every frame to a counting application, with the
native asyncio transport (`io=async`) and with pyserial in a reader thread (`io=thread`).
Reports frames/s and CPU seconds per 100k frames (process time, all threads).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

from gateway.serial.server import SerialServer

LINE = b'{"temperature": 21.53, "humidity": 40.1, "ts": 1764214000.5}\n'


async def _writer(fd: int, count: int, chunk_lines: int = 64) -> None:
    chunk = LINE * chunk_lines
    sent = 0
    while sent < count:
        view = memoryview(chunk)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await asyncio.sleep(0)  # yield to the reader; a busy writer models a fast device
        sent += chunk_lines


async def measure(io: str, count: int) -> tuple[float, float, float]:
    """(frames/s, CPU s per 100k frames, mean latency ms of single lines at idle) for `io`."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    got, measuring = 0, False
    done = asyncio.Event()
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        nonlocal got, measuring
        while True:
            event = await receive()
            if event["type"] == "serial.frame":
                got += 1
                if got >= count:
                    done.set()
                if measuring:
                    arrived.put_nowait(time.perf_counter())
            elif event["type"] == "serial.disconnect":
                return

    server = SerialServer(app, [f"{path}?io={io}"], queue_size=1024)
    task = asyncio.create_task(server.serve())
    while not server.connected:  # noqa: ASYNC110 (a dev tool)
        await asyncio.sleep(0.01)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await _writer(master, count)
    await asyncio.wait_for(done.wait(), 120)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await asyncio.sleep(0.2)  # let the rounding-up tail of the burst arrive
    measuring = True
    latencies = []
    for _ in range(50):
        start = time.perf_counter()
        os.write(master, LINE)
        latencies.append(await asyncio.wait_for(arrived.get(), 5) - start)
        await asyncio.sleep(0.005)
    await server.shutdown(2)
    await task
    os.close(master)
    os.close(slave)
    return count / wall, cpu / count * 100_000, sum(latencies) / len(latencies) * 1000


def main() -> None:
    """Run both approaches and print one line each."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    django.setup()
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    for io in ("async", "thread", "async", "thread"):
        rate, cpu, lat = asyncio.run(measure(io, count))
        print(
            f"io={io:6s} {rate:10.0f} frames/s  {cpu:5.2f} CPU s/100k frames  "
            f"{lat:6.3f} ms idle latency  ({threading.active_count()} threads)"
        )


if __name__ == "__main__":
    main()
