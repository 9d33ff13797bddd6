"""The cost rows: the gateway's CPU per message and ingest rate against a bare
aiomqtt subscriber speaking MQTT 3.1.1 (the target's baseline) and one speaking v5, both from
the same run, at 2 and at 15 values per message, and at each fleet size.

Both subscribers get the gateway's workload: the same publisher, payloads, QoS and devices;
they parse each JSON payload and stop at the last message (bench/workers.py `bare`).
"""

from __future__ import annotations

from typing import Any

from bench import scenarios
from bench.report import Table

Figures = dict[str, Any]
PROTOCOLS = ("v311", "v5")
LABEL = {"v311": "bare 3.1.1", "v5": "bare v5"}
CPU_GOAL = 1.5  # gateway CPU per message ≤ 1.5× the bare 3.1.1 subscriber's
RATE_GOAL = 0.8  # gateway ingest rate ≥ 0.8× the bare 3.1.1 subscriber's
RICH = 15  # values per message of the "real device" rows (a Tasmota STATE has ~15)
SCALE_GOAL = 1.3  # CPU per message at the largest fleet ≤ 1.3× the 100-device one


def rich_count(ingest: int) -> int:
    """Messages of the 15-values rows: a fifth of the ingest run's, so the values of one run
    (150,000 in a full run) fit the writer's buffer (GATEWAY_TELEMETRY_BUFFER_LIMIT, 200,000)
    that QoS 0 overflows by dropping the oldest values, by design."""
    return max(ingest // 5, 1000)


async def baselines(
    url: str, count: int, *, qos: int = 0, devices: int = 100, metrics: int = 2
) -> dict[str, Figures]:
    """The bare subscriber over both protocols on one workload: {"v311": …, "v5": …}."""
    return {
        protocol: await scenarios.bare(
            url, count, qos, devices=devices, protocol=protocol, metrics=metrics
        )
        for protocol in PROTOCOLS
    }


def _both(base: dict[str, Figures], key: str, fmt: str) -> str:
    return ", ".join(f"{LABEL[p]} {fmt.format(base[p][key])}" for p in PROTOCOLS if p in base)


def cost_rows(table: Table, title: str, res: Figures, base: dict[str, Figures] | None) -> None:
    """Two rows: CPU per message and ingest rate (messages and stored values per second),
    each against both bare subscribers, judged against the 3.1.1 one."""
    metrics = res.get("metrics", 2)
    label = f"{title}, {metrics} values/msg ({res['messages']:,} msgs)"
    if not base or "v311" not in base:
        table.add(f"CPU per message, {label}", f"{res['cpu_us']:.0f} µs", "n/a", "", "-", None)
        return
    v311, v5 = base["v311"], base.get("v5")
    cpu = res["cpu_us"] / v311["cpu_us"]
    table.add(
        f"CPU per message, {label}",
        f"{res['cpu_us']:.0f} µs ({res['loop_us']:.0f} event loop, "
        f"{res['cpu_us'] - res['loop_us']:.0f} writer + other threads)",
        _both(base, "cpu_us", "{:.0f} µs"),
        f"{cpu:.2f}× 3.1.1" + (f" ({res['cpu_us'] / v5['cpu_us']:.2f}× v5)" if v5 else ""),
        f"≤ {CPU_GOAL}× bare 3.1.1",
        cpu <= CPU_GOAL,
    )
    rate = res["rate"] / v311["rate"]
    table.add(
        f"ingest rate, {label}",
        f"{res['rate']:,.0f} msg/s = {res['values_rate']:,.0f} values/s",
        _both(base, "rate", "{:,.0f} msg/s"),
        f"{rate:.2f}× 3.1.1" + (f" ({res['rate'] / v5['rate']:.2f}× v5)" if v5 else ""),
        f"≥ {RATE_GOAL}× bare 3.1.1",
        rate >= RATE_GOAL,
    )


def scaling_rows(
    table: Table, results: dict[int, Figures], base: dict[int, dict[str, Figures]]
) -> None:
    """CPU per message at each fleet size beside both bare subscribers at that size; the
    largest fleet against the smallest, and each against its own 3.1.1 baseline."""
    sizes = sorted(results)
    first = results[sizes[0]]["cpu_us"]
    for devices in sizes:
        res = results[devices]
        cpu = res["cpu_us"]
        last = devices == sizes[-1] and len(sizes) > 1
        own = base.get(devices) or {}
        ratio = f"{cpu / own['v311']['cpu_us']:.2f}× its 3.1.1" if "v311" in own else ""
        if last:
            ratio = "; ".join(
                filter(None, (f"{cpu / first:.2f}× the {sizes[0]:,}-device cost", ratio))
            )
        table.add(
            f"CPU per message, {devices:,} devices",
            f"{cpu:.0f} µs ({res['loop_us']:.0f} event loop; {res['rate']:,.0f} msg/s; "
            f"{res.get('frames_per_message', 0):.3f} dashboard messages/msg; "
            f"first contact {res['first_contact_us'] / 1000:.1f} ms/device)",
            f"{_both(own, 'cpu_us', '{:.0f} µs')} at {devices:,} devices" if own else "n/a",
            ratio,
            f"≤ {SCALE_GOAL}× at {sizes[-1]:,}" if last else "",
            cpu / first <= SCALE_GOAL if last else None,
        )
