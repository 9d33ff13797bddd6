"""`ModbusServer`: the interface server of the `modbus` protocol (docs/asgi-modbus.md).

One `BusRunner` per configured bus owns its pymodbus client and runs one transaction at a time:
queued writes first, then the unit whose poll is due soonest. Each unit keeps a monotonic
deadline advanced by whole intervals (missed slots are skipped, never bunched), so schedules
do not drift. A unit that fails `offline_after` polls in a row is offline and probed only every
`max(interval, 5 × timeout)`, so one dead unit costs the others little bus time. Every
transaction counts in `gateway_modbus_requests_total{bus, unit, result}`.

One application instance per unit and online period (as the serial protocol has one per open
port): `modbus.connect` at the first answer, `modbus.read` per poll, `modbus.written` per write,
`modbus.disconnect` when the unit goes offline, the bus is lost or the server stops. A lost bus
(adapter unplugged) is reopened by the same path with backoff, 50 ms doubling to 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from pymodbus.exceptions import ModbusException

from gateway.metrics import MODBUS_BUS_OPEN, MODBUS_REQUESTS
from gateway.modbus.config import BusConfig, UnitConfig
from gateway.modbus.link import make_client
from gateway.modbus.profile import TABLES
from gateway.modbus.session import UnitSession

logger = logging.getLogger("gateway.modbus")

RETRY_MIN = 0.05
RETRY_MAX = 1.0
#: Writes waiting per bus; past it `send(modbus.write)` raises ConnectionError (held, retried).
WRITE_QUEUE = 64


class _Unit:
    """A unit's schedule and health as the bus sees it."""

    def __init__(self, bus: BusConfig, config: UnitConfig, now: float) -> None:
        self.config = config
        self.label = f"{bus.port}#{config.unit}"
        self.due = now
        self.failures = 0
        self.online = False
        self.session: UnitSession | None = None
        self.probe = max(config.interval, 5 * bus.timeout)

    def advance(self, now: float) -> None:
        """Next deadline: whole periods after the last one, skipping slots already missed."""
        failing = self.failures >= self.config.offline_after
        period = self.probe if failing else self.config.interval
        self.due += period
        if self.due <= now:
            self.due += period * (int((now - self.due) // period) + 1)


class BusRunner:
    """Keeps one bus open and polls its units until the server stops."""

    def __init__(self, server: ModbusServer, bus: BusConfig) -> None:
        self.server, self.bus = server, bus
        now = time.monotonic()
        self.units = [_Unit(bus, u, now) for u in bus.units]
        self.writes: deque[tuple[UnitSession, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._crc = False
        self.client: Any = None
        self.opened = 0
        self._endings: set[asyncio.Task[None]] = set()

    @property
    def is_open(self) -> bool:
        """True while the bus is connected."""
        return self.client is not None and self.client.connected

    def submit_write(self, session: UnitSession, event: dict[str, Any]) -> None:
        """Queue an application's `modbus.write` (ConnectionError when it cannot go out now)."""
        if not self.is_open:
            raise ConnectionError(f"modbus bus {self.bus.port} is not open")
        if len(self.writes) >= WRITE_QUEUE:
            raise ConnectionError(f"modbus bus {self.bus.port}: {WRITE_QUEUE} writes waiting")
        self.writes.append((session, event))
        self._wake.set()

    def _on_crc_error(self) -> None:
        self._crc = True

    def _on_connection(self, up: bool) -> None:
        if not up:
            self._lost.set()
            self._wake.set()

    async def run(self) -> None:
        """Open, serve, reopen until the server stops."""
        stop = self.server._stop
        delay, announced = RETRY_MIN, False
        while not stop.is_set():
            self._lost.clear()
            self.client = make_client(self.bus, self._on_crc_error, self._on_connection)
            try:
                opened = await self.client.connect()
            except Exception as exc:  # pyserial/OS errors on odd paths
                opened, error = False, exc
            else:
                error = None
            if not opened:
                self.client.close()
                if not announced:
                    logger.warning(
                        "modbus bus %s not available%s; retrying (backoff up to %.1f s)",
                        self.bus.port, f" ({error})" if error else "", RETRY_MAX,
                    )  # fmt: skip
                    announced = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self.opened += 1
            announced, delay = False, RETRY_MIN
            MODBUS_BUS_OPEN.labels(bus=self.bus.port).set(1)
            logger.info(
                "modbus bus %s %s", self.bus.port, "reopened" if self.opened > 1 else "opened"
            )
            try:
                await self._serve(stop)
            finally:
                MODBUS_BUS_OPEN.labels(bus=self.bus.port).set(0)
                reason = "shutdown" if stop.is_set() else "lost"
                self.client.close()
                self._fail_writes("the bus closed")
                await self._end_all(reason, None if stop.is_set() else "bus lost")
            if not stop.is_set():
                logger.warning("modbus bus %s lost; reopening", self.bus.port)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_MIN)
        if self._endings:
            await asyncio.wait(self._endings, timeout=self.server.instance_grace + 1)

    async def _serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self._lost.is_set() and self.client.connected:
            if self.writes:
                session, event = self.writes.popleft()
                await self._write(session, event)
                continue
            unit = min(self.units, key=lambda u: u.due)
            wait = unit.due - time.monotonic()
            if wait > 0:  # until the deadline, or a write, a loss or shutdown wakes us
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            await self._poll(unit)
            unit.advance(time.monotonic())
            await asyncio.sleep(0)  # let the loop breathe between back-to-back transactions

    async def _transact(
        self, call: Any, fc: int, address: int, count: int | None = None
    ) -> tuple[Any, str, str | None]:
        """Run one request; (response or None, result label, error text).

        RTU answers carry no transaction id, so an answer is checked against its request
        (function, and the count of a read or the address of a write): a late answer to an
        earlier, timed-out request must not pass for this one.
        """
        self._crc = False
        try:
            response = await call
        except ModbusException as exc:
            if self._lost.is_set() or not self.client.connected:
                return None, "lost", "bus lost"
            if self._crc:
                return None, "crc_error", "answer failed its CRC check"
            if "No response" in str(exc):
                return None, "timeout", f"no answer within {self.bus.timeout} s"
            return None, "error", str(exc)
        if response.function_code & 0x7F != fc:
            return None, "error", "answer does not match the request (a late answer?)"
        if response.isError():
            code = getattr(response, "exception_code", 0)
            return None, "exception", f"exception response, code {code}"
        if count is not None:
            got = len(response.bits if fc in (1, 2) else response.registers)
            if not count <= got < count + (8 if fc in (1, 2) else 1):
                return None, "error", "answer does not match the request (a late answer?)"
        elif response.address != address:
            return None, "error", "answer does not match the request (a late answer?)"
        return response, "ok", None

    def _count(self, unit: _Unit, result: str) -> None:
        if result != "lost":
            MODBUS_REQUESTS.labels(
                bus=self.bus.port, unit=str(unit.config.unit), result=result
            ).inc()

    async def _poll(self, unit: _Unit) -> None:
        device_id = unit.config.unit
        blocks: list[dict[str, Any]] = []
        error: str | None = None
        for block in unit.config.profile.blocks:
            reader = {
                "input": self.client.read_input_registers,
                "holding": self.client.read_holding_registers,
                "coil": self.client.read_coils,
                "discrete": self.client.read_discrete_inputs,
            }[block.table]
            call = reader(block.address, count=block.count, device_id=device_id)
            response, result, error = await self._transact(
                call, TABLES[block.table], block.address, block.count
            )
            self._count(unit, result)
            if result == "lost":
                return
            if response is None:
                break
            if block.table in ("coil", "discrete"):
                values = [bool(b) for b in response.bits[: block.count]]
                blocks.append({"table": block.table, "address": block.address, "bits": values})
            else:
                values = list(response.registers[: block.count])
                blocks.append({"table": block.table, "address": block.address, "registers": values})
        if error is None:
            unit.failures = 0
            if unit.session is None or unit.session.task.done():
                unit.online = True
                logger.info("modbus unit %s (%s) answering", unit.label, unit.config.device)
                unit.session = UnitSession(self, unit)
            unit.session.put({"type": "modbus.read", "ts": time.time(), "blocks": blocks})
            return
        unit.failures += 1
        logger.debug("modbus unit %s: %s", unit.label, error)
        if unit.session is not None and unit.failures >= unit.config.offline_after:
            logger.warning(
                "modbus unit %s (%s) offline after %d failed polls: %s",
                unit.label, unit.config.device, unit.failures, error,
            )  # fmt: skip
            self._end(unit, "offline", error)

    async def _write(self, session: UnitSession, event: dict[str, Any]) -> None:
        unit = session.unit
        address, values, device_id = event["address"], event["values"], unit.config.unit
        if event["table"] == "coil":
            bits = [bool(v) for v in values]
            call = (
                self.client.write_coil(address, bits[0], device_id=device_id)
                if len(bits) == 1
                else self.client.write_coils(address, bits, device_id=device_id)
            )
        else:
            call = (
                self.client.write_register(address, values[0], device_id=device_id)
                if len(values) == 1
                else self.client.write_registers(address, values, device_id=device_id)
            )
        single = 5 if event["table"] == "coil" else 6
        fc = single if len(values) == 1 else single + 10  # 5/15, 6/16
        response, result, error = await self._transact(call, fc, address)
        self._count(unit, result)
        if not session.ended:
            session.put(
                {
                    "type": "modbus.written",
                    "ref": event.get("ref"),
                    "ok": response is not None,
                    "error": error,
                }
            )

    def _fail_writes(self, error: str) -> None:
        while self.writes:
            session, event = self.writes.popleft()
            if not session.ended:
                session.put(
                    {"type": "modbus.written", "ref": event.get("ref"), "ok": False, "error": error}
                )

    def _end(self, unit: _Unit, reason: str, error: str | None) -> None:
        session, unit.session, unit.online = unit.session, None, False
        if session is None:
            return
        task = asyncio.create_task(session.end(reason, error, self.server.instance_grace))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    async def _end_all(self, reason: str, error: str | None) -> None:
        for unit in self.units:
            unit.failures = 0
            unit.due = time.monotonic()
            self._end(unit, reason, error)
        if self._endings:
            await asyncio.wait(set(self._endings), timeout=self.server.instance_grace + 1)


class ModbusServer:
    """Serves the `modbus` protocol on a list of buses; fits the runner's Bridge shape."""

    def __init__(
        self, application: Any, buses: Sequence[BusConfig], *, instance_grace: float = 2.0
    ) -> None:
        self.application = application
        self.buses = list(buses)
        self.instance_grace = instance_grace
        self.runners: list[BusRunner] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        """True when every bus is open."""
        return all(r.is_open for r in self.runners)

    def status(self) -> dict[str, bool]:
        """Bus → open, for health reports."""
        return {r.bus.port: r.is_open for r in self.runners}

    async def serve(self) -> None:
        """Run every bus until `shutdown()`; callable again after it returned or raised."""
        self._stop = asyncio.Event()
        self.runners = [BusRunner(self, bus) for bus in self.buses]
        self._tasks = [
            asyncio.create_task(r.run(), name=f"modbus[{r.bus.port}].run") for r in self.runners
        ]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()

    async def shutdown(self, timeout: float = 4.0) -> None:  # noqa: ASYNC109 (runner's API)
        """Stop polling, deliver `modbus.disconnect` (reason shutdown), wait ≤ timeout."""
        self._stop.set()
        for runner in self.runners:
            runner._wake.set()
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            task.cancel()
