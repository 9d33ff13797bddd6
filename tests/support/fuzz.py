"""Shared pieces of the property-based (hypothesis) tests: settings, documented reasons, checks.

`FUZZ_SCALE` (environment, default 1) multiplies every test's example count: the suite runs
small budgets (well under a minute in all); `FUZZ_SCALE=20` searches harder before a release.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from pathlib import Path

from hypothesis import HealthCheck, settings

from devices.telemetry.parsing import FUTURE_SLACK, MAX_METRIC_NAME, MAX_METRICS, MIN_TS, Telemetry

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    """Settings for one property: `max_examples` × FUZZ_SCALE, no deadline (shared CPUs)."""
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def documented_reasons() -> set[str]:
    """The rejection reasons docs/architecture.md ("Rejections") promises, read from the doc."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    section = text.split("### Rejections", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", section)) - {"gateway_messages_rejected_total"}


REASONS = documented_reasons()


def clean_metric_name(name: object) -> bool:
    """A metric name as the contract wants it, written without the product's regex."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_METRIC_NAME
        and all(unicodedata.category(c) != "Cc" for c in name)
    )


def assert_contract_telemetry(t: Telemetry, received_at: float) -> None:
    """What every accepted reading must be (docs/interface.md §3.1, §4; telemetry/parsing.py)."""
    assert math.isfinite(t.ts) and MIN_TS <= t.ts <= received_at + FUTURE_SLACK
    assert 0 < len(t.metrics) <= MAX_METRICS
    for name, value in t.metrics.items():
        assert clean_metric_name(name), name
        assert type(value) is bool or (type(value) is float and math.isfinite(value))
