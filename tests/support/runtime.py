"""Stopping what a test's event loop started lazily, so nothing of it leaks into the next test."""

from __future__ import annotations

from typing import Any

from channels.layers import get_channel_layer


async def stop_loop_services(layer: Any = None) -> None:
    """Close the running loop's alert evaluator and notifier, its telemetry pipeline, disarm its
    command timers, empty the layer.

    Each only if this loop started it; `layer` defaults to the process's.
    """
    from alerts.hooks import current_evaluator
    from alerts.notify import current_notifier
    from devices.commands.timers import current_timers
    from devices.telemetry.pipeline import current_pipeline

    for service in (current_evaluator(), current_notifier()):
        if service is not None:
            await service.close()
    pipeline = current_pipeline()
    if pipeline is not None:
        await pipeline.close()
    timers = current_timers()
    if timers is not None:
        timers.cancel_all()
    await (get_channel_layer() if layer is None else layer).flush()
