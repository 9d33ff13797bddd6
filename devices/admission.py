"""Which device ids may get an MQTT instance: a route's `admit` (gateway/mqtt/routing.py).

A publisher controls device ids, so new ones are admitted by policy before anything is
allocated for them (docs/reliability.md "Hostile publishers"):

- a device already in the registry is always admitted;
- ``GATEWAY_DEVICE_ADMISSION=open`` (default): a new device is admitted at most
  ``GATEWAY_NEW_DEVICES_PER_SECOND`` per second (a token bucket holding ten seconds' worth) and
  while the registry has fewer than ``GATEWAY_MAX_DEVICES``;
- ``known``: only devices created beforehand (the admin).

A refused message is acknowledged and counted (``not_admitted``), with a rate-limited log line.
The registry's ids are loaded by `prepare()` before each subscription (so the retained statuses
the broker replays find their devices known) and again, at most every `REFRESH_SECONDS`, when
an unknown id is refused (a device just created in the admin).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from channels.db import database_sync_to_async
from django.conf import settings

from devices.models import Device
from devices.telemetry.parsing import valid_device_id

logger = logging.getLogger(__name__)

POLICIES = ("open", "known")
#: Seconds between two reloads of the registry's ids caused by refused unknown ids.
REFRESH_SECONDS = 30.0
#: Seconds between two log lines about refused devices.
LOG_SECONDS = 10.0


def _stored_ids() -> set[str]:
    return set(Device.objects.values_list("id", flat=True))


class RouteAdmission:
    """A route's `admit`: its key's device id (`to_id`), checked by the shared admission."""

    def __init__(self, admission: DeviceAdmission, to_id: Callable[[str], str] = str) -> None:
        self.admission = admission
        self.to_id = to_id

    async def prepare(self) -> None:
        await self.admission.prepare()

    def __call__(self, key: Mapping[str, str]) -> str | None:
        return self.admission.check(self.to_id(key["device_id"]))


class DeviceAdmission:
    """The registry's ids as this process knows them, and the policy for new ones."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        self.loaded = False
        self._tokens: float | None = None  # full on first use
        self._filled = time.monotonic()
        self._refreshed = -REFRESH_SECONDS
        self._refreshing: asyncio.Task[None] | None = None
        self._logged = -LOG_SECONDS
        self._refused = 0

    async def prepare(self) -> None:
        """Load the registry's ids (before subscribing, so replayed statuses find them)."""
        self.known |= await database_sync_to_async(_stored_ids)()
        self.loaded = True
        self._refreshed = time.monotonic()

    def check(self, device_id: str) -> str | None:
        """None when `device_id` may get an instance, else the rejection reason."""
        if not valid_device_id(device_id):
            return "bad_device_id"
        if device_id in self.known:
            return None
        cfg = settings.GATEWAY
        reason = None
        if cfg["DEVICE_ADMISSION"] == "known":
            reason = "only devices created beforehand"
        elif len(self.known) >= cfg["MAX_DEVICES"]:
            reason = f"the registry holds {cfg['MAX_DEVICES']} devices"
        elif not self._take_token(cfg["NEW_DEVICES_PER_SECOND"]):
            reason = f"more than {cfg['NEW_DEVICES_PER_SECOND']:g} new devices per second"
        if reason is None:
            self.known.add(device_id)
            return None
        self._refuse(device_id, reason)
        return "not_admitted"

    def _take_token(self, rate: float) -> bool:
        now = time.monotonic()
        if self._tokens is None:
            self._tokens = rate * 10
        self._tokens = min(rate * 10, self._tokens + (now - self._filled) * rate)
        self._filled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _refuse(self, device_id: str, reason: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._logged >= LOG_SECONDS:
            logger.warning(
                "new device %r not admitted (%s); %d refused since the last line",
                device_id[:80],
                reason,
                self._refused,
            )
            self._logged, self._refused = now, 0
        if now - self._refreshed >= REFRESH_SECONDS and (
            self._refreshing is None or self._refreshing.done()
        ):
            self._refreshed = now  # a device created in the admin since: known next time
            self._refreshing = asyncio.get_running_loop().create_task(
                self.prepare(), name="devices.admission.refresh"
            )
