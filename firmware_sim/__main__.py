"""`python -m firmware_sim <kind> …`: run simulated device firmware.

Each subcommand is a module with `add_arguments(parser)` and `main(args) -> int`; `serial` is
the pty device. (The MQTT fleet adds itself here as another entry of `COMMANDS`.)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand → (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serial": ("firmware_sim.serial_device", "a serial device on a pseudo-terminal or tty"),
    "modbus": ("firmware_sim.modbus", "Modbus RTU units on a pseudo-terminal"),
    "mqtt": ("firmware_sim.cli", "a fleet of MQTT devices (the options of manage.py simulate)"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen simulator."""
    parser = argparse.ArgumentParser(prog="python -m firmware_sim")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return modules[args.command].main(args)


if __name__ == "__main__":
    sys.exit(main())
