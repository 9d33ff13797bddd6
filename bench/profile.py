"""``--profile``: sample the gateway with py-spy during one QoS 0 ingest run and summarise it.

The raw collapsed stacks go to ``bench/profiles/ingest-<time>.txt`` (git-ignored; feed them to
any flame-graph tool); the summary printed is the top functions by own and by inclusive time.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time

from bench import scenarios
from bench.harness import ROOT, Dashboard, Meter
from bench.peer import ensure_venv
from tests.support.gateway import GatewayProcess

# Frames every sample of a thread has (start-up, the event loop itself): not findings.
BOILERPLATE = re.compile(
    r"\((manage\.py|django/core/management/|gateway/management/|asyncio/(runners|base_events|"
    r"events)\.py|threading\.py|concurrent/futures/thread\.py)"
)
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarise(raw: str, top: int = 15) -> str:
    """Top functions by own time and by inclusive time, as % of active samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            if not BOILERPLATE.search(frame):
                inclusive[frame] += n
    lines = [f"{total} active samples"]
    for title, counter in (("own time", own), ("inclusive time", inclusive)):
        lines.append(f"-- top {top} by {title}")
        for frame, n in counter.most_common(top):
            lines.append(f"{100 * n / max(total, 1):5.1f} %  {frame}")
    return "\n".join(lines)


async def profile_ingest(
    gateway: GatewayProcess, dash: Dashboard, meter: Meter, count: int, devices: int = 100,
    metrics: int = 2,
) -> str:  # fmt: skip
    """py-spy the gateway while `count` QoS 0 messages (`metrics` values each) from `devices`
    devices go through."""
    spy = ensure_venv() / "py-spy"
    out_dir = ROOT / "bench" / "profiles"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    assert gateway.proc is not None
    pid = gateway.proc.pid
    spies: list[asyncio.subprocess.Process] = []

    async def start_spy() -> None:  # after first contact: the profile is the steady cost
        proc = await asyncio.create_subprocess_exec(
            str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
            "--threads", "-o", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        spies.append(proc)
        await asyncio.sleep(1.0)

    try:
        result = await scenarios.ingest(
            gateway, dash, meter, prefix=f"prof{devices}m{metrics}", devices=devices,
            count=count, steady=start_spy, metrics=metrics,
        )  # fmt: skip
    finally:
        for proc in spies:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
    summary = summarise(out.read_text()) if out.exists() else "py-spy wrote nothing"
    text = (
        f"profile of one QoS 0 ingest ({result['messages']:,} msgs of {metrics} values from "
        f"{devices:,} devices, "
        f"{result['rate']:,.0f} msg/s,"
        f" {result['cpu_us']:.0f} µs/msg under py-spy), raw stacks in {out}\n{summary}"
    )
    print(text, flush=True)
    return text
