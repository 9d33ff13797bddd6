"""Frames read from a port in one chunk are distinct readings: each gets its own `ts`, at least
a microsecond after the previous frame of the port, even across a replug (a reading is stored
once per device, metric and ts; a burst sharing one ts lost all but its first line)."""

from __future__ import annotations

import time

import pytest

from tests.test_serial_server import Pty, Recorder, serving

BURST = 200


@pytest.fixture
def pty(tmp_path):
    device = Pty(str(tmp_path / "ttyBURST"))
    yield device
    device.close()


def micros(event: dict) -> int:
    return round(event["ts"] * 1e6)


async def test_a_burst_read_in_one_chunk_gets_increasing_microseconds(pty):
    app = Recorder()
    async with serving(app, f"{pty.path}?device=dev-1") as server:
        assert (await app.next())["type"] == "serial.connect"
        before = time.time()
        await pty.write(b"".join(b"n=%d\n" % i for i in range(BURST)))  # one write, one read
        events = [await app.next("serial.frame") for _ in range(BURST)]
        assert [e["bytes"] for e in events] == [b"n=%d" % i for i in range(BURST)]
        stamps = [micros(e) for e in events]
        assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False)), stamps
        assert before - 1 <= events[0]["ts"] <= time.time() + 1  # the clock, not a counter

        # The stamps belong to the port, not to one open session: a replug goes on after them.
        (port,) = server.ports
        assert round(port.frame_ts() * 1e6) > stamps[-1]
