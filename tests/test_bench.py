"""`python -m bench --quick` runs end to end and prints its table, so the bench never rots.

It drives real processes (mosquitto, redis-server, the gateway, the bare subscriber); the
mqttasgi peer is skipped here because its virtualenv is built from PyPI on first use.
Figures are not asserted (timing on a shared machine); that every row is there, is.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.gateway import ROOT

pytestmark = pytest.mark.e2e

ROWS = [
    "ingest QoS 0, in-memory",
    "ingest QoS 1, in-memory",
    "ingest QoS 0, channels-redis",
    "ingest QoS 1, channels-redis",
    "latency 1,000 msg/s, 4 metrics/msg, sqlite, in-memory",
    "command round trip p50/p99",
    "CPU per message, 100 devices",
    "CPU per message, 1,000 devices",
    "RSS with 1,000 known devices",
    "idle CPU, 100 quiet devices",
]


@pytest.mark.timeout(150)
def test_bench_quick_prints_every_row():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip", "peer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    for row in ROWS:
        assert any(line.startswith(f"| {row}") for line in table), (row, result.stdout)
    # Every measured row carries a baseline from the same run (n/a only for commands).
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] and cells[2], line
