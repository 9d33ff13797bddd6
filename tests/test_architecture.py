"""The import rules of docs/architecture.md hold, and the check bites when one is broken.

The rules live as import-linter contracts in pyproject.toml: the core (gateway, devices,
dashboard) never imports the simulator; the protocol servers know nothing of devices or
dashboards; consumers import no socket library; device conventions sit over commands, which
sit over telemetry. The second half breaks each rule in a throwaway copy of the tree and
expects the checker to say which contract broke.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "devices", "dashboard", "alerts", "firmware_sim", "bench")
RULES = {
    "The core never imports the simulator",
    "Protocol servers know nothing about devices or dashboards",
    "Consumers know nothing about sockets",
    "Device rooms: conventions over commands over telemetry",
    "Devices know nothing about alerts",
}


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on `tree` (its pyproject.toml and packages) in a child Python."""
    script = "import sys, importlinter.cli as c; sys.exit(c.lint_imports(no_cache=True))"
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_rule_is_a_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert {c["name"] for c in config["contracts"]} == RULES


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in RULES:
        assert f"{name} KEPT" in result.stdout


@pytest.fixture
def copy_of_the_tree(tmp_path: Path) -> Path:
    """The packages' Python files and pyproject.toml, copied to a scratch directory."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            tmp_path / package,
            ignore=lambda _dir, names: [n for n in names if not n.endswith(".py") and "." in n],
        )
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("gateway/views.py", "import firmware_sim.fleet", "The core never imports the simulator"),
        (
            "gateway/mqtt/routing.py",
            "import dashboard.consumers",
            "Protocol servers know nothing about devices or dashboards",
        ),
        (
            "gateway/serial/framing.py",
            "from devices.telemetry import parsing",
            "Protocol servers know nothing about devices or dashboards",
        ),
        (
            "devices/conventions/tasmota.py",
            "import aiomqtt",
            "Consumers know nothing about sockets",
        ),
        ("dashboard/consumers.py", "import socket", "Consumers know nothing about sockets"),
        (
            "gateway/modbus/server.py",
            "from devices.conventions import modbus",
            "Protocol servers know nothing about devices or dashboards",
        ),
        (
            "devices/conventions/modbus.py",
            "import pymodbus.client",
            "Consumers know nothing about sockets",
        ),
        (
            "devices/telemetry/store.py",
            "from devices.commands import service",
            "Device rooms: conventions over commands over telemetry",
        ),
        ("devices/views.py", "import alerts.rules", "Devices know nothing about alerts"),
    ],
)
def test_a_broken_rule_is_reported(copy_of_the_tree: Path, module: str, line: str, contract: str):
    path = copy_of_the_tree / module
    path.write_text(path.read_text() + f"\n{line}  # the violation under test\n")
    result = lint_imports(copy_of_the_tree)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
