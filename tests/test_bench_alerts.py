"""`python -m bench alerts --quick` runs end to end, so its row never rots, and it measures what
it says: both rows ran with the 1,000 rules loaded (the one rule that holds raised its 100
alerts in each). Figures are not asserted (timing on a shared machine)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.gateway import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(150)
def test_bench_alerts_quick_prints_both_rows_with_the_rules_loaded():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "alerts", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1,000 alert rules")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        assert "100 alerts active" in row, row
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "µs" in cells[1] and cells[2].startswith("rules disabled: "), row
    assert rows[0].rstrip(" |").endswith(("met", "MISSED")), rows[0]
