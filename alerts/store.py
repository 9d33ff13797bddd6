"""The alerts' database side: conditional transitions, so racing processes never both win.

Every function here is sync (run in a thread). A transition is an ``UPDATE … WHERE state =
<expected>`` and opening is an INSERT guarded by the one-open-alert-per-(rule, device)
constraint, so of two bridges (or a timer and a reading) only one raises, clears or opens an
alert, and only that one notifies. Each transition that happened writes an `AlertEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F

from alerts.models import OPEN_STATES, Alert, AlertEvent, AlertRule, AlertState, EventKind


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass
class Change:
    """A transition that happened: the alert as it is now and what happened to it."""

    kind: str  # an EventKind value
    alert: dict[str, Any]
    notify_urls: list[str]


def load_rules() -> list[AlertRule]:
    """Every enabled rule."""
    return list(AlertRule.objects.filter(enabled=True))


def load_open() -> list[tuple[int, int, str, str, float, float | None]]:
    """Open alerts: (id, rule id, device, state, pending_since epoch, value)."""
    rows = Alert.objects.filter(state__in=OPEN_STATES).values_list(
        "id", "rule_id", "device", "state", "pending_since", "value"
    )
    return [(i, r, d, s, since.timestamp(), v) for i, r, d, s, since, v in rows]


def load_devices() -> dict[str, tuple[float | None, bool]]:
    """Every known device: (last_seen epoch s, online); where nodata and offline rules start."""
    from devices.models import Device

    rows = Device.objects.values_list("id", "last_seen", "online")
    return {d: (seen.timestamp() if seen else None, online) for d, seen, online in rows}


def _changed(alert_id: int, kind: str) -> Change:
    alert = Alert.objects.select_related("rule", "acknowledged_by").get(pk=alert_id)
    return Change(kind, alert.as_dict(), list(alert.rule.notify_urls or []))


def open_alert(
    rule_id: int, device: str, active: bool, since: float, value: float | None, at: float
) -> tuple[int | None, str | None, Change | None]:
    """Open a pending or active alert; when one is open already, adopt it instead.

    Returns (id, state, change): the open alert's id and state (None, None if the rule is
    gone), and the `raised` change when this call raised it.
    """
    state = AlertState.ACTIVE if active else AlertState.PENDING
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                rule_id=rule_id,
                device=device,
                state=state,
                value=value,
                pending_since=_at(since),
                raised_at=_at(at) if active else None,
            )
            if active:
                AlertEvent.objects.create(
                    alert=alert, kind=EventKind.RAISED, at=_at(at), value=value
                )
    except IntegrityError:  # another process opened it first (or the rule was deleted)
        row = (
            Alert.objects.filter(rule_id=rule_id, device=device, state__in=OPEN_STATES)
            .values_list("id", "state")
            .first()
        )
        return (row[0], row[1], None) if row else (None, None, None)
    if active:
        return alert.id, state, _changed(alert.id, EventKind.RAISED)
    return alert.id, state, None


def raise_alert(alert_id: int, value: float | None, at: float) -> Change | None:
    """pending → active; the change, or None if it was not pending (someone else won)."""
    with transaction.atomic():
        done = Alert.objects.filter(pk=alert_id, state=AlertState.PENDING).update(
            state=AlertState.ACTIVE, raised_at=_at(at), value=value
        )
        if not done:
            return None
        AlertEvent.objects.create(alert_id=alert_id, kind=EventKind.RAISED, at=_at(at), value=value)
    return _changed(alert_id, EventKind.RAISED)


def state_of(alert_id: int) -> str | None:
    """The alert's state now (None once it is gone)."""
    return Alert.objects.filter(pk=alert_id).values_list("state", flat=True).first()


def cancel_alert(alert_id: int) -> None:
    """A pending alert whose condition ended before its `for`: it never was an alert."""
    Alert.objects.filter(pk=alert_id, state=AlertState.PENDING).delete()


def clear_alert(alert_id: int, value: float | None, at: float) -> Change | None:
    """active → cleared; the change, or None if it was not active."""
    with transaction.atomic():
        done = Alert.objects.filter(pk=alert_id, state=AlertState.ACTIVE).update(
            state=AlertState.CLEARED, cleared_at=_at(at)
        )
        if not done:
            return None
        AlertEvent.objects.create(
            alert_id=alert_id, kind=EventKind.CLEARED, at=_at(at), value=value
        )
    return _changed(alert_id, EventKind.CLEARED)


def acknowledge(alert_id: int, user: Any, note: str, at: float) -> tuple[bool, Change | None]:
    """Acknowledge a raised alert: (found, change); change None if it was acknowledged already."""
    raised = Alert.objects.filter(pk=alert_id, state__in=(AlertState.ACTIVE, AlertState.CLEARED))
    if not raised.exists():
        return False, None
    with transaction.atomic():
        done = raised.filter(acknowledged=False).update(
            acknowledged=True, acknowledged_by=user, acknowledged_at=_at(at), ack_note=note
        )
        if not done:
            return True, None
        AlertEvent.objects.create(
            alert_id=alert_id, kind=EventKind.ACKNOWLEDGED, at=_at(at), user=user, note=note
        )
    return True, _changed(alert_id, EventKind.ACKNOWLEDGED)


def list_alerts(state: str | None, limit: int) -> list[dict[str, Any]]:
    """Raised alerts (active and cleared, or one of them), newest first."""
    states = [state] if state else [AlertState.ACTIVE, AlertState.CLEARED]
    qs = Alert.objects.filter(state__in=states).select_related("rule", "acknowledged_by")
    return [a.as_dict() for a in qs.order_by(F("id").desc())[:limit]]


def alert_detail(alert_id: int) -> dict[str, Any] | None:
    """A raised alert with its audit trail (``events``: kind, at, value, user, note), or None."""
    alert = (
        Alert.objects.filter(pk=alert_id, state__in=(AlertState.ACTIVE, AlertState.CLEARED))
        .select_related("rule", "acknowledged_by")
        .first()
    )
    if alert is None:
        return None
    events = alert.events.select_related("user").order_by("id")
    return {
        **alert.as_dict(),
        "events": [
            {
                "kind": e.kind,
                "at": round(e.at.timestamp(), 3),
                "value": e.value,
                "user": e.user.get_username() if e.user_id else None,
                "note": e.note,
            }
            for e in events
        ],
    }
