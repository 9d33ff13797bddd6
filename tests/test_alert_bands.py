"""Many rules on one metric cost one band check per reading (alerts/rules.py `quiet_band`): the
band is exactly the values for which no rule without an open alert holds, and a device's open
alerts are still judged on every reading whatever the band says."""

from __future__ import annotations

import math
import time

import pytest
from channels.db import database_sync_to_async
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.hooks import start_evaluator
from alerts.models import AlertRule, Op
from alerts.rules import CompiledRule, quiet_band
from devices.telemetry.pipeline import get_pipeline
from tests.support.alerts import AlertFrames

thresholds = st.floats(-1e6, 1e6, allow_nan=False)


@st.composite
def compiled_rules(draw) -> CompiledRule:
    op = draw(st.sampled_from([Op.ABOVE, Op.BELOW, Op.OUTSIDE, Op.EQUALS]))
    low = draw(thresholds)
    high = draw(st.floats(low, 1e6)) if op == Op.OUTSIDE else None
    return CompiledRule(
        id=draw(st.integers(1, 10**6)), name="r", pattern="d", metric="m", op=op,
        threshold=low, threshold_high=high, hysteresis=draw(st.floats(0, 10)), for_seconds=0.0,
        severity="warning", notify_urls=[],
    )  # fmt: skip


@settings(max_examples=1000)
@given(
    st.lists(compiled_rules(), max_size=12),
    st.one_of(thresholds, st.just(math.nan), st.just(math.inf), st.just(-math.inf)),
    st.integers(0, 11),
    st.sampled_from([-1.0, -1e-9, 0.0, 1e-9, 0.5, 1.0]),
    st.booleans(),
)
def test_a_value_is_in_the_quiet_band_exactly_when_no_rule_holds(rules, value, pick, nudge, near):
    if near and rules:  # values at and next to a threshold, where a band is most likely wrong
        rule = rules[pick % len(rules)]
        edge = rule.threshold_high if rule.threshold_high is not None and pick % 2 else None
        value = (edge if edge is not None else rule.threshold) + nudge
    lo, hi, equal = quiet_band(rules)
    quiet = lo <= value <= hi and value not in equal
    holds = [r for r in rules if r.check(value, False) is True]
    if math.isnan(value):
        assert not quiet  # never skipped: judged rule by rule (none holds for NaN)
    else:
        assert quiet == (not holds), (value, (lo, hi, equal), holds)


def test_the_bands_edges_belong_to_it():
    rules = [
        CompiledRule(1, "a", "d", "m", Op.ABOVE, 30.0, None, 0.0, 0.0, "info", []),
        CompiledRule(2, "b", "d", "m", Op.BELOW, 0.0, None, 0.0, 0.0, "info", []),
        CompiledRule(3, "c", "d", "m", Op.EQUALS, 7.0, None, 0.0, 0.0, "info", []),
    ]
    assert quiet_band(rules) == (0.0, 30.0, frozenset({7.0}))
    assert quiet_band([]) == (-math.inf, math.inf, frozenset())


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
async def test_an_open_alert_is_judged_while_the_other_rules_stay_quiet(layer, dashboard):
    frames = AlertFrames(layer, dashboard)
    make = database_sync_to_async(AlertRule.objects.create)
    hot = await make(name="hot", device="freezer-*", metric="temp", op="above", threshold=-10.0)
    for i in range(20):  # rules that never hold on this freezer's values
        await make(name=f"quiet {i}", device="freezer-*", metric="temp", op="below",
                   threshold=-100.0 - i)  # fmt: skip
    cold = await make(name="cold", device="freezer-1", metric="temp", op="below", threshold=-30.0)
    evaluator = start_evaluator()
    await evaluator.wait_ready()

    def reading(value: float) -> None:
        get_pipeline().submit_reading("freezer-1", "mqtt", time.time(), {"temp": value})

    reading(-5.0)  # above -10: outside the band of every rule without an alert
    raised = await frames.next()
    assert (raised["rule"], raised["state"]) == (hot.id, "active")
    reading(-18.0)  # inside the band of the untracked rules; the open one is judged and ends
    cleared = await frames.next()
    assert (cleared["id"], cleared["state"]) == (raised["id"], "cleared")
    reading(-31.0)  # the band moved back: "hot" has no alert now, "cold" holds
    second = await frames.next()
    assert (second["rule"], second["state"]) == (cold.id, "active")
