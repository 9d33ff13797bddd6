"""Devices and their telemetry history."""

from __future__ import annotations

from django.core.validators import RegexValidator
from django.db import models

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class Transport(models.TextChoices):
    MQTT = "mqtt", "MQTT"
    SERIAL = "serial", "Serial"


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

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name or self.id

    def as_dict(self) -> dict:
        """The device as CONTRACT §5/§6 shows it (API list and dashboard snapshot)."""
        return {
            "id": self.id,
            "name": self.name or self.id,
            "online": self.online,
            "last_seen": self.last_seen.timestamp() if self.last_seen else None,
            "transport": self.transport,
            "metrics": self.metrics,
        }


class Reading(models.Model):
    """One stored telemetry value: a device's metric at a time."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="readings")
    metric = models.CharField(max_length=200)
    ts = models.DateTimeField()
    value = models.FloatField()

    class Meta:
        verbose_name = "telemetry reading"
        indexes = [models.Index(fields=["device", "metric", "ts"], name="reading_dev_metric_ts")]

    def __str__(self) -> str:
        return f"{self.device_id} {self.metric}={self.value} @ {self.ts:%Y-%m-%d %H:%M:%S}"
