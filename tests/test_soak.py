"""The soak, short: `python -m bench soak --minutes 2` must pass (RSS flat, no QoS 1 loss).

1,000 simulated devices at 500 msg/s in all (100 of them at QoS 1) through the real gateway on
the channels-redis layer, with one broker restart and one Redis restart; bench/soak.py says
what is measured. Deselect with ``-m 'not soak'``; the 30-minute form is the bench command.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.gateway import ROOT

pytestmark = [pytest.mark.soak, pytest.mark.e2e, pytest.mark.timeout(400)]


def test_two_minute_soak_keeps_rss_flat_and_loses_no_qos1_reading():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "soak", "--minutes", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "soak: OK" in result.stdout
