"""`python -m bench --quick` (and `python -m bench alerts --quick`) run end to end and print
their tables, so the bench never rots.

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


def run_bench(*args: str) -> str:
    """`python -m bench ARGS` to completion (it must succeed); its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.timeout(150)
def test_bench_quick_prints_every_row():
    stdout = run_bench("--quick", "--skip", "peer")
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    for row in ROWS:
        assert any(line.startswith(f"| {row}") for line in table), (row, stdout)
    # Every measured row carries a baseline from the same run (n/a only for commands).
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] and cells[2], line


@pytest.mark.timeout(150)
def test_bench_alerts_quick_prints_both_rows_with_the_rules_loaded():
    """Both alert rows ran with the 1,000 rules loaded: the one rule that holds raised its 100
    alerts in each (bench/alerts.py)."""
    stdout = run_bench("alerts", "--quick")
    rows = [line for line in stdout.splitlines() if line.startswith("| 1,000 alert rules")]
    assert len(rows) == 2, stdout
    for row in rows:
        assert "100 alerts active" in row, row
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "µs" in cells[1] and cells[2].startswith("rules disabled: "), row
    assert rows[0].rstrip(" |").endswith(("met", "MISSED")), rows[0]
