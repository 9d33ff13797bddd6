"""Wall-clock bounds for tests on a shared machine: the documented figure, stretched under load."""

from __future__ import annotations

import os

#: Never stretch a bound by more than this, however loaded the machine.
MAX_STRETCH = 4.0


def allowance(promised: float) -> float:
    """`promised` seconds while the machine is no busier than its cores, else stretched.

    The suite shares a 2-core machine with other work: a child process that waits for a core
    misses a documented bound through no fault of its own. The 1-minute load average per core
    (at least 1, at most `MAX_STRETCH`, or `GATEWAY_TEST_STRETCH` when set) multiplies the bound,
    so an idle machine checks the documented figure itself. Timing figures are the bench's job;
    a test asserts a bound only where the docs promise one.
    """
    fixed = os.environ.get("GATEWAY_TEST_STRETCH")
    if fixed:
        return promised * float(fixed)
    load_per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return promised * min(MAX_STRETCH, max(1.0, load_per_core))
