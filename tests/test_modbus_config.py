"""Modbus configs, profiles and point decoding: what a unit's registers mean, and hostile input.

Register maps under test are the shipped profiles (devices/conventions/modbus_profiles/), each
citing its manufacturer's register table. Raw words below are what those devices send: the
SDM120's voltage as an IEEE 754 float32, high word first (230.5 V = 0x4366 0x8000); the
XY-MD02's temperature as a signed int16 in tenths of a degree (-5.3 °C = 0xFFCB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devices.conventions.modbus_codec import PointError, decode_blocks, encode_write
from gateway.modbus.config import ConfigError, load_configs, parse_config
from gateway.modbus.profile import MAX_REGISTERS, Point, ProfileError, load_profile, read_plan

ROOT = Path(__file__).resolve().parent.parent
DIRS = [ROOT / "devices" / "conventions" / "modbus_profiles"]


def bus(**overrides):
    unit = {"unit": 1, "device": "meter-1", "profile": "eastron-sdm120", "interval": 1.0}
    data = {"port": "/dev/ttyUSB0", "baudrate": 9600, "units": [unit]}
    data.update(overrides)
    return {"buses": [data]}


def test_the_contract_example_parses():
    (parsed,) = parse_config(
        {
            "buses": [
                {
                    "port": "tcp://10.0.0.5:502",
                    "baudrate": 9600,
                    "parity": "N",
                    "stopbits": 1,
                    "timeout": 0.5,
                    "units": [{"unit": 1, "device": "meter-1", "profile": "eastron-sdm120"}],
                }
            ]
        },
        "cfg",
        DIRS,
    )
    assert parsed.tcp == ("10.0.0.5", 502)
    assert parsed.units[0].profile.name == "eastron-sdm120"
    assert parsed.units[0].interval == 1.0


def test_sdm120_float32_voltage_and_energy():
    profile = load_profile("eastron-sdm120", DIRS)
    blocks = [
        {"table": "input", "address": 0, "registers": [0x4366, 0x8000]},  # 230.5 V
        {"table": "input", "address": 70, "registers": [0x4248, 0, 0x41C8, 0, 0, 0]},
    ]
    metrics = decode_blocks(profile.points, blocks)
    assert metrics == {
        "voltage": 230.5,
        "frequency": 50.0,
        "import_energy": 25.0,
        "export_energy": 0.0,
    }


def test_xy_md02_int16_tenths():
    profile = load_profile("xy-md02", DIRS)
    metrics = decode_blocks(
        profile.points, [{"table": "input", "address": 1, "registers": [0xFFCB, 456]}]
    )
    assert metrics == {"temperature": -5.3, "humidity": 45.6}


def test_word_and_byte_order():
    point = Point("x", "holding", 0, "int32", word_order="little", byte_order="little")
    # 0x01020304 with swapped words and swapped bytes: [0x0403, 0x0201]
    assert decode_blocks(
        [point], [{"table": "holding", "address": 0, "registers": [0x0403, 0x0201]}]
    ) == {"x": 0x01020304}


def test_writes_encode_with_scale_and_refuse_nonsense():
    profile = load_profile("xy-md02", DIRS)
    assert encode_write(profile.point("temperature_correction"), -1.5) == ("holding", 259, [0xFFF1])
    with pytest.raises(PointError):
        encode_write(profile.point("temperature"), 1)  # not writable
    with pytest.raises(PointError):
        encode_write(profile.point("temperature_correction"), 1e9)  # does not fit int16
    relay = load_profile("waveshare-relay-8ch", DIRS)
    assert encode_write(relay.point("relay3"), True) == ("coil", 2, [True])
    with pytest.raises(PointError):
        encode_write(relay.point("relay3"), "maybe")


def test_contiguous_points_merge_within_125_registers():
    points = [Point(f"p{i}", "holding", i * 2, "float32") for i in range(100)]
    blocks = read_plan(points)
    assert [b.count for b in blocks] == [124, 76]
    assert all(b.count <= MAX_REGISTERS for b in blocks)
    assert read_plan(
        [Point("a", "input", 0, "uint16"), Point("b", "input", 5, "uint16")]
    ) != read_plan([Point("a", "input", 0, "uint16"), Point("b", "input", 1, "uint16")])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], "exactly one key"),
        ({"buses": []}, "non-empty"),
        (bus(port=""), "'port'"),
        (bus(port="tcp://"), "tcp://host"),
        (bus(parity="X"), "parity"),
        (bus(baudrate=-1), "baudrate"),
        (bus(timeout=0), "timeout"),
        (bus(units=[]), "units"),
        (bus(units=[{"unit": 0, "device": "a", "profile": "xy-md02"}]), "'unit'"),
        (bus(units=[{"unit": 300, "device": "a", "profile": "xy-md02"}]), "'unit'"),
        (bus(units=[{"unit": 1, "device": "a b", "profile": "xy-md02"}]), "'device'"),
        (bus(units=[{"unit": 1, "device": "a", "profile": "nope"}]), "unknown profile 'nope'"),
        (bus(units=[{"unit": 1, "device": "a", "profile": "../../etc/passwd"}]), "cannot read"),
        (bus(units=[{"unit": 1, "device": "a", "profile": "xy-md02", "interval": 0}]), "interval"),
        (bus(units=[{"unit": 1, "device": "a", "profile": "xy-md02", "oops": 1}]), "unknown keys"),
        (
            bus(
                units=[
                    {"unit": 1, "device": "a", "profile": "xy-md02"},
                    {"unit": 1, "device": "b", "profile": "xy-md02"},
                ]
            ),
            "twice",
        ),
    ],
)
def test_hostile_configs_are_refused_with_a_clear_error(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(config, "cfg.json", DIRS, Path("/nonexistent"))


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"name": "x", "points": []}, "non-empty"),
        ({"name": "x", "points": [{"name": "a", "table": "input", "address": 70000}]}, "address"),
        (
            {
                "name": "x",
                "points": [{"name": "a", "table": "input", "address": 65535, "type": "float32"}],
            },
            "runs past",
        ),
        (
            {
                "name": "x",
                "points": [{"name": "a", "table": "input", "address": 0, "writable": True}],
            },
            "writable",
        ),
        (
            {
                "name": "x",
                "points": [{"name": "a", "table": "coil", "address": 0, "type": "float32"}],
            },
            "bool",
        ),
        (
            {"name": "x", "points": [{"name": "a", "table": "input", "address": 0, "scale": 0}]},
            "not be 0",
        ),
        (
            {
                "name": "x",
                "points": [{"name": "a", "table": "input", "address": 0, "type": "int128"}],
            },
            "type",
        ),
        (
            {
                "name": "x",
                "points": [
                    {"name": "a", "table": "input", "address": 0},
                    {"name": "a", "table": "input", "address": 1},
                ],
            },
            "twice",
        ),
    ],
)
def test_hostile_profiles_are_refused(tmp_path, profile, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(ProfileError, match=message):
        load_profile(str(path), DIRS)


def test_files_across_configs_may_not_share_a_port_or_device(tmp_path):
    one, two = tmp_path / "a.json", tmp_path / "b.json"
    one.write_text(json.dumps(bus()))
    two.write_text(json.dumps(bus()))
    with pytest.raises(ConfigError, match="configured twice"):
        load_configs([str(one), str(two)], DIRS)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_configs([str(tmp_path / "bad.json")], DIRS)


def test_simulator_lists_the_shipped_profiles():
    out = subprocess.run(
        [sys.executable, "-m", "firmware_sim", "modbus", "--list-profiles"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == sorted(p.stem for p in DIRS[0].glob("*.json"))
    assert {"eastron-sdm120", "xy-md02", "waveshare-relay-8ch"} <= set(out)


def test_a_profile_path_is_taken_relative_to_the_config_file(tmp_path):
    profile = json.loads((DIRS[0] / "xy-md02.json").read_text())
    profile["name"] = "my-probe"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "my-probe.json").write_text(json.dumps(profile))
    config = bus(units=[{"unit": 3, "device": "p-3", "profile": "profiles/my-probe.json"}])
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    (parsed,) = load_configs([str(tmp_path / "cfg.json")], DIRS)
    assert parsed.units[0].profile.name == "my-probe"


@pytest.mark.parametrize(
    "command", [["rungateway", "--port", "0"], ["runserial"]], ids=["rungateway", "runserial"]
)
def test_a_bad_config_stops_the_start_with_its_reason(tmp_path, command):
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps(bus(parity="X")))
    result = subprocess.run(
        [sys.executable, "manage.py", *command, "--modbus", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"},
    )
    assert result.returncode != 0
    assert "parity" in result.stderr and "cfg.json" in result.stderr, result.stderr[-2000:]
