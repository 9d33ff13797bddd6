"""`manage.py rungateway`: the web tier, the MQTT bridge and the serial bridge in one process.

One event loop, so the in-memory channel layer and SQLite are enough (docs/interface.md §1).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.mqtt.url import parse_broker_url
from gateway.runner import (
    Bridge,
    GatewayRunner,
    broker_url_option,
    close_pipeline,
    describe_setup,
    modbus_bridge,
    modbus_option,
    mqtt_bridge,
    serial_bridge,
)

logger = logging.getLogger("gateway.runner")


class Command(BaseCommand):
    help = "Run the dashboard (HTTP + WebSocket), the MQTT bridge and the serial bridge together."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
        parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free)")
        parser.add_argument("--mqtt", metavar="URL", help="broker URL (default: MQTT_URL)")
        parser.add_argument(
            "--serial",
            metavar="SPEC",
            action="append",
            default=[],
            help="serial port SPEC, repeatable; added to SERIAL_PORTS",
        )
        modbus_option(parser)
        parser.add_argument(
            "--embedded-broker",
            action="store_true",
            help="start a local broker at the MQTT URL when none answers there",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        url = broker_url_option(options["mqtt"])
        serial = [*settings.GATEWAY["SERIAL_PORTS"], *options["serial"]]
        code = asyncio.run(
            run_gateway(
                host=options["host"],
                port=options["port"],
                mqtt_url=url,
                serial=serial,
                modbus=[*settings.GATEWAY["MODBUS_CONFIG"], *options["modbus"]],
                embedded_broker=options["embedded_broker"],
            )
        )
        if code:
            sys.exit(code)


async def run_gateway(
    *,
    host: str,
    port: int,
    mqtt_url: str,
    serial: list[str],
    embedded_broker: bool,
    modbus: list[str] | None = None,
) -> int:
    """Start the embedded broker if asked, run everything until a signal, stop the broker last."""
    from devices.conventions import mirror
    from devices.conventions.modbus import mark_units_offline
    from devices.conventions.serial import mark_configured_offline
    from gateway.asgi import application
    from gateway.broker import BrokerStartError, ensure_broker

    broker = None
    protocol = "v5"
    if embedded_broker:
        try:
            broker = await ensure_broker(mqtt_url)
        except BrokerStartError as exc:
            raise CommandError(str(exc)) from exc
        if broker is not None:
            protocol = broker.protocol
    try:
        bridges: dict[str, Bridge] = {"mqtt": mqtt_bridge(application, mqtt_url, protocol=protocol)}
        try:
            serial_server = serial_bridge(application, serial)
        except ValueError as exc:
            raise CommandError(f"bad --serial/SERIAL_PORTS spec: {exc}") from exc
        try:
            modbus_server = modbus_bridge(application, modbus or [])
        except ValueError as exc:
            raise CommandError(f"bad --modbus/MODBUS_CONFIG: {exc}") from exc
        if serial_server is not None:
            bridges["serial"] = serial_server
        if modbus_server is not None:
            bridges["modbus"] = modbus_server
        if serial_server is not None or modbus_server is not None:
            # Serial devices are mirrored to the broker the bridge uses (conventions/mirror.py).
            # The mirror marks its publishes with an MQTT v5 user property so the bridge can skip
            # their echoes; a 3.1.1-only broker (the amqtt fallback) cannot carry it.
            if protocol == "v5":
                mirror.configure(url=mqtt_url)
            else:
                mirror.configure(enabled=False)
                logger.warning("serial mirroring is off: the broker speaks MQTT 3.1.1 only")
        # Offline until their ports open or units answer (also undoes an unclean stop).
        if serial_server is not None:
            mark_configured_offline(serial_server.specs)
        if modbus_server is not None:
            mark_units_offline(u.device for b in modbus_server.buses for u in b.units)
        setup = describe_setup()
        shown_url = str(parse_broker_url(mqtt_url))
        broker_note = f" (embedded {broker.kind})" if broker is not None else ""

        def banner(runner: GatewayRunner) -> str:
            return (
                f"gateway running: dashboard {runner.dashboard_url} | broker {shown_url}"
                f"{broker_note} | channel layer {setup['channel_layer']} | "
                f"database {setup['database']} | serial {' '.join(serial) or 'none'}"
                f" | modbus {' '.join(modbus or []) or 'none'} | web {setup['web']}"
            )

        runner = GatewayRunner(
            application,
            host=host,
            port=port,
            bridges=bridges,
            shutdown_hooks=[close_pipeline, mirror.close_mirror],
            banner=banner,
            access_log=settings.LOG_LEVEL == "DEBUG",
            send_timeout=settings.GATEWAY["HTTP_SEND_TIMEOUT"],
        )
        try:
            return await runner.serve()
        except OSError as exc:  # the HTTP port is taken or the address is not ours
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc
    finally:
        if broker is not None:
            await broker.stop()
