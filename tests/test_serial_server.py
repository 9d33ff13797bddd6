"""SerialServer on real pseudo-terminals (the test writes/reads the master end), no mocks."""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from firmware_sim.serial_device import open_pty
from gateway.metrics import CONSUMER_ERRORS, MESSAGES_REJECTED, SERIAL_FRAMES
from gateway.serial.server import SerialServer
from tests.support.timing import allowance
from tests.support.waiting import eventually


class Pty:
    """The device end of a pseudo-terminal (optionally behind a symlink, like by-id names)."""

    def __init__(self, link: str | None = None) -> None:
        self.master, self.slave, self.path = open_pty(link)
        self.link = link

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.005)  # the gateway has not drained the tty buffer yet

    async def read_until(self, end: bytes = b"\n", timeout: float = 5.0) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(end):
            assert time.monotonic() < deadline, f"nothing ending with {end!r} in {buf!r}"
            try:
                buf += os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                await asyncio.sleep(0.01)
        return buf

    def close(self) -> None:
        """Unplug: the device end goes away, and the by-id symlink with it."""
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.link:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.link)


class Recorder:
    """A `serial` app recording every event; optional behaviours keyed by frame content."""

    def __init__(self, slow: float = 0.0) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.scopes: list[dict[str, Any]] = []
        self.slow = slow

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        while True:
            event = await receive()
            await self.events.put(event)
            if event["type"] == "serial.disconnect":
                return
            data = event.get("bytes", b"")
            if data == b"boom":
                raise RuntimeError("consumer bug")
            if data.startswith(b"echo "):
                await send({"type": "serial.write", "bytes": data[5:] + b"\n"})
            if data == b"close":
                await send({"type": "serial.close", "reopen": False})
            if data == b"close-reopen":
                await send({"type": "serial.close"})
            if self.slow:
                await asyncio.sleep(self.slow)

    async def next(self, kind: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """The next event (skipping other types when `kind` is given)."""
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if kind is None or event["type"] == kind:
                return event

    async def frames(self, n: int, timeout: float = 5.0) -> list[bytes]:
        return [(await self.next("serial.frame", timeout))["bytes"] for _ in range(n)]


@contextlib.asynccontextmanager
async def serving(app: Any, *specs: str, **kwargs: Any) -> AsyncIterator[SerialServer]:
    server = SerialServer(app, list(specs), **kwargs)
    task = asyncio.create_task(server.serve())
    try:
        yield server
    finally:
        await server.shutdown(3.0)
        await asyncio.wait_for(task, 5.0)


@pytest.fixture
def pty(tmp_path):
    device = Pty(str(tmp_path / "ttyTEST"))
    yield device
    device.close()


def counter(metric: Any, **labels: str) -> float:
    return metric.labels(**labels)._value.get()


async def test_delimiter_frames_scope_and_metric(pty):
    app = Recorder()
    before = counter(SERIAL_FRAMES, port=pty.path)
    async with serving(app, f"{pty.path}?baudrate=9600&device=dev-1") as server:
        assert (await app.next())["type"] == "serial.connect"
        assert server.connected and server.status() == {pty.path: True}
        await pty.write(b"t=1\nt=2\n\nt=")
        await pty.write(b"3\n")
        assert await app.frames(3) == [b"t=1", b"t=2", b"t=3"]
    scope = app.scopes[0]
    assert scope["type"] == "serial" and scope["port"] == pty.path
    assert scope["baudrate"] == 9600 and scope["device"] == "dev-1"
    assert scope["framing"]["mode"] == "delimiter" and scope["framing"]["delimiter"] == b"\n"
    assert counter(SERIAL_FRAMES, port=pty.path) - before == 3
    assert (await app.next())["reason"] == "shutdown"


async def test_hex_delimiter_fixed_and_idle_framing(tmp_path):
    a, b, c = (Pty(str(tmp_path / n)) for n in ("a", "b", "c"))
    apps = [Recorder() for _ in range(3)]
    try:
        async with (
            serving(apps[0], f"{a.path}?delimiter=hex:0d0a"),
            serving(apps[1], f"{b.path}?length=4"),
            serving(apps[2], f"{c.path}?idle_ms=50"),
        ):
            for app in apps:
                await app.next("serial.connect")
            await a.write(b"x=1\r\ny\n=2\r\n")
            assert await apps[0].frames(2) == [b"x=1", b"y\n=2"]
            await b.write(b"ABCDEFGH12")
            assert await apps[1].frames(2) == [b"ABCD", b"EFGH"]
            await c.write(b"\x01\x02")
            await c.write(b"\x03")
            assert await apps[2].frames(1) == [b"\x01\x02\x03"]
            await asyncio.sleep(0.2)
            await c.write(b"\x04")
            assert await apps[2].frames(1) == [b"\x04"]
    finally:
        for p in (a, b, c):
            p.close()


async def test_noise_and_100kb_line_do_not_stop_the_next_good_frame(pty):
    app = Recorder()
    before = counter(MESSAGES_REJECTED, reason="frame_too_long")
    async with serving(app, pty.path):
        await app.next("serial.connect")
        await pty.write(b"\x00\xff garbage \xfe\n" + b"x" * 100_000 + b"\n" + b"good=1\n")
        assert await app.frames(2) == [b"\x00\xff garbage \xfe", b"good=1"]
    assert counter(MESSAGES_REJECTED, reason="frame_too_long") - before == 1


async def test_app_writes_to_port(pty):
    app = Recorder()
    async with serving(app, pty.path):
        await app.next("serial.connect")
        await pty.write(b'echo {"id": "1", "ok": true}\n')
        assert await pty.read_until() == b'{"id": "1", "ok": true}\n'


async def test_crashed_instance_is_logged_counted_and_replaced(pty, caplog):
    app = Recorder()
    before = counter(CONSUMER_ERRORS, protocol="serial")
    async with serving(app, pty.path) as server:
        await app.next("serial.connect")
        await pty.write(b"boom\nafter=1\nafter=2\n")
        assert await app.frames(1) == [b"boom"]
        assert (await app.next())["type"] == "serial.connect"  # the replacement
        assert await app.frames(2) == [b"after=1", b"after=2"]  # nothing lost behind it
        assert server.ports[0].is_open
    assert counter(CONSUMER_ERRORS, protocol="serial") - before == 1
    crash = [r for r in caplog.records if "instance crashed" in r.getMessage()]
    assert crash and crash[0].exc_info and "consumer bug" in str(crash[0].exc_info[1])


async def test_serial_close_from_app_closes_the_port(pty, tmp_path):
    app, sentinel_app = Recorder(), Recorder()
    other = Pty(str(tmp_path / "ttySENTINEL"))
    try:
        async with serving(app, pty.path) as server, serving(sentinel_app, other.path):
            await app.next("serial.connect")
            await sentinel_app.next("serial.connect")
            await pty.write(b"close\n")
            event = await app.next("serial.disconnect")
            assert event["reason"] == "closed"
            assert not server.ports[0].is_open and not server.connected
            # Sentinel: a port closed after it with reopen is opened again the reopen delay
            # later; had this one been told to reopen, it would be open again by then.
            await other.write(b"close-reopen\n")
            assert (await sentinel_app.next("serial.disconnect"))["reason"] == "closed"
            await sentinel_app.next("serial.connect", timeout=10)
            assert server.ports[0].opened == 1 and not server.ports[0].is_open
    finally:
        other.close()


async def test_serial_close_with_reopen(pty):
    app = Recorder()
    async with serving(app, pty.path) as server:
        await app.next("serial.connect")
        await pty.write(b"close-reopen\n")
        assert (await app.next("serial.disconnect"))["reason"] == "closed"
        await app.next("serial.connect", timeout=5)
        assert server.ports[0].opened == 2


async def test_unplug_then_replug_at_same_path_resumes(tmp_path, caplog):
    caplog.set_level(logging.INFO, "gateway.serial")
    link = str(tmp_path / "by-id-sensor")
    device = Pty(link)
    app = Recorder()
    async with serving(app, link) as server:
        await app.next("serial.connect")
        await device.write(b"n=1\n")
        assert await app.frames(1) == [b"n=1"]
        device.close()  # unplug: pty gone, symlink removed
        event = await app.next("serial.disconnect")
        assert event["reason"] == "lost" and event["error"]
        await asyncio.sleep(1.2)  # absent for a while: the backoff steps grow (0.8 s by now)
        assert not server.connected
        device = Pty(link)  # replug: the same path now points to a new pty
        replugged = time.monotonic()
        await app.next("serial.connect", timeout=5)
        await device.write(b"n=2\n")
        assert await app.frames(1) == [b"n=2"]
        latency = time.monotonic() - replugged
        print(f"\nserial replug → first frame: {latency:.3f} s")
        assert latency < allowance(2.0)  # a backoff step (≤ 1 s) + reopen, stretched under load
    device.close()
    assert any("lost" in r.getMessage() for r in caplog.records)
    assert any("reopened" in r.getMessage() for r in caplog.records)


async def test_port_absent_at_start_is_retried(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, "gateway.serial")
    link = str(tmp_path / "later")
    app = Recorder()
    async with serving(app, link) as server:
        # Sentinel: a second attempt (logged at DEBUG) failed too; nothing connected before it.
        await eventually(
            lambda: any("still unavailable" in r.getMessage() for r in caplog.records),
            what="the absent port tried again",
        )
        assert not server.connected
        assert app.events.empty() and app.scopes == []  # no instance, no serial.connect
        device = Pty(link)
        try:
            await app.next("serial.connect", timeout=5)
            await device.write(b"hello\n")
            assert await app.frames(1) == [b"hello"]
        finally:
            device.close()
    lines = [r.getMessage() for r in caplog.records if "not available" in r.getMessage()]
    assert len(lines) == 1 and link in lines[0] and "retrying" in lines[0]


async def test_thread_io_on_pty_and_loop_url():
    app = Recorder()
    device = Pty()
    try:
        async with serving(app, f"{device.path}?io=thread", "loop://?delimiter=;"):
            await app.next("serial.connect")
            await app.next("serial.connect")
            await device.write(b"a=1\n")
            assert await app.frames(1) == [b"a=1"]
            loop_scope = next(s for s in app.scopes if s["port"] == "loop://")
            assert loop_scope["framing"]["delimiter"] == b";"
    finally:
        device.close()


async def test_loop_url_echo_through_thread_transport():
    class Echo:
        def __init__(self) -> None:
            self.frames: asyncio.Queue[bytes] = asyncio.Queue()

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            while True:
                event = await receive()
                if event["type"] == "serial.connect":
                    await send({"type": "serial.write", "bytes": b"x=1;x=2;"})
                elif event["type"] == "serial.frame":
                    await self.frames.put(event["bytes"])
                else:
                    return

    app = Echo()
    async with serving(app, "loop://?delimiter=;"):
        got = [await asyncio.wait_for(app.frames.get(), 5) for _ in range(2)]
    assert got == [b"x=1", b"x=2"]


async def test_slow_app_gets_every_frame_in_order(pty):
    app = Recorder(slow=0.002)
    async with serving(app, pty.path, queue_size=4) as server:
        await app.next("serial.connect")
        await pty.write(b"".join(b"n=%d\n" % i for i in range(300)))
        frames = await app.frames(300, timeout=10)
        assert frames == [b"n=%d" % i for i in range(300)]
        assert not server.ports[0].session.reading_paused
