"""`SerialServer`: the interface server of the `serial` protocol (docs/asgi-serial.md).

One `PortRunner` per configured port: open (retrying with backoff while the port is absent),
run one application instance per open session with the port's scope, feed it frames, and on
loss tell it `serial.disconnect` and reopen. An instance that crashes while its port is open is
logged with its traceback, counted in `gateway_consumer_errors_total{protocol="serial"}` and
replaced; frames it had not read yet go to the replacement.

Inbound flow control: each session's inbox holds at most `queue_size` events; past that the
server stops reading the port (`pause_reading`) until the instance has drained half of it, so
the kernel's tty buffer and the device's own flow control take the pressure. Nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from gateway.metrics import CONSUMER_ERRORS, MESSAGES_REJECTED, SERIAL_FRAMES
from gateway.serial.events import ASGI, validate_app_event
from gateway.serial.framing import make_framer
from gateway.serial.spec import SerialSpec, parse_spec
from gateway.serial.transport import open_port

logger = logging.getLogger("gateway.serial")

#: Reopen attempts while a port is absent: first after RETRY_MIN, doubling up to RETRY_MAX
#: (so a port that comes back is reopened within RETRY_MAX plus the open time).
RETRY_MIN = 0.05
RETRY_MAX = 1.0
#: Replacement of an instance that crashed: doubles per consecutive crash up to the max.
RESTART_MIN = 0.05
RESTART_MAX = 5.0


class _Inbox:
    """The events waiting for one session's application instance (single reader)."""

    def __init__(self) -> None:
        self.items: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: dict[str, Any], front: bool = False) -> None:
        (self.items.appendleft if front else self.items.append)(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> dict[str, Any]:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.items.popleft()


class _Session(asyncio.Protocol):
    """One open period of a port: transport callbacks, framer, inbox, application instance."""

    def __init__(self, runner: PortRunner) -> None:
        self.runner = runner
        self.spec = runner.spec
        self.framer = make_framer(runner.spec.framing)
        self.inbox = _Inbox()
        self.transport: Any = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.error: str | None = None
        self.reopen = True
        self.reading_paused = False
        self.instance: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._crashes = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0

    # --- transport callbacks ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        frames = self.framer.feed(data, now)
        if self.framer.drops:
            for reason in self.framer.drops:
                MESSAGES_REJECTED.labels(reason=reason).inc()
                logger.debug("serial port %s: frame dropped (%s)", self.spec.port, reason)
            self.framer.drops.clear()
        if frames:
            self._deliver_frames(frames)
        if self.spec.framing.mode == "idle":
            self._last_data = now
            if self._idle_timer is None:
                delay = self.spec.framing.idle_ms / 1000.0
                self._idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        # One timer per silence, not one per read: re-arm for the remainder if data came since.
        remaining = self._last_data + self.spec.framing.idle_ms / 1000.0 - time.monotonic()
        if remaining > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(remaining, self._idle_check)
            return
        self._idle_timer = None
        self._flush_framer()

    def _flush_framer(self) -> None:
        frame = self.framer.flush()
        if frame is not None:
            self._deliver_frames([frame])

    def _deliver_frames(self, frames: list[bytes]) -> None:
        SERIAL_FRAMES.labels(port=self.spec.port).inc(len(frames))
        for frame in frames:
            self.inbox.put({"type": "serial.frame", "bytes": frame, "ts": self.runner.frame_ts()})
        if len(self.inbox.items) >= self.runner.queue_size and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = str(exc)
        self._writable.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.spec.framing.mode == "idle":
            self._flush_framer()
        if not self.ended.done():
            self.ended.set_result("lost")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- the application instance -----------------------------------------------------
    def start_instance(self) -> None:
        """Start (or replace) the instance: `serial.connect` first, then what is queued."""
        self._restart = None
        self.inbox.put({"type": "serial.connect"}, front=True)
        scope = {"type": "serial", "asgi": dict(ASGI), **self.spec.as_scope()}
        app = self.runner.server.application
        task = asyncio.create_task(
            app(scope, self._receive, self._send), name=f"serial[{self.spec.port}].instance"
        )
        task.add_done_callback(self._instance_done)
        self.instance = task

    async def _receive(self) -> dict[str, Any]:
        event = await self.inbox.get()
        if self.reading_paused and len(self.inbox.items) <= self.runner.queue_size // 2:
            self.reading_paused = False
            if self.transport is not None and not self.ended.done():
                self.transport.resume_reading()
        return event

    async def _send(self, event: dict[str, Any]) -> None:
        validate_app_event(event)
        if event["type"] == "serial.write":
            if self.ended.done() or self.transport is None or self.transport.is_closing():
                # As ASGI servers do for a closed connection: an OSError subclass, so a caller
                # (e.g. the command service) can hold the data for the next session.
                raise ConnectionError(f"serial port {self.spec.port} is closed")
            self.transport.write(bytes(event["bytes"]))
            await self._writable.wait()
        else:  # serial.close
            self.close(reason="closed", reopen=event.get("reopen", True))

    def _instance_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.ended.done():
            return
        exc = task.exception()
        if exc is not None:
            CONSUMER_ERRORS.labels(protocol="serial").inc()
            MESSAGES_REJECTED.labels(reason="consumer_error").inc()
            logger.error(
                "serial port %s: application instance crashed; replacing it",
                self.spec.port,
                exc_info=exc,
            )
        else:
            logger.warning(
                "serial port %s: application returned while the port is open; replacing it",
                self.spec.port,
            )
        delay = min(RESTART_MIN * 2**self._crashes, RESTART_MAX)
        self._crashes += 1
        self._restart = asyncio.get_running_loop().call_later(delay, self.start_instance)

    # --- ending -----------------------------------------------------------------------
    def close(self, reason: str, reopen: bool = True) -> None:
        """End the session on our side (app's `serial.close` or server shutdown)."""
        if not self.ended.done():
            self.reopen = reopen
            self.ended.set_result(reason)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def finish(self, grace: float) -> str:
        """After the port ended: deliver `serial.disconnect`, wait for the instance to return."""
        reason = self.ended.result()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self._restart is not None:  # a crashed instance was about to be replaced
            self._restart.cancel()
            self.start_instance()
        self.inbox.put({"type": "serial.disconnect", "reason": reason, "error": self.error})
        if self.instance is not None and not self.instance.done():
            done, _ = await asyncio.wait({self.instance}, timeout=grace)
            if not done:
                logger.warning(
                    "serial port %s: instance ignored serial.disconnect for %.1f s; cancelling it",
                    self.spec.port,
                    grace,
                )
                self.instance.cancel()
                await asyncio.wait({self.instance}, timeout=1.0)
        if self.instance is not None and self.instance.done() and not self.instance.cancelled():
            exc = self.instance.exception()
            if exc is not None:
                CONSUMER_ERRORS.labels(protocol="serial").inc()
                logger.error(
                    "serial port %s: instance failed on disconnect", self.spec.port, exc_info=exc
                )
        return reason


class PortRunner:
    """Keeps one port open as long as the server runs: open, serve a session, reopen."""

    def __init__(self, server: SerialServer, spec: SerialSpec, queue_size: int) -> None:
        self.server = server
        self.spec = spec
        self.queue_size = queue_size
        self.session: _Session | None = None
        self.opened = 0  # sessions so far
        self._last_us = 0  # the last frame's `ts`, in whole microseconds

    def frame_ts(self) -> float:
        """The `ts` of a frame read now: the clock, but at least 1 µs after the port's previous
        frame, so frames read in one chunk stay distinct readings (a reading is stored once per
        device, metric and ts, to the microsecond; docs/interface.md §3)."""
        self._last_us = max(round(time.time() * 1e6), self._last_us + 1)
        return self._last_us / 1e6

    @property
    def is_open(self) -> bool:
        """True while the port is open."""
        return self.session is not None and not self.session.ended.done()

    async def run(self) -> None:
        """Open/serve/reopen until the server stops."""
        stop = self.server._stop
        delay, announced = RETRY_MIN, False
        while not stop.is_set():
            try:
                _, session = await open_port(self.spec, lambda: _Session(self))
            except Exception as exc:  # SerialException/OSError: absent, busy, refused
                if not announced:
                    logger.warning(
                        "serial port %s not available (%s); retrying (backoff up to "
                        "%.1f s) until it appears",
                        self.spec.port,
                        exc,
                        RETRY_MAX,
                    )
                    announced = True
                else:
                    logger.debug("serial port %s still unavailable: %s", self.spec.port, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            assert isinstance(session, _Session)
            self.opened += 1
            opened_at = time.monotonic()
            logger.info(
                "serial port %s %s", self.spec.port, "reopened" if self.opened > 1 else "opened"
            )
            announced = False
            self.session = session
            session.start_instance()
            stop_wait = asyncio.ensure_future(stop.wait())
            await asyncio.wait({session.ended, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if stop.is_set():
                session.close("shutdown", reopen=False)
            reason = await session.finish(self.server.instance_grace)
            self.server.sessions_ended += 1
            level = logging.WARNING if reason == "lost" else logging.INFO
            what = "lost" if reason == "lost" else f"closed ({reason})"
            error = f": {session.error}" if session.error else ""
            logger.log(level, "serial port %s %s%s", self.spec.port, what, error)
            if reason == "closed" and not session.reopen:
                await stop.wait()
                continue
            # A port that keeps failing right after opening must not spin: short sessions
            # keep the backoff growing, a session that lasted resets it.
            lasted = time.monotonic() - opened_at
            delay = RETRY_MIN if lasted > 2 * RETRY_MAX else min(delay * 2, RETRY_MAX)
            if reason == "closed":
                delay = RETRY_MAX
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


class SerialServer:
    """Serves the `serial` protocol on a list of ports; fits the runner's Bridge shape."""

    def __init__(
        self,
        application: Any,
        specs: Sequence[SerialSpec | str],
        *,
        queue_size: int = 256,
        instance_grace: float = 2.0,
    ) -> None:
        self.application = application
        self.specs = [s if isinstance(s, SerialSpec) else parse_spec(s) for s in specs]
        ports = [s.port for s in self.specs]
        if len(set(ports)) != len(ports):  # two readers would split a port's bytes
            raise ValueError(f"a serial port is given twice: {' '.join(ports)}")
        self.instance_grace = instance_grace
        self.ports = [PortRunner(self, spec, queue_size) for spec in self.specs]
        self.sessions_ended = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        """True when every configured port is open (and when there are none)."""
        return all(p.is_open for p in self.ports)

    def status(self) -> dict[str, bool]:
        """Port → open, for health reports."""
        return {p.spec.port: p.is_open for p in self.ports}

    async def serve(self) -> None:
        """Run every port until `shutdown()`; callable again after it returned or raised."""
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(p.run(), name=f"serial[{p.spec.port}].run") for p in self.ports
        ]
        if not self._tasks:
            logger.info("serial bridge: no ports configured")
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()

    async def shutdown(self, timeout: float = 4.0) -> None:  # noqa: ASYNC109 (runner's API)
        """Close every port, deliver `serial.disconnect` (reason shutdown), wait ≤ timeout."""
        self._stop.set()
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return
        done, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=0.5)
