"""Held commands: "which commands wait for device X", batched into one query for many devices.

Every device instance asks when its device comes online, so a fleet (re)connecting at once
asked thousands of times, one query and one sync-thread hop each (finding 5 in
docs/performance.md). Here requests made while a lookup runs wait for the next one, so there
is at most one query in flight per event loop and never one per device under load; always a
fresh query, so commands stored by any process are seen. The command service
(`devices.commands.service.deliver_pending`) is the caller.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels.db import database_sync_to_async

from devices.models import Command, CommandStatus
from gateway.loops import PerLoop

#: Device ids per query when looking up held commands for many devices at once.
LOOKUP_CHUNK = 500


async def held_commands(device_id: str) -> list[Any]:
    """The ids of `device_id`'s pending commands, oldest first (batched with other devices')."""
    return await _lookups.get().pending(device_id)


def _pending_ids(device_ids: list[str]) -> dict[str, list[Any]]:
    """The pending commands of each device, oldest first: one query per `LOOKUP_CHUNK` ids."""
    found: dict[str, list[Any]] = {device_id: [] for device_id in device_ids}
    for start in range(0, len(device_ids), LOOKUP_CHUNK):
        rows = (
            Command.objects.filter(
                device_id__in=device_ids[start : start + LOOKUP_CHUNK],
                status=CommandStatus.PENDING,
            )
            .order_by("created_at")
            .values_list("device_id", "pk")
        )
        for device_id, pk in rows:
            found[device_id].append(pk)
    return found


class _PendingLookups:
    """The waiting requests of one event loop and the task that answers them in batches."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[list[Any]]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def pending(self, device_id: str) -> list[Any]:
        """The ids of `device_id`'s pending commands, oldest first."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(device_id, []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="commands.pending-lookups")
        return await future

    async def _run(self) -> None:
        batch: dict[str, list[asyncio.Future[list[Any]]]] = {}
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    found = await database_sync_to_async(_pending_ids)(list(batch))
                except Exception as exc:
                    _settle(batch, error=exc)
                    continue
                _settle(batch, found=found)
        finally:
            self._task = None
            for pending in (batch, self._waiting):  # cancelled (loop closing): nobody hangs
                _settle(pending)


def _settle(
    batch: dict[str, list[asyncio.Future[list[Any]]]],
    found: dict[str, list[Any]] | None = None,
    error: Exception | None = None,
) -> None:
    """Resolve each waiter with its device's ids, or `error`, or cancel it (neither given)."""
    for device_id, futures in batch.items():
        for future in futures:
            if future.done():
                continue
            if found is not None:
                future.set_result(found[device_id])
            elif error is not None:
                future.set_exception(error)
            else:
                future.cancel()


_lookups: PerLoop[_PendingLookups] = PerLoop(_PendingLookups)
