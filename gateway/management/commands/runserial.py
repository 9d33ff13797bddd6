"""`manage.py runserial --serial SPEC…`: the serial bridge alone, no web (docs/interface.md §1).

Ports come from SERIAL_PORTS plus every `--serial`. Like `runmqtt`, it reaches web processes
only through a shared channel layer (REDIS_URL). Serial devices are mirrored to the broker
(`--mqtt`, default MQTT_URL) unless `--no-mirror` or SERIAL_MIRROR=0.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.runner import (
    GatewayRunner,
    broker_url_option,
    close_pipeline,
    describe_setup,
    in_memory_layer,
    modbus_bridge,
    modbus_option,
)
from gateway.serial.spec import parse_specs

logger = logging.getLogger("gateway.runner")


class Command(BaseCommand):
    help = "Run the serial bridge alone (needs REDIS_URL to reach web processes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--serial",
            action="append",
            default=[],
            metavar="SPEC",
            help="serial port SPEC (pyserial URL or path with ?baudrate=&device=&…), repeatable; "
            "added to SERIAL_PORTS",
        )
        modbus_option(parser)
        parser.add_argument("--mqtt", metavar="URL", help="broker for mirroring (default MQTT_URL)")
        parser.add_argument(
            "--no-mirror", action="store_true", help="do not mirror serial devices to the broker"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from devices.conventions import mirror
        from devices.conventions.serial import device_id_for_scope

        texts = [*settings.GATEWAY["SERIAL_PORTS"], *options["serial"]]
        modbus = [*settings.GATEWAY["MODBUS_CONFIG"], *options["modbus"]]
        if not texts and not modbus:
            raise CommandError(
                "no serial ports: give --serial SPEC or --modbus FILE, or set SERIAL_PORTS "
                "or MODBUS_CONFIG"
            )
        try:
            specs = parse_specs(texts)
            for spec in specs:
                device_id_for_scope(spec.as_scope())
        except ValueError as exc:
            raise CommandError(f"bad --serial/SERIAL_PORTS spec: {exc}") from exc
        url = broker_url_option(options["mqtt"])
        mirror.configure(enabled=False if options["no_mirror"] else None, url=url)
        if in_memory_layer():
            logger.warning(
                "the channel layer is in-memory: telemetry is stored, but nothing reaches "
                "dashboards in other processes; set REDIS_URL to share one"
            )
        code = asyncio.run(run_bridge(specs, modbus))
        if code:
            sys.exit(code)


async def run_bridge(specs: list[Any], modbus: list[str] | None = None) -> int:
    """Run the serial and Modbus bridges until SIGTERM/SIGINT, then mark offline and flush."""
    from alerts.hooks import close_evaluator, start_evaluator
    from devices.conventions.mirror import close_mirror, enabled
    from devices.conventions.modbus import mark_units_offline
    from devices.conventions.serial import mark_configured_offline
    from gateway.asgi import application
    from gateway.serial.server import SerialServer

    bridges: dict[str, Any] = {}
    if specs:
        bridges["serial"] = SerialServer(application, specs)
    try:
        modbus_server = modbus_bridge(application, modbus or [])
    except ValueError as exc:
        raise CommandError(f"bad --modbus/MODBUS_CONFIG: {exc}") from exc
    if modbus_server is not None:
        bridges["modbus"] = modbus_server
        mark_units_offline(u.device for b in modbus_server.buses for u in b.units)
    # Offline until their ports open (also undoes what an unclean stop left behind).
    mark_configured_offline(specs)
    setup = describe_setup()
    ports = " ".join([*(s.raw for s in specs), *(modbus or [])])

    def banner(runner: GatewayRunner) -> str:
        return (
            f"serial bridge running: {ports} | mirror {'on' if enabled() else 'off'} | "
            f"channel layer {setup['channel_layer']} | database {setup['database']}"
        )

    start_evaluator()  # alert rules over the serial devices (docs/alerts.md)
    runner = GatewayRunner(
        application,
        web=False,
        bridges=bridges,
        shutdown_hooks=[close_evaluator, close_pipeline, close_mirror],
        banner=banner,
    )
    return await runner.serve()
