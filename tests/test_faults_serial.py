"""Faults on a serial port of the real gateway: unplugged and replugged under load, and flooded.

The device end of each port is a pty master held by the test behind a stable symlink (as
`/dev/serial/by-id/` names are), written like a UART: `PlugPort` from tests/test_serial_e2e.py.
The plain unplug/replug story (offline/online, a held command) is in tests/test_serial_e2e.py;
the framer's bounds are unit-tested in tests/test_serial_server.py and test_serial_framing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import psutil
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.waiting import until
from tests.test_serial_e2e import PlugPort, metrics_of, rejected, serial_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = secrets.token_urlsafe(12)
DEVICE = "serial-fault-1"
EVERY = 0.005  # 200 lines/s
CYCLES = 3
FLOOD_BYTES = 8 * 1024 * 1024


def stored_counters(gw: GatewayProcess, cookie: str) -> list[int]:
    return [int(v) for _, v in gw.history(cookie, DEVICE, "n")]


@contextlib.contextmanager
def plugged_gateway(broker_url: str, link: Path) -> Iterator[tuple[PlugPort, GatewayProcess, str]]:
    """A plugged port at `link`, a serial gateway on it, a logged-in cookie; unplugged after."""
    port = PlugPort(link)
    port.plug()
    try:
        with serial_gateway(broker_url, f"{link}?device={DEVICE}") as gw:
            gw.create_user("operator", PASSWORD, staff=True)
            cookie = gw.login("operator", PASSWORD)
            gw.wait_for_log(rf"serial port {re.escape(str(link))} opened")
            yield port, gw, cookie
    finally:
        port.unplug()


async def stream(port: PlugPort, start: int, seconds: float) -> list[int]:
    """Write `n=<k>` lines at 200/s for `seconds`; the counters the tty accepted in full."""
    accepted = []
    n = start
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        assert port.device is not None
        if await port.device.write(f"n={n}\n".encode(), patience=1.0):
            accepted.append(n)
        n += 1
        await asyncio.sleep(EVERY)
    return accepted


async def test_unplug_and_replug_under_load_resumes_each_time(mosquitto, tmp_path):
    link = tmp_path / "by-id" / "usb-sim-fast-if00"
    link.parent.mkdir()
    with plugged_gateway(mosquitto.url, link) as (port, gw, cookie):
        cycles: list[list[int]] = []  # per plugged period, the lines the tty accepted
        for cycle in range(CYCLES):
            cycles.append(await stream(port, cycle * 10_000, 1.5))
            port.unplug()  # mid-stream: whatever sat in the tty buffer is gone with it
            await asyncio.sleep(0.5)
            port.plug()
        cycles.append(await stream(port, CYCLES * 10_000, 1.5))
        written = [n for lines in cycles for n in lines]

        await until(
            lambda: cycles[-1][-1] in stored_counters(gw, cookie),
            wait=20,
            what="the last line stored",
        )
        stored = stored_counters(gw, cookie)
        assert len(stored) == len(set(stored)), "a line stored twice"
        assert set(stored) <= set(written), "a reading nobody wrote"
        # After each (re)plug, once the port is reopened, no line is lost until the next
        # unplug: what is stored of a plugged period is every line written between its first
        # and last stored one, and after the last replug everything up to the end.
        for cycle, lines in enumerate(cycles):
            kept = sorted(n for n in stored if lines[0] <= n <= lines[-1])
            assert kept, f"nothing stored from plugged period {cycle}: the replug was missed"
            end = lines[-1] if cycle == CYCLES else kept[-1]
            expected = [n for n in lines if kept[0] <= n <= end]
            assert kept == expected, (
                f"a gap in plugged period {cycle}: {sorted(set(expected) - set(kept))[:10]}"
            )
        reopened = len(re.findall(rf"serial port {re.escape(str(link))} reopened", gw.log_text()))
        assert reopened == CYCLES
        lost = len(written) - len(stored)
        print(
            f"\n{CYCLES} unplug/replug cycles at 200 lines/s: {len(written)} lines written, "
            f"{len(stored)} stored, {lost} lost with the unplugged tty buffers"
        )


async def test_a_port_flooding_bytes_without_a_delimiter(mosquitto, tmp_path):
    """Bounded memory, frame_too_long counted, the gateway answers meanwhile, then the next
    good line after a delimiter arrives."""
    link = tmp_path / "uart-flood"
    with plugged_gateway(mosquitto.url, link) as (port, gw, cookie):
        process = psutil.Process(gw.proc.pid)
        before = metrics_of(gw)
        rss_before = process.memory_info().rss
        rss_max = rss_before

        async with (
            gw.ws_connect(cookie) as ws,
            aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="flood-bystander") as mqtt,
        ):
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"
            chunk = b"A" * 65536
            for i in range(FLOOD_BYTES // len(chunk)):
                await port.send(chunk)
                if i % 16 == 0:
                    rss_max = max(rss_max, process.memory_info().rss)
                    # Meanwhile the gateway answers and an MQTT device still gets through.
                    status, _ = await asyncio.to_thread(gw.http_get, "/healthz")
                    assert status == 200
                    body = json.dumps({"i": i})
                    await mqtt.publish("devices/flood-bystander/telemetry", body, qos=1)
            await port.send(b"\ntemperature=21.5\n")

            async with asyncio.timeout(15):
                while True:
                    frame = json.loads(await ws.recv())
                    if frame.get("type") == "telemetry" and frame.get("device") == DEVICE:
                        break
            assert frame["metrics"] == {"temperature": 21.5}
        after = metrics_of(gw)
        growth = rss_max - rss_before
        # One over-long frame, however many bytes: counted once.
        assert rejected(after, "frame_too_long") == rejected(before, "frame_too_long") + 1
        sent = [i for i in range(FLOOD_BYTES // len(chunk)) if i % 16 == 0]
        await until(
            lambda: sorted(int(v) for _, v in gw.history(cookie, "flood-bystander", "i")) == sent,
            what="every reading of the MQTT bystander stored",
        )
        # The framer keeps at most max_frame plus one read: far below the 8 MB flood.
        assert growth < FLOOD_BYTES, f"RSS grew {growth / 1e6:.1f} MB during the flood"
        print(
            f"\n{FLOOD_BYTES / 1e6:.0f} MB without a delimiter: frame_too_long "
            f"+{rejected(after, 'frame_too_long') - rejected(before, 'frame_too_long'):.0f}, "
            f"RSS growth {growth / 1e6:.1f} MB, the next good line arrived"
        )
