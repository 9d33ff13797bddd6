"""Application instances of the MQTT interface server: one per routing key, supervised.

Each instance is a task running `application(scope, receive, send)` with its own bounded
event queue. Instances are created lazily on their first message, replaced when they raise,
and retired by one timer task when idle.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from gateway import metrics
from gateway.mqtt.routing import Match, run_innermost

logger = logging.getLogger("gateway.mqtt")

#: Room for control events (connect/disconnect/retire) beyond a full queue of messages.
CONTROL_SLACK = 8
#: Events an instance's `receive` returns in a row without yielding to the event loop.
STREAK = 32
#: Allocations between two collections of the GC's young generation (`tune_gc`).
GC_YOUNG_THRESHOLD = 20_000

SendCallable = Callable[[dict[str, Any]], Awaitable[None]]


def tune_gc() -> None:
    """Collect the GC's young generation every `GC_YOUNG_THRESHOLD` allocations, not 700.

    Thousands of live instances (tasks, frames, consumers) make every walk of the old
    generation long, and with a young generation of 700 objects, events in flight survive
    into it often enough to trigger such walks: at 10,000 devices the GC cost ~18 % of the
    CPU per message (docs/performance.md). A higher threshold lets per-message objects die
    young. A process that set a higher one itself keeps it.
    """
    young, middle, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class Instance:
    """One live application instance: its task, event queue and last activity time.

    Thousands live at once (one per device), so the queue is a plain list (short: usually
    empty or one event; a deque costs 600 bytes even empty) with at most one waiting future,
    created only while the application waits, instead of an asyncio.Queue and Event
    (~5 KB per instance; docs/performance.md).
    """

    __slots__ = (
        "key", "match", "queue", "task", "last_active", "waiter", "limit", "retired",
        "pool", "pressed", "static", "streak",
    )  # fmt: skip

    def __init__(self, key: Hashable, match: Match, limit: int, pool: InstancePool) -> None:
        self.key = key
        self.match = match
        self.limit = limit
        self.pool = pool
        self.pressed = False  # counted in pool.pressured (queue past its high-water mark)
        # Unbounded itself; the pool enforces `limit` on messages and `CONTROL_SLACK`.
        self.queue: list[dict[str, Any]] = []
        self.waiter: asyncio.Future[None] | None = None  # the application waiting in receive
        self.task: asyncio.Task[Any] | None = None
        self.last_active = asyncio.get_running_loop().time()
        self.retired = False
        self.static = False  # a static route's instance: never idle-retired nor evicted
        self.streak = 0  # events returned by `receive` since the last loop turn

    def finished(self, task: asyncio.Task[Any]) -> None:
        """The task's done callback (no partial per instance): the pool supervises."""
        self.pool._on_done(self, task)

    def put(self, event: dict[str, Any]) -> None:
        """Append an event and wake the application if it waits in `receive`."""
        self.queue.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        """The ASGI `receive` of this instance.

        Events already queued are returned without a loop turn (cheaper, and more readings
        of a device coalesce downstream), but at most `STREAK` in a row: then it yields once,
        so a busy instance never holds the event loop for its whole queue. The event is taken
        only after any wait, so a cancelled receive loses nothing.
        """
        queue = self.queue
        if queue and self.streak >= STREAK:
            self.streak = 0
            await asyncio.sleep(0)
        while not queue:
            self.streak = 0
            self.waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        self.streak += 1
        event = queue.pop(0)
        if self.pressed and len(queue) <= self.pool.low_water:
            self.pool.relieve(self)
        return event


class InstancePool:
    """Live instances by key: lazy creation, bounded delivery, supervision, idle retirement."""

    def __init__(
        self,
        application: Any,
        base_scope: dict[str, Any],
        send: SendCallable,
        *,
        limit: int,
        idle_seconds: float,
        retire_grace: float,
        connect_event: Callable[[], dict[str, Any] | None],
        max_instances: int = 50_000,
    ) -> None:
        self.application = application
        self.base_scope = base_scope
        self.send = send
        self.limit = max(1, limit)
        self.idle_seconds = idle_seconds
        self.retire_grace = retire_grace
        self.connect_event = connect_event
        self.max_instances = max(1, max_instances)
        self.closing = False
        # Instances whose queue is past `high_water`: while any is, the server reads one
        # packet per loop turn instead of a burst, so a busy instance is not flooded.
        self.pressured = 0
        self.high_water = max(1, self.limit // 4)
        self.low_water = self.high_water // 2
        # Least recently active first: `deliver` moves an instance to the end.
        self._instances: dict[Hashable, Instance] = {}
        self._static_keys: set[Hashable] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._callback_context = contextvars.Context()

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._instances

    def start(self) -> None:
        """Start the idle-retirement timer (one task for all instances); tune the GC."""
        tune_gc()
        if self._reaper is None and self.idle_seconds > 0:
            self._reaper = asyncio.create_task(self._reap_idle(), name="mqtt-instances.reaper")

    def _create(self, match: Match, static: bool = False) -> Instance:
        if len(self._instances) >= self.max_instances:
            # A flood of new keys (e.g. random device ids) must not grow memory without bound:
            # retire the least recently active instance; its state lives outside it anyway.
            oldest = next((i for i in self._instances.values() if not i.static), None)
            if oldest is not None:
                metrics.MQTT_INSTANCES_EVICTED.inc()
                self.retire(oldest, "evicted")
        # The instance keeps only what a successor needs (its key's params, not the message's).
        key_params = match.key_params
        kept = Match(match.route, match.instance_key, key_params, key_params, match.pattern)
        inst = Instance(match.instance_key, kept, self.limit, self)
        inst.static = static
        scope = {
            **self.base_scope,
            "route": match.route,
            "url_route": {"args": (), "kwargs": key_params},  # shared, read-only
        }
        connect = self.connect_event()
        if connect is not None:
            inst.queue.append(connect)
        inst.task = asyncio.create_task(
            run_innermost(self.application, scope, inst.receive, self.send),
            name=f"mqtt-instance[{':'.join(map(str, match.instance_key))}]",
        )
        # One context for every instance's done callback (it reads no context variable):
        # add_done_callback would otherwise copy the current one per instance.
        inst.task.add_done_callback(inst.finished, context=self._callback_context)
        self._instances[inst.key] = inst
        return inst

    def deliver(self, match: Match, event: dict[str, Any], qos: int) -> None:
        """Queue a message for its instance, never waiting: one slow instance stalls no other.

        Past the queue's limit a QoS 0 message is dropped and counted; a QoS≥1 one is kept
        (parked behind the others): it is acknowledged only once the app has handled it, so
        the broker never has more than its in-flight window (Receive Maximum on v5,
        max_inflight_messages on 3.1.1) of them outstanding to us, whichever instance holds
        them. Waiting for room instead would stop the receive loop for every device.
        """
        key = match.instance_key
        inst = self._instances.pop(key, None)
        if inst is None or inst.task is None or inst.task.done():
            inst = self._create(match, key in self._static_keys)
        else:
            self._instances[key] = inst  # now the most recently active
        queue = inst.queue
        inst.last_active = asyncio.get_running_loop().time()
        if len(queue) < self.limit:
            inst.put(event)
            if not inst.pressed and len(queue) >= self.high_water:
                inst.pressed = True
                self.pressured += 1
            return
        if qos == 0:
            metrics.MQTT_MESSAGES_DROPPED.labels("queue_full").inc()
            return
        metrics.MQTT_MESSAGES_PARKED.inc()
        inst.put(event)

    def broadcast(self, event: dict[str, Any]) -> None:
        """Queue a control event (mqtt.connect / mqtt.disconnect) for every live instance."""
        for inst in list(self._instances.values()):
            self._put_control(inst, event)

    def _put_control(self, inst: Instance, event: dict[str, Any]) -> bool:
        if len(inst.queue) < self.limit + CONTROL_SLACK:
            inst.put(dict(event))
            return True
        metrics.MQTT_MESSAGES_DROPPED.labels("queue_full").inc()
        return False

    def relieve(self, inst: Instance) -> None:
        """`inst` no longer counts as pressured (drained below low water, or finished)."""
        if inst.pressed:
            inst.pressed = False
            self.pressured -= 1

    def _on_done(self, inst: Instance, task: asyncio.Task[Any]) -> None:
        self.relieve(inst)
        if self._instances.get(inst.key) is inst:
            del self._instances[inst.key]
        if task.cancelled() or inst.retired:
            return
        exc = task.exception()
        if exc is not None:
            logger.error(
                "mqtt application instance %s raised; replacing it", task.get_name(), exc_info=exc
            )
            metrics.CONSUMER_ERRORS.labels("mqtt").inc()
        # Messages queued behind the one that failed are not lost: a fresh instance gets them.
        leftovers = [event for event in inst.queue if event["type"] == "mqtt.message"]
        inst.queue.clear()
        # A static instance that failed is started again by its next message or connect.
        if leftovers and not self.closing:
            successor = self._instances.get(inst.key) or self._create(inst.match, inst.static)
            for event in leftovers:
                successor.put(event)

    def start_static(self, matches: list[Match]) -> None:
        """Start the instance of each static route that is not running (on every connect)."""
        for match in matches:
            self._static_keys.add(match.instance_key)
            inst = self._instances.get(match.instance_key)
            if not self.closing and (inst is None or inst.task is None or inst.task.done()):
                self._create(match, static=True)

    def retire(self, inst: Instance, reason: str, timer: bool = True) -> None:
        """Ask an instance to finish (`mqtt.retire`); cancel it if still running after grace
        (`timer` False: the caller does that, as `close` does for all at once)."""
        if self._instances.get(inst.key) is inst:
            del self._instances[inst.key]
        inst.retired = True
        task = inst.task
        if task is None or task.done():
            return
        if not self._put_control(inst, {"type": "mqtt.retire", "reason": reason}):
            task.cancel()
            return
        if timer:
            asyncio.get_running_loop().call_later(self.retire_grace, task.cancel)

    async def _reap_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.idle_seconds / 4)
            deadline = loop.time() - self.idle_seconds
            for inst in list(self._instances.values()):
                if inst.last_active < deadline and not inst.queue and not inst.static:
                    self.retire(inst, "idle")

    async def close(self, grace: float) -> None:
        """Retire every instance, wait up to `grace` s, then cancel what is left."""
        self.closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        instances = list(self._instances.values())
        tasks = [inst.task for inst in instances if inst.task is not None and not inst.task.done()]
        for inst in instances:
            # Queued messages come before the retire event, so they are handled within grace.
            self.retire(inst, "shutdown", timer=False)
        if not tasks:
            return
        try:
            _, pending = await asyncio.wait(tasks, timeout=grace)
        finally:  # past grace, or our caller gave up on us: cancel what is still running
            pending = {task for task in tasks if not task.done()}
            for task in pending:
                task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=0.5)
