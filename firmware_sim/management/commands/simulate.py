"""`manage.py simulate`: a fleet of simulated MQTT sensor devices (firmware_sim).

The options live in `firmware_sim.cli` so `python -m firmware_sim mqtt` takes the same ones;
here only `--mqtt` defaults to the gateway's `MQTT_URL` setting.
"""

from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from firmware_sim import cli
from firmware_sim.faults import FaultSpecError


class Command(BaseCommand):
    help = "Run simulated MQTT devices (native or Tasmota style) until Ctrl-C or --duration."

    def add_arguments(self, parser: CommandParser) -> None:
        cli.add_arguments(parser, default_url=settings.GATEWAY["MQTT_URL"])

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = cli.config_from_options(options)
        except (ValueError, FaultSpecError) as exc:
            raise CommandError(str(exc)) from exc

        def echo(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        asyncio.run(cli.run_fleet(config, options["duration"], echo, options["report"]))
