"""`gateway_event_loop_lag_seconds` (docs/interface.md §5.5): a stalled loop shows on /metrics,
the runner samples from start-up to shutdown; and the GIL switch interval the app sets."""

from __future__ import annotations

import asyncio
import sys
import time

from prometheus_client import REGISTRY

from gateway.looplag import start_loop_lag_sampler, stop_loop_lag_sampler
from gateway.runner import GatewayRunner
from gateway.switching import SWITCH_INTERVAL, tune_switch_interval
from tests.support.waiting import eventually

LAG = "gateway_event_loop_lag_seconds"


def samples(le: str = "+Inf") -> float:
    """Samples taken so far whose lag was at most `le` seconds ("+Inf": all of them)."""
    return REGISTRY.get_sample_value(f"{LAG}_bucket", {"le": le}) or 0.0


async def next_samples(count: int, after: float) -> None:
    """Wait until the sampler took `count` more samples than `after`."""
    await eventually(lambda: samples() >= after + count, what=f"{count} more loop-lag samples")


async def test_a_stalled_loop_is_counted_in_a_high_bucket():
    task = start_loop_lag_sampler(interval=0.01)
    try:
        await next_samples(2, samples())  # running
        total, quick = samples(), samples("0.05")
        time.sleep(0.2)  # noqa: ASYNC251 - the stall under test: nothing else runs meanwhile
        await next_samples(1, total)
        # The sample the stall delayed woke ≥ 0.19 s late: above the 0.05 s bucket.
        assert samples() - samples("0.05") >= 1 + (total - quick)
    finally:
        await stop_loop_lag_sampler(task)
    assert task.cancelled()


async def test_the_runner_samples_from_startup_to_shutdown():
    runner = GatewayRunner(web=False, bridges={})
    serving = asyncio.create_task(runner.serve())
    await asyncio.wait_for(runner.started.wait(), 10)
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "gateway.looplag" in names
    await next_samples(1, samples())  # it observes while the gateway runs
    runner.request_shutdown()
    assert await asyncio.wait_for(serving, 10) == 0
    assert "gateway.looplag" not in {t.get_name() for t in asyncio.all_tasks()}


def test_switch_interval_is_lowered_and_a_shorter_one_kept():
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        tune_switch_interval()
        assert sys.getswitchinterval() == SWITCH_INTERVAL < 0.005
        sys.setswitchinterval(SWITCH_INTERVAL / 2)
        tune_switch_interval()
        assert sys.getswitchinterval() == SWITCH_INTERVAL / 2
    finally:
        sys.setswitchinterval(before)


def test_the_asgi_application_sets_it():
    import gateway.asgi  # noqa: F401 - imported for its start-up effect

    assert sys.getswitchinterval() <= SWITCH_INTERVAL
