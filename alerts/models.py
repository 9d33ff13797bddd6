"""Alert rules, the alerts they raise (one open per rule and device), and their audit trail."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models import Q


class Op(models.TextChoices):
    ABOVE = "above", "value above threshold"
    BELOW = "below", "value below threshold"
    OUTSIDE = "outside", "value outside [threshold, threshold_high]"
    EQUALS = "equals", "value equals threshold (booleans: 1 or 0)"
    OFFLINE = "offline", "device offline"
    NODATA = "nodata", "no data for `for` seconds"


class Severity(models.TextChoices):
    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


class AlertRule(models.Model):
    """A condition on devices matching `device` (an id or an fnmatch glob), held `for_seconds`."""

    name = models.CharField(max_length=200)
    device = models.CharField(max_length=128, help_text="a device id or a glob such as sim-*")
    metric = models.CharField(max_length=200, blank=True)
    op = models.CharField(max_length=16, choices=Op.choices)
    threshold = models.FloatField(null=True, blank=True)
    threshold_high = models.FloatField(null=True, blank=True)
    hysteresis = models.FloatField(default=0.0)
    for_seconds = models.FloatField(default=0.0)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.WARNING)
    enabled = models.BooleanField(default=True)
    # Apprise URLs notified when an alert of this rule is raised or cleared (besides the global
    # GATEWAY_ALERT_NOTIFY_URLS).
    notify_urls = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        permissions = [("manage_rules", "Can manage alert rules")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """The API's validation (alerts/rules.py), for rules edited in the admin."""
        from django.core.exceptions import ValidationError

        from alerts.rules import RuleError, parse_rule

        try:
            parse_rule(self.as_dict())
        except RuleError as exc:
            raise ValidationError(str(exc)) from None

    def as_dict(self) -> dict[str, Any]:
        """The rule as the API shows it (the POST body's names, plus id and the extras)."""
        return {
            "id": self.id,
            "name": self.name,
            "device": self.device,
            "metric": self.metric,
            "op": self.op,
            "threshold": self.threshold,
            "threshold_high": self.threshold_high,
            "hysteresis": self.hysteresis,
            "for": self.for_seconds,
            "severity": self.severity,
            "enabled": self.enabled,
            "notify": list(self.notify_urls or []),
        }


class AlertState(models.TextChoices):
    # The condition holds but not yet for the rule's `for`: not shown as an alert; stored so
    # the timer survives a restart.
    PENDING = "pending", "Pending"
    ACTIVE = "active", "Active"
    CLEARED = "cleared", "Cleared"


OPEN_STATES = (AlertState.PENDING, AlertState.ACTIVE)


class Alert(models.Model):
    """One raised condition of one rule on one device: active → cleared; acknowledged apart."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    # Not a foreign key: an alert may name a device whose first row is still being written.
    device = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=AlertState.choices)
    value = models.FloatField(null=True, blank=True)
    pending_since = models.DateTimeField()
    raised_at = models.DateTimeField(null=True, blank=True)
    cleared_at = models.DateTimeField(null=True, blank=True)
    acknowledged = models.BooleanField(default=False)
    acknowledged_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    ack_note = models.CharField(max_length=1000, blank=True)

    class Meta:
        ordering = ["-id"]
        permissions = [("acknowledge_alert", "Can acknowledge alerts")]
        constraints = [
            # One open alert per rule and device, whichever process tries to open a second.
            models.UniqueConstraint(
                fields=["rule", "device"],
                condition=Q(state__in=["pending", "active"]),
                name="alert_one_open_per_rule_device",
            )
        ]
        indexes = [models.Index(fields=["state", "id"], name="alert_state_id")]

    def __str__(self) -> str:
        return f"{self.rule_id}/{self.device} ({self.state})"

    def as_dict(self) -> dict[str, Any]:
        """The alert as the API lists it and the ``alert`` frame carries it (times epoch s)."""
        rule = self.rule
        return {
            "id": self.id,
            "rule": self.rule_id,
            "rule_name": rule.name,
            "severity": rule.severity,
            "metric": rule.metric,
            "device": self.device,
            "state": self.state,
            "acknowledged": self.acknowledged,
            "acknowledged_by": (
                self.acknowledged_by.get_username() if self.acknowledged_by_id else None
            ),
            "acknowledged_at": _epoch(self.acknowledged_at),
            "ack_note": self.ack_note,
            "raised_at": _epoch(self.raised_at),
            "cleared_at": _epoch(self.cleared_at),
            "value": self.value,
        }


def _epoch(value: Any) -> float | None:
    return round(value.timestamp(), 3) if value is not None else None


class EventKind(models.TextChoices):
    RAISED = "raised", "Raised"
    CLEARED = "cleared", "Cleared"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"


class AlertEvent(models.Model):
    """The audit trail: every transition of an alert, when, with what value, by whom."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=EventKind.choices)
    at = models.DateTimeField()
    value = models.FloatField(null=True, blank=True)
    user = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    note = models.CharField(max_length=1000, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"alert {self.alert_id} {self.kind} @ {self.at:%Y-%m-%d %H:%M:%S}"
