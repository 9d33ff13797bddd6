"""One simulated MQTT device: its own aiomqtt connection, Last Will, telemetry timer and faults.

Lifecycle: connect (the Will is registered) → subscribe to commands → announce online →
publish telemetry every interval (with jitter) while answering commands → leave:

- stop and reboot are clean: publish the offline message (retained), then DISCONNECT, so the
  broker does not fire the Will but subscribers still see the device go offline (what ESPHome
  and Tasmota do on a restart). A reboot comes back after a delay with its sequence reset.
- `drop()` shuts the socket down without DISCONNECT, so the broker publishes the Will.
- a lost connection (broker restart) is retried with jittered exponential backoff.

Over 400 lines on purpose: one class holding one device's whole lifecycle and the fault
switches that act on it; the fleet, styles and faults around it have their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass

import aiomqtt

from firmware_sim.faults import Faults, native_garbage, tasmota_garbage
from firmware_sim.firmware import Firmware, NativeFirmware, Outgoing, Reply
from firmware_sim.selfdescribing import EsphomeFirmware, Zigbee2MqttFirmware
from firmware_sim.tasmota import TasmotaFirmware

logger = logging.getLogger("firmware_sim")

STYLES: dict[str, type[Firmware]] = {
    "native": NativeFirmware,
    "tasmota": TasmotaFirmware,
    "esphome": EsphomeFirmware,
    "zigbee2mqtt": Zigbee2MqttFirmware,
}
# Command replies waiting (delayed acks) per device; past it new commands go unanswered.
MAX_PENDING_REPLIES = 100


@dataclass(frozen=True)
class Broker:
    """Where and how devices connect (parsed from `mqtt[s]://[user:pass@]host[:port]`)."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False


class SimDevice:
    """A simulated device with its own MQTT client; see the module docstring for its life."""

    def __init__(
        self,
        device_id: str,
        broker: Broker,
        *,
        style: str = "native",
        interval: float = 1.0,
        qos: int = 0,
        rng: random.Random | None = None,
        reboot_delay: float = 1.0,
        keepalive: int = 30,
        connect_gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.id = device_id
        self.broker = broker
        self.style = style
        self.rng = rng or random.Random()
        self.firmware: Firmware = STYLES[style](
            device_id, interval=interval, rng=self.rng, qos=qos, reboot_delay=reboot_delay
        )
        self.faults = Faults()
        self.keepalive = keepalive
        self._gate = connect_gate or asyncio.Semaphore(1)
        # Counters (read by tests, benchmarks and the CLI summary).
        self.sent = 0  # telemetry ticks published
        self.garbage_sent = 0
        self.commands = 0  # commands received
        self.acks_sent = 0
        self.acks_suppressed = 0  # replies withheld by the noack fault or the pending cap
        self.ignored = 0  # inbound messages that were not answerable commands
        self.connects = 0
        self.connect_failures = 0
        self.drops = 0
        self.reboots = 0
        # State.
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._offline = asyncio.Event()
        self._offline.set()
        self._leave = asyncio.Event()
        self._leave_reason = ""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._restore = asyncio.Event()
        self._dropped = False
        self._drop_for: float | None = None
        self._reboot_delay = 0.0
        self._replies: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "offline"
        return f"<SimDevice {self.id} {self.style} {state} sent={self.sent}>"

    # --- Public controls --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while connected to the broker and announced online."""
        return self._connected.is_set()

    @property
    def interval(self) -> float:
        """Seconds between telemetry ticks (before the burst fault and jitter)."""
        return self.firmware.interval

    @property
    def relay(self) -> bool:
        return self.firmware.relay

    def start(self) -> asyncio.Task[None]:
        """Start the device's task (connects, and reconnects until stopped)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"firmware_sim[{self.id}].run")
        return self._task

    async def stop(self, grace: float = 10.0) -> None:
        """Leave cleanly (offline message, DISCONNECT) and end the device's task.

        A device still busy after `grace` seconds is cancelled.
        """
        self._stop.set()
        self._request_leave("stop")
        self._restore.set()
        if self._task is None:
            return
        _, pending = await asyncio.wait([self._task], timeout=grace)
        if pending:
            logger.warning("%s: did not stop within %s s; cancelling it", self.id, grace)
            await _finish([self._task])

    async def wait_connected(self) -> None:
        """Wait until the device is connected and online (wrap in `asyncio.timeout`)."""
        await self._connected.wait()

    async def wait_offline(self) -> None:
        """Wait until the device has lost or left its connection (wrap in `asyncio.timeout`)."""
        await self._offline.wait()

    def drop(self, reconnect_after: float | None = None) -> None:
        """Vanish without DISCONNECT (the broker fires the Will); back after `reconnect_after` s.

        With no `reconnect_after` the device stays away until `restore()`.
        """
        self.drops += 1
        self._dropped = True
        self._drop_for = reconnect_after
        self._restore.clear()
        if self._client is not None:
            _shutdown(self._client)

    def restore(self) -> None:
        """Clear every fault and bring a dropped device back."""
        self.faults = Faults()
        self._wake.set()
        self._dropped = False
        self._restore.set()

    def reboot(self, delay: float | None = None) -> None:
        """Reboot now, as the `reboot` command does (clean leave, back after `delay` s)."""
        self._reboot_delay = self.firmware.reboot_delay if delay is None else delay
        self._request_leave("reboot")

    def set_noack(self, on: bool = True) -> None:
        """Stop (or resume) answering commands; commands still take effect."""
        self.faults.noack = on

    def set_ack_delay(self, seconds: float) -> None:
        """Answer commands `seconds` late (0 = promptly)."""
        self.faults.ack_delay = max(0.0, seconds)

    def set_garbage(self, probability: float = 1.0) -> None:
        """Also publish a malformed message on this share of telemetry ticks."""
        self.faults.garbage = min(1.0, max(0.0, probability))

    def set_burst(self, factor: float = 10.0) -> None:
        """Publish telemetry `factor` times faster (1 = normal)."""
        self.faults.burst = max(1e-3, factor)
        self._wake.set()

    # --- The device's life --------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, run sessions, reconnect with backoff; returns after `stop()`."""
        backoff = 0.5
        while not self._stop.is_set():
            if self._dropped:
                await self._wait_restored()
                continue
            client = self._make_client()
            try:
                async with self._gate:
                    await client.__aenter__()
            except aiomqtt.MqttError as exc:
                self.connect_failures += 1
                logger.debug("%s: connect failed: %s", self.id, exc)
                await self._pause(backoff * self.rng.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self._leave.clear()
            self._leave_reason = ""
            try:
                await self._session(client)
            finally:
                await self._close(client)
            if self._leave_reason == "reboot":
                self.reboots += 1
                await self._pause(self._reboot_delay)
                self.firmware.boot()
            elif not self._leave_reason and not self._dropped:
                await self._pause(backoff * self.rng.uniform(0.5, 1.5))

    def _make_client(self) -> aiomqtt.Client:
        will = self.firmware.will()
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.id,
            clean_session=True,
            keepalive=self.keepalive,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain),
            tls_context=ssl.create_default_context() if self.broker.tls else None,
            max_queued_incoming_messages=1000,
            # Real firmware (lwIP, ESP-IDF) sends small MQTT packets without Nagle delays.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            logger=logger,
        )

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: serve it until told to leave or the connection is lost."""
        self._client = client
        self._offline.clear()
        if self._dropped or self._stop.is_set():
            self._request_leave("stop" if self._stop.is_set() else "drop")
            return
        # aiomqtt's QoS 1 publish waits for its PUBACK even after the connection is gone (up to
        # its timeout), so the session also ends as soon as the client sees the disconnection.
        lost = client._disconnected  # noqa: SLF001
        body = asyncio.create_task(self._serve(client), name=f"firmware_sim[{self.id}].serve")
        leave = asyncio.create_task(self._leave.wait(), name=f"firmware_sim[{self.id}].leave")
        try:
            await asyncio.wait([body, leave, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._connected.clear()
            self._leave.set()
            self._wake.set()
            await _finish([body, leave, *self._replies])
            self._replies.clear()
        exc = None if body.cancelled() else body.exception()
        errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
        for error in errors:
            if isinstance(error, aiomqtt.MqttError):
                logger.debug("%s: connection lost: %s", self.id, error)
            elif error is not None:
                logger.error("%s: session failed", self.id, exc_info=error)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Subscribe, announce online, then publish telemetry and answer commands."""
        self.connects += 1
        self.firmware.connected()
        for topic in self.firmware.subscriptions():
            await client.subscribe(topic, qos=1)
        for message in self.firmware.birth():
            await self._publish(client, message)
        self._connected.set()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._telemetry(client), name=f"firmware_sim[{self.id}].tele")
            group.create_task(self._inbox(client), name=f"firmware_sim[{self.id}].inbox")

    async def _close(self, client: aiomqtt.Client) -> None:
        """End the connection: clean (offline + DISCONNECT) unless it is already gone."""
        disconnected = client._disconnected  # noqa: SLF001
        if not disconnected.done() and self._dropped:
            # Dropped while (re)connecting: vanish abruptly here too, and let paho notice.
            _shutdown(client)
            await asyncio.wait([disconnected], timeout=5)
        lost = disconnected.done()
        if lost and not disconnected.cancelled():
            disconnected.exception()  # mark retrieved: a lost connection is expected here
        try:
            if not lost and self._leave_reason in ("stop", "reboot"):
                await self._publish(client, self.firmware.goodbye(), max_wait=5)
            await client.__aexit__(None, None, None)
        except aiomqtt.MqttError as exc:
            logger.debug("%s: unclean close: %s", self.id, exc)
        finally:
            self._client = None
            self._offline.set()

    async def _publish(
        self, client: aiomqtt.Client, message: Outgoing, max_wait: float | None = None
    ) -> None:
        await client.publish(
            message.topic, message.payload, qos=message.qos, retain=message.retain, timeout=max_wait
        )

    def _request_leave(self, reason: str) -> None:
        if not self._leave_reason or reason == "stop":
            self._leave_reason = reason
        self._leave.set()
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when the device is stopped."""
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (gh-86296).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _wait_restored(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._drop_for):
                await self._restore.wait()
        self._dropped = False

    async def _telemetry(self, client: aiomqtt.Client) -> None:
        """Publish a tick every interval (±10 % jitter), the first at a random phase.

        Ticks follow a schedule rather than sleeping after each publish, so time spent
        publishing does not slow the rate; a device that falls a whole period behind skips
        ahead instead of bursting to catch up.
        """
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._period() * self.rng.random()
        # Checks `_leave` as well as being cancelled: aiomqtt's publish waits in wait_for,
        # which on Python 3.11 can swallow a cancellation (gh-86296).
        while not self._leave.is_set():
            self._wake.clear()
            try:
                async with asyncio.timeout_at(next_at):
                    await self._wake.wait()
                # The interval or burst changed: schedule afresh from now.
                next_at = loop.time() + self._period() * self.rng.uniform(0.0, 1.0)
                continue
            except TimeoutError:
                pass
            for message in self.firmware.telemetry(time.time()):
                await self._publish(client, message)
            self.sent += 1
            if self.faults.garbage and self.rng.random() < self.faults.garbage:
                make = native_garbage if self.style == "native" else tasmota_garbage
                topic, payload = make(self.id, self.garbage_sent)
                await client.publish(topic, payload, qos=0)
                self.garbage_sent += 1
            period = self._period()
            next_at = max(next_at + period * self.rng.uniform(0.9, 1.1), loop.time() - period)

    def _period(self) -> float:
        return self.firmware.interval / self.faults.burst

    async def _inbox(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            interval = self.firmware.interval
            reply = self.firmware.handle(message.topic.value, payload)
            if reply is None:
                self.ignored += 1
                continue
            self.commands += 1
            if self.firmware.interval != interval:
                self._wake.set()
            if len(self._replies) >= MAX_PENDING_REPLIES:
                self.acks_suppressed += 1
                continue
            task = asyncio.create_task(self._answer(client, reply), name=f"sim[{self.id}].ack")
            self._replies.add(task)
            task.add_done_callback(self._replies.discard)

    async def _answer(self, client: aiomqtt.Client, reply: Reply) -> None:
        """Send one command's reply (subject to the noack/delay faults), then any reboot."""
        if self.faults.ack_delay:
            await asyncio.sleep(self.faults.ack_delay)
        if self.faults.noack:
            self.acks_suppressed += 1
        else:
            try:
                for message in reply.messages:
                    await self._publish(client, message)
                self.acks_sent += 1
            except aiomqtt.MqttError as exc:
                logger.debug("%s: could not answer: %s", self.id, exc)
        if reply.reboot_after_ack is not None:
            self.reboot(reply.reboot_after_ack)


def _shutdown(client: aiomqtt.Client) -> None:
    """Close the connection without an MQTT DISCONNECT, as a device losing power does."""
    # The private paho client is the only way to reach the socket; shutdown() sends a FIN
    # and paho then sees EOF, while the broker sees no DISCONNECT and publishes the Will.
    sock = client._client.socket()  # noqa: SLF001
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait for them, cancelling again any that swallowed the first request."""
    while tasks:
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=1.0)
        tasks = list(pending)
