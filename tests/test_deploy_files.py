"""deploy/: the systemd units are valid, and units, compose file and env example agree.

The units, the compose file and the image all run the same commands with the same variables,
and the env example names every variable the gateway reads (docs/interface.md §2 and the rest of
gateway/settings.py), so an operator who copies it has every knob in front of them.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").iterdir())
PREFIX = "/opt/gateway/.venv/bin/"
INTERFACE_VARIABLES = {
    "MQTT_URL",
    "REDIS_URL",
    "DATABASE_URL",
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
    "DJANGO_ALLOWED_HOSTS",
    "SERIAL_PORTS",
    "GATEWAY_ID",
}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A unit file's `Key=value` lines (systemd allows repeated keys), sections ignored."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if match:
            found.setdefault(match[1], []).append(match[2])
    return found


def unit_commands() -> dict[str, str]:
    """Each unit's ExecStart (services only)."""
    return {
        path.name: unit_settings(path)["ExecStart"][0]
        for path in UNITS
        if path.suffix == ".service"
    }


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def gateway_services() -> dict[str, dict]:
    """The compose services that run the gateway's image."""
    services = compose()["services"]
    return {name: s for name, s in services.items() if s.get("image", "").startswith("mqtt-")}


def env_example_variables() -> set[str]:
    """Variables the env example sets or shows commented out with their default."""
    text = (DEPLOY / "gateway.env.example").read_text()
    return set(re.findall(r"(?m)^#? ?([A-Z][A-Z0-9_]+)=", text))


def settings_variables() -> set[str]:
    """Every environment variable gateway/settings.py reads."""
    text = (ROOT / "gateway" / "settings.py").read_text()
    pattern = r'(?:env_\w+|environ\.get|getenv)\(\s*"([A-Z][A-Z0-9_]+)"'
    return set(re.findall(pattern, text))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path):
    """`systemd-analyze verify` on every unit, /opt/gateway pointing at this checkout's venv."""
    opt = tmp_path / "opt"
    (opt / ".venv" / "bin").mkdir(parents=True)
    for program in ("python", "uvicorn"):
        (opt / ".venv" / "bin" / program).symlink_to(Path(sys.executable).parent / program)
    units = tmp_path / "units"
    units.mkdir()
    for path in UNITS:
        (units / path.name).write_text(path.read_text().replace("/opt/gateway", str(opt)))
    result = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in units.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_units_run_the_contract_commands_from_one_install():
    commands = unit_commands()
    assert commands == {
        "gateway.service": f"{PREFIX}python manage.py rungateway --host 0.0.0.0 --port 8000",
        "gateway-web.service": f"{PREFIX}uvicorn gateway.asgi:application --host 0.0.0.0 "
        "--port 8000 --workers 2 --proxy-headers",
        "gateway-bridge@.service": f"{PREFIX}python manage.py runmqtt --shared-group gateway",
        "gateway-prune.service": f"{PREFIX}python manage.py prune_telemetry",
        "gateway-serial.service": f"{PREFIX}python manage.py runserial",
    }
    for path in UNITS:
        if path.suffix == ".service":
            unit = unit_settings(path)
            assert unit["WorkingDirectory"] == ["/opt/gateway"], path.name
            assert unit["EnvironmentFile"] == ["/etc/gateway/gateway.env"], path.name
            assert unit["User"] == ["gateway"], path.name
    timer = unit_settings(DEPLOY / "systemd" / "gateway-prune.timer")
    assert timer["Unit"] == ["gateway-prune.service"] and timer["Persistent"] == ["true"]
    # Every bridge instance gets its own stable id, hence its own broker session.
    bridge = unit_settings(DEPLOY / "systemd" / "gateway-bridge@.service")
    assert "GATEWAY_BRIDGE_ID=bridge-%i" in bridge["Environment"]


def test_compose_runs_the_units_commands_with_the_same_variables():
    services = gateway_services()
    assert {"migrate", "web", "bridge-1", "bridge-2", "prune"} <= set(services)
    commands = unit_commands()
    by_service = {name: s["command"] for name, s in services.items()}
    assert by_service["web"] == commands["gateway-web.service"]
    assert by_service["bridge-1"] == by_service["bridge-2"] == commands["gateway-bridge@.service"]
    assert commands["gateway-prune.service"] in by_service["prune"]
    migrate = unit_settings(DEPLOY / "systemd" / "gateway-web.service")["ExecStartPre"]
    assert by_service["migrate"] in migrate
    bridges = [s for name, s in services.items() if name.startswith("bridge")]
    assert {s["environment"]["GATEWAY_BRIDGE_ID"] for s in bridges} == {"bridge-1", "bridge-2"}
    # The image's default command is the all-in-one unit's.
    cmd = re.search(r"(?m)^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text())
    assert cmd and " ".join(yaml.safe_load(cmd[1])) == commands["gateway.service"]
    # Variables the compose file sets are ones the gateway reads and the env example shows.
    documented = env_example_variables()
    for name, service in services.items():
        assert service["env_file"] == "gateway.env", name
        assert set(service["environment"]) <= documented, name


def test_env_example_names_every_variable_the_gateway_reads():
    documented = env_example_variables()
    assert INTERFACE_VARIABLES <= documented, INTERFACE_VARIABLES - documented
    missing = settings_variables() - documented
    assert not missing, f"add to deploy/gateway.env.example: {sorted(missing)}"
    # and nothing there the gateway does not read
    unknown = documented - settings_variables() - {"GATEWAY_EMBEDDED_BROKER"}
    assert not unknown, f"not read by gateway/settings.py: {sorted(unknown)}"
    for path in UNITS:
        for assignment in unit_settings(path).get("Environment", []):
            for word in shlex.split(assignment):
                assert word.split("=", 1)[0] in documented, (path.name, word)
