"""The peer row: the same ingest workload through mqttasgi 2.0.0 in a bench-only virtualenv.

The virtualenv (``bench/.venv-mqttasgi``, git-ignored; ``BENCH_PEER_VENV`` overrides) is created on
first use with mqttasgi 2.0.0 and the project's own Django/Channels/paho versions, plus py-spy
for ``--profile``. mqttasgi's receive loop calls ``paho.loop(timeout=0.01)`` and then sleeps
10 ms, which bounds it at roughly one packet per loop turn; so the peer runs for at most
`cap` seconds and its rate is the readings it stored and delivered over the time it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, Meter, publish_args, run_worker

VENV = Path(os.environ.get("BENCH_PEER_VENV", ROOT / "bench" / ".venv-mqttasgi"))
PACKAGES = [
    "mqttasgi==2.0.0",
    "Django==5.2.19",
    "channels==4.3.2",
    "paho-mqtt==2.2.0",
    "py-spy",
]


def ensure_venv() -> Path:
    """The peer virtualenv's bin directory, creating and filling it on first use."""
    bin_dir = VENV / "bin"
    if (bin_dir / "mqttasgi").exists() and (bin_dir / "py-spy").exists():
        return bin_dir
    print(f"bench: creating {VENV} (mqttasgi 2.0.0, py-spy) …", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", *PACKAGES],
        check=True,
        timeout=600,
    )
    return bin_dir


async def run_peer(url: str, *, count: int, cap: float, qos: int = 0) -> dict[str, float]:
    """Publish `count` messages from 100 devices through mqttasgi; its rate and CPU/message
    over the messages it stored and delivered."""
    bin_dir = await asyncio.to_thread(ensure_venv)
    port = url.rsplit(":", 1)[1]
    workdir = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)},
        "BENCH_EXPECT": str(count),
        "BENCH_QOS": str(qos),
        "BENCH_PEER_DB": str(workdir / "peer.sqlite3"),
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        str(bin_dir / "mqttasgi"), "-H", "127.0.0.1", "-p", port, "-i", "bench-peer",
        "bench.peer_app:PeerConsumer",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"mqttasgi peer did not start: {line!r}")
        await asyncio.sleep(1.0)  # its subscription goes out on the next 10 ms loop turn
        meter = Meter(proc.pid)
        cpu0 = meter.cpu()
        pub = await run_worker(*publish_args(url, prefix="peer", devices=100, count=count, qos=qos))
        deadline = pub["start"] + cap
        done, last_t = 0, pub["start"]
        while done < count:
            timeout = deadline - time.time()
            if timeout <= 0:
                break
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            except TimeoutError:
                break
            if not line:
                break
            _, n, t = line.split()
            done, last_t = int(n), float(t)
        cpu = meter.cpu() - cpu0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = max(last_t - pub["start"], 1e-6)
    return {
        "rate": done / elapsed,
        "cpu_us": 1e6 * cpu / max(done, 1),
        "delivered": done,
        "messages": count,
        "seconds": elapsed,
    }
