"""`manage.py demo`: the whole system alive in one command (behind `bin/run`).

Migrates the database, creates (or resets) the demo login with a fresh random password, then
runs the gateway with an embedded broker beside simulated devices (`firmware_sim.demo`).
"""

from __future__ import annotations

import asyncio
import io
import sys
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from firmware_sim.demo import DemoConfig, run_demo
from gateway.runner import broker_url_option


class Command(BaseCommand):
    help = (
        "Run the demo: migrate, create a demo login, start rungateway --embedded-broker with "
        "simulated MQTT devices (native and Tasmota) and a serial device on a pty."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
        parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free)")
        parser.add_argument("--mqtt", metavar="URL", help="broker URL (default: MQTT_URL)")
        parser.add_argument("--devices", type=int, default=12, help="native devices (12)")
        parser.add_argument("--tasmota", type=int, default=4, help="Tasmota devices (4)")
        parser.add_argument("--esphome", type=int, default=3, help="ESPHome nodes (3)")
        parser.add_argument(
            "--zigbee2mqtt", type=int, default=1, choices=[0, 1], help="a Zigbee2MQTT bridge (1)"
        )
        parser.add_argument("--rate", type=float, default=1.0, help="telemetry per device per s")
        parser.add_argument(
            "--serial-device", default="serial-1", help="id of the simulated serial device"
        )
        parser.add_argument("--no-serial", action="store_true", help="no simulated serial device")
        parser.add_argument("--username", default="demo", help="the demo login's user name")
        parser.add_argument("--no-user", action="store_true", help="create no demo login")
        parser.add_argument(
            "--reset-password",
            action="store_true",
            help="give the existing demo login a new password (it is kept otherwise)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        url = broker_url_option(options["mqtt"])
        if min(options["devices"], options["tasmota"], options["esphome"]) < 0:
            raise CommandError("--devices, --tasmota and --esphome must not be negative")
        if not 0 < options["rate"] <= 100:
            raise CommandError("--rate must be above 0 and at most 100")
        self.stdout.write("demo: migrating the database")
        call_command("migrate", interactive=False, verbosity=0)
        login = ""
        if not options["no_user"]:
            out = io.StringIO()
            call_command(
                "ensure_demo_user",
                username=options["username"],
                reset_password=options["reset_password"],
                stdout=out,
            )
            login = out.getvalue().strip()  # "Dashboard login (created): demo / <password>"
        config = DemoConfig(
            mqtt_url=url,
            host=options["host"],
            port=options["port"],
            native=options["devices"],
            tasmota=options["tasmota"],
            esphome=options["esphome"],
            zigbee2mqtt=options["zigbee2mqtt"],
            rate=options["rate"],
            serial_device=None if options["no_serial"] else options["serial_device"],
            login=login,
        )

        def echo(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        code = asyncio.run(run_demo(config, echo))
        if code:
            sys.exit(code)
