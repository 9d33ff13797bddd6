"""Every saved or deleted rule tells the evaluators of every process to reload their rules."""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from alerts.models import AlertRule
from alerts.outbox import EVALUATORS_GROUP

logger = logging.getLogger(__name__)


def announce_rules() -> None:
    """Send ``alert.rules`` to group `EVALUATORS_GROUP` (sync; after the transaction commits)."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(EVALUATORS_GROUP, {"type": "alert.rules"})
    except Exception:
        logger.exception("could not announce an alert rule change")


@receiver(post_save, sender=AlertRule)
@receiver(post_delete, sender=AlertRule)
def _rule_changed(sender: Any, **kwargs: Any) -> None:
    transaction.on_commit(announce_rules)
