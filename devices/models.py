"""Devices and their telemetry history."""

from __future__ import annotations

from datetime import datetime

from django.core.validators import RegexValidator
from django.db import models

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: Longest stored description of a device's last rejected message (longer ones are cut).
REJECTION_CHARS = 200


class Transport(models.TextChoices):
    MQTT = "mqtt", "MQTT"
    SERIAL = "serial", "Serial"
    MODBUS = "modbus", "Modbus"


class Device(models.Model):
    """A sensor known to the gateway; registered on its first valid message."""

    id = models.CharField(
        primary_key=True,
        max_length=64,
        validators=[RegexValidator(DEVICE_ID_PATTERN)],
        help_text="1-64 characters of A-Z a-z 0-9 _ -",
    )
    name = models.CharField(max_length=200, blank=True)
    transport = models.CharField(max_length=16, choices=Transport.choices, default=Transport.MQTT)
    online = models.BooleanField(default=False)
    last_seen = models.DateTimeField(null=True, blank=True)
    # Latest value of each metric, e.g. {"temperature": 21.5}; merged by the telemetry writer.
    metrics = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    # Its messages the gateway rejected (docs/interface.md §5.2): how many, when the latest
    # was, its reason and a short description; added up per batch by the telemetry pipeline
    # (devices/telemetry/rejections.py), only ever for a device already registered.
    # Defaults in the database too: the telemetry writer registers devices with raw SQL.
    rejected = models.PositiveBigIntegerField(default=0, db_default=0)
    last_rejected_at = models.DateTimeField(null=True, blank=True)
    last_rejection_reason = models.CharField(max_length=32, blank=True, default="", db_default="")
    last_rejection = models.CharField(
        max_length=REJECTION_CHARS, blank=True, default="", db_default=""
    )

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name or self.id

    def as_dict(self) -> dict:
        """The device as docs/interface.md §5/§6 shows it (API list and dashboard snapshot)."""
        return {
            "id": self.id,
            "name": self.name or self.id,
            "online": self.online,
            "last_seen": self.last_seen.timestamp() if self.last_seen else None,
            "transport": self.transport,
            "metrics": self.metrics,
            **rejection_fields(
                self.rejected,
                self.last_rejected_at,
                self.last_rejection_reason,
                self.last_rejection,
            ),
        }


def rejection_fields(
    count: int | None, at: datetime | None, reason: str | None, detail: str | None
) -> dict:
    """A device's rejection record as docs/interface.md §5.2 shows it (API, dashboard rows)."""
    return {
        "rejected": count or 0,
        "last_rejected_at": at.timestamp() if at else None,
        "last_rejection": {"reason": reason or "", "detail": detail or ""} if at else None,
    }


class Reading(models.Model):
    """One stored telemetry value: a device's metric at a time.

    Keyed by (device, metric, ts), with no surrogate id: a reading is stored once, whichever
    bridge, restart or retained replay delivers it again (docs/retained-and-presence.md; the
    writer inserts with ON CONFLICT DO NOTHING), and the key is the one structure a stored
    value costs. The history query's filter and order are the key; its `value` is in the key's
    b-tree too (SQLite: a WITHOUT ROWID table; PostgreSQL: the key's index INCLUDEs value), so
    one series' points are read from it alone, not from pages shared with every other series
    (docs/performance.md, "History at 10 million rows"). Migration 0006 builds that layout;
    Django's SQLite schema editor would rebuild the table as a rowid table if a later
    migration altered a field of this model: tests/test_reading_key_migration.py checks it.
    """

    pk = models.CompositePrimaryKey("device", "metric", "ts")
    # No index of its own: the key starts with device_id and serves the FK.
    device = models.ForeignKey(
        Device, on_delete=models.CASCADE, related_name="readings", db_index=False
    )
    metric = models.CharField(max_length=200)
    ts = models.DateTimeField()
    value = models.FloatField()

    class Meta:
        verbose_name = "telemetry reading"

    def __str__(self) -> str:
        return f"{self.device_id} {self.metric}={self.value} @ {self.ts:%Y-%m-%d %H:%M:%S}"


class CommandStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    ACKED = "acked", "Acked"
    FAILED = "failed", "Failed"
    TIMEOUT = "timeout", "Timed out"


FINAL_STATUSES = (CommandStatus.ACKED, CommandStatus.FAILED, CommandStatus.TIMEOUT)


class Command(models.Model):
    """A command to a device and its lifecycle: pending → sent → acked | failed | timeout."""

    id = models.UUIDField(primary_key=True)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="commands")
    name = models.CharField(max_length=64)
    args = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=16, choices=CommandStatus.choices, default=CommandStatus.PENDING
    )
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    # Who sent it (the audit trail); kept when the user is deleted.
    created_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Seconds to wait for the ack once sent; a pending command expires at `expires_at`.
    timeout = models.FloatField(default=10.0)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("send_command", "Can send commands to devices")]
        indexes = [
            models.Index(fields=["device", "status"], name="command_dev_status"),
            models.Index(fields=["created_by", "created_at"], name="command_user_time"),
        ]

    def __str__(self) -> str:
        return f"{self.name} → {self.device_id} ({self.status})"

    def as_frame(self, ref: str | None = None) -> dict:
        """The command as a docs/interface.md §6 `command` frame (also the REST representation)."""
        frame: dict = {
            "type": "command",
            "id": str(self.id),
            "device": self.device_id,
            "name": self.name,
            "status": self.status,
        }
        if self.result is not None:
            frame["result"] = self.result
        if self.error:
            frame["error"] = self.error
        if ref is not None:
            frame["ref"] = ref
        return frame
