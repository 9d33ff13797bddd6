"""`manage.py runmqtt`: the MQTT bridge alone, no web server (docs/interface.md §1).

It reaches web processes only through a shared channel layer (REDIS_URL); with the in-memory
layer it still stores telemetry but no dashboard elsewhere sees live frames.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from gateway.mqtt.url import parse_broker_url
from gateway.runner import (
    GatewayRunner,
    broker_url_option,
    close_pipeline,
    describe_setup,
    in_memory_layer,
    mqtt_bridge,
)

logger = logging.getLogger("gateway.runner")


class Command(BaseCommand):
    help = "Run the MQTT bridge alone (needs REDIS_URL to reach web processes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--mqtt", metavar="URL", help="broker URL (default: MQTT_URL)")
        parser.add_argument(
            "--shared-group",
            metavar="NAME",
            help="subscribe as $share/NAME/… so several bridges split the load (MQTT v5)",
        )
        parser.add_argument(
            "--bridge-id",
            metavar="ID",
            help="this bridge's stable name in its shared group, so the broker keeps its session "
            "across restarts (default: GATEWAY_BRIDGE_ID; unset: a clean session per process)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        url = broker_url_option(options["mqtt"])
        if in_memory_layer():
            logger.warning(
                "the channel layer is in-memory: telemetry is stored, but nothing reaches "
                "dashboards in other processes; set REDIS_URL to share one"
            )
        code = asyncio.run(run_bridge(url, options["shared_group"], options["bridge_id"]))
        if code:
            sys.exit(code)


async def run_bridge(mqtt_url: str, shared_group: str | None, bridge_id: str | None = None) -> int:
    """Run the MQTT bridge until SIGTERM/SIGINT, then publish offline and flush.

    Logs "MQTT bridge subscribed" once it first has its subscriptions (in a shared group,
    from then on the broker gives it its share of the messages).
    """
    from gateway.asgi import application

    setup = describe_setup()
    shown_url = str(parse_broker_url(mqtt_url))
    group = f" | shared group {shared_group}" if shared_group else ""

    def banner(runner: GatewayRunner) -> str:
        return (
            f"MQTT bridge running: broker {shown_url}{group} | channel layer "
            f"{setup['channel_layer']} | database {setup['database']}"
        )

    bridge = mqtt_bridge(application, mqtt_url, shared_group=shared_group, bridge_id=bridge_id)
    runner = GatewayRunner(
        application,
        web=False,
        bridges={"mqtt": bridge},
        shutdown_hooks=[close_pipeline],
        banner=banner,
    )
    subscribed = asyncio.create_task(_log_subscribed(bridge, group), name="runmqtt.subscribed")
    try:
        return await runner.serve()
    finally:
        subscribed.cancel()


async def _log_subscribed(bridge: Any, group: str) -> None:
    wait_connected = getattr(bridge, "wait_connected", None)
    if wait_connected is not None:
        await wait_connected()
        logger.info("MQTT bridge subscribed%s", group)
