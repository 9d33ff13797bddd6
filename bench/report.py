"""The bench's one table: every figure beside its baseline from the same run, and its target."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

import psutil

Figures = dict[str, Any]


def machine() -> str:
    """One line about where the figures come from."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, {mem:.0f} GiB, load average before the run {load}"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _rate(value: float) -> str:
    return f"{value:,.0f} msg/s"


@dataclass
class Table:
    """Rows of (figure, gateway, baseline, ratio, target, verdict); `render()` lines them up."""

    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)

    def add(self, figure: str, value: str, baseline: str, ratio: str, target: str, ok) -> None:
        """One row; `ok` is True/False, or None when there is no target to judge."""
        verdict = "-" if ok is None else ("met" if ok else "MISSED")
        self.rows.append((figure, value, baseline, ratio, target, verdict))

    def ingest(self, layer: str, qos: int, res: Figures, bare: Figures | None, goal: float):
        """Ingest rate (100 devices, stored + on the dashboard) against bare aiomqtt."""
        ratio = res["rate"] / bare["rate"] if bare else None
        self.add(
            f"ingest QoS {qos}, {layer} ({res['messages']:,} msgs)",
            f"{_rate(res['rate'])}, {res['cpu_us']:.0f} µs CPU/msg",
            f"bare aiomqtt {_rate(bare['rate'])}, {bare['cpu_us']:.0f} µs/msg" if bare else "n/a",
            f"{ratio:.2f}×" if ratio else "",
            f"≥ {goal}× bare",
            None if ratio is None else ratio >= goal,
        )

    def discovered(self, res: Figures, native: Figures | None) -> None:
        """Ingest through discovered entities (templates) against the native path, same run."""
        ratio = res["rate"] / native["rate"] if native else None
        self.add(
            f"ingest QoS 0, discovered entities + value_template ({res['messages']:,} msgs)",
            f"{_rate(res['rate'])}, {res['cpu_us']:.0f} µs CPU/msg",
            f"native {_rate(native['rate'])}, {native['cpu_us']:.0f} µs/msg" if native else "n/a",
            f"{ratio:.2f}×" if ratio else "",
            "≥ 0.8× native",
            None if ratio is None else ratio >= 0.8,
        )

    def peer(self, res: Figures, peer: Figures | None) -> None:
        """The in-memory QoS 0 rate against mqttasgi 2.0.0 on the same workload."""
        if peer is None:
            return
        ratio = res["rate"] / peer["rate"] if peer["rate"] else float("inf")
        self.add(
            "ingest QoS 0 vs the peer",
            _rate(res["rate"]),
            f"mqttasgi 2.0.0 {_rate(peer['rate'])} ({peer['delivered']:,}/{peer['messages']:,}"
            f" in {peer['seconds']:.0f} s), {peer['cpu_us']:.0f} µs/msg",
            f"{ratio:.0f}×",
            "≥ 100× mqttasgi",
            ratio >= 100,
        )

    def commands(self, res: Figures) -> None:
        """Command round trip through the gateway against the bare MQTT round trip."""
        if "error" in res:
            self.add("command round trip p50/p99", "n/a", res["error"][:60], "", "-", None)
            return
        self.add(
            "command round trip p50/p99",
            f"{_ms(res['p50'])} / {_ms(res['p99'])} (p50 `pending` at "
            f"{_ms(res['pending_p50'])}, `sent` at {_ms(res['sent_p50'])})",
            f"MQTT only {_ms(res['base_p50'])} / {_ms(res['base_p99'])}",
            "",
            "-",
            None,
        )

    def rss(self, devices: int, rss: float, start: float) -> None:
        """Resident memory once `devices` devices are known."""
        self.add(
            f"RSS with {devices:,} known devices",
            f"{rss:.0f} MiB",
            f"{start:.0f} MiB just started",
            "",
            "≤ 150 MB",
            rss * 1.048576 <= 150,
        )

    def idle(self, res: Figures) -> None:
        """Idle CPU with 100 quiet devices against no devices at all."""
        self.add(
            "idle CPU, 100 quiet devices",
            f"{res['quiet']:.2f} % of a core",
            f"{res['empty']:.2f} % with no devices",
            "",
            "< 1 %",
            res["quiet"] < 1.0,
        )

    def render(self) -> str:
        """The table as GitHub-flavoured Markdown (readable in a terminal too)."""
        head = ("figure", "gateway", "baseline (same run)", "ratio", "target", "")
        rows = [head, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = []
        for index, row in enumerate(rows):
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
            if index == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)
