"""Bench-only experiments, applied inside the gateway process at start-up (never in production).

``python -m bench --experiment NAME`` puts this directory on the gateway's PYTHONPATH and sets
``BENCH_EXPERIMENTS=NAME,…``; Python imports this module at start-up. Each experiment shows
what a fix the profile points at would buy, before anyone changes the gateway's own code.

- ``amortized-clean``: channels' ``InMemoryChannelLayer._clean_expired`` walks every channel and
  every group on each ``group_send`` and ``receive`` (O(devices) per fan-out); run it at most
  once a second instead (messages expire after 60 s, so nothing is kept noticeably longer).
- ``no-deflate``: uvicorn without permessage-deflate on WebSockets.
- ``gc-thresholds``: the cyclic garbage collector's young generation collected every 20,000
  allocations instead of 700, so per-message objects die before a collection sees them and
  fewer reach the old generation, whose full walks grow with the live device instances.
- ``no-ha-discovery``: the gateway started with ``HA_DISCOVERY=0`` (no Home Assistant
  discovery documents; applied by ``bench/harness.py``, not here).
- ``right-sized-json``: ``orjson.dumps`` results copied into exactly sized bytes. orjson's own
  keep a 4 KiB allocation however short they are, so a long-lived one (the Home Assistant
  discovery consumer remembers each device's last document) costs 4 KiB per device.
- ``device-rows-per-second``: the telemetry writer upserts a device's row at most once a
  second (updates in between are skipped, so the row's latest metrics lag: pricing only). At
  10,000 devices every reading otherwise carries its own device upsert.
- ``tracemalloc``: trace Python allocations from SIGUSR1 on (the bench sends it before the
  scaling runs; tracing from start-up makes Django's start too slow); on SIGUSR2 the gateway
  writes the top allocation sites (``bench/profiles/tracemalloc-<pid>.txt``), with the time
  spent in each garbage-collector generation since SIGUSR1.
- ``cprofile``: cProfile on the event-loop thread over the measured messages of a scaling
  run (SIGUSR1 after first contact has settled, SIGUSR2 at its end; use one
  ``--scale-devices``); ``bench/profiles/cprofile-<pid>.prof`` and ``.txt``, the top
  functions by own and by inclusive time. py-spy needs the peer's virtualenv; this does not.
- ``gc-time``: the garbage collector's collections and time per generation over the same
  span as ``cprofile`` (``bench/profiles/gc-<pid>.txt``), without a profiler's overhead.
- ``stall-trace``: every event-loop callback that runs over 2 ms, with its wall and thread CPU
  time, the time the loop's thread waited on a run queue for a core (Linux schedstat; the
  rest of wall − CPU is waiting for the GIL) and the garbage collections that
  ran inside it, written on exit to ``bench/profiles/stalls-<pid>.txt``: where the loop lag
  (``gateway_event_loop_lag_seconds``) comes from.
- ``switch-interval``: the GIL switch interval the gateway sets (``gateway/switching.py``,
  0.5 ms) replaced by ``BENCH_SWITCH_INTERVAL`` seconds (default 0.005, Python's own): what
  the shorter interval buys.
- ``per-row-adapt``: the telemetry writer adapts every reading's timestamp for the database
  with Django's adaptation again, as before ``_reading_params`` converted each distinct one
  once (with
  ``switch-interval`` at 0.005: the write path of before the latency work, to compare).
(``fast-properties``, sharing paho's Properties tables, was one; it is now in
``gateway/mqtt/server.py``.)
"""

from __future__ import annotations

import os
import time

_EXPERIMENTS = set(filter(None, os.environ.get("BENCH_EXPERIMENTS", "").split(",")))


def _amortize_clean() -> None:
    from channels.layers import InMemoryChannelLayer

    original = InMemoryChannelLayer._clean_expired

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now >= getattr(self, "_bench_next_clean", 0.0):
            self._bench_next_clean = now + 1.0
            original(self)

    InMemoryChannelLayer._clean_expired = _clean_expired


def _no_deflate() -> None:
    import uvicorn.config

    init = uvicorn.config.Config.__init__

    def __init__(self, *args, **kwargs) -> None:
        kwargs["ws_per_message_deflate"] = False
        init(self, *args, **kwargs)

    uvicorn.config.Config.__init__ = __init__


def _tracemalloc() -> None:
    import gc
    import signal
    import tracemalloc
    from pathlib import Path

    gc_time = [0.0, 0.0, 0.0]
    gc_count = [0, 0, 0]
    started = [0.0]

    def gc_timer(phase, info) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif started[0]:
            gc_time[info["generation"]] += time.perf_counter() - started[0]
            gc_count[info["generation"]] += 1

    def start(signum, frame) -> None:
        tracemalloc.start(1)
        gc.callbacks.append(gc_timer)

    def dump(signum, frame) -> None:
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("lineno")
        out = Path(__file__).resolve().parents[1] / "profiles" / f"tracemalloc-{os.getpid()}.txt"
        out.parent.mkdir(exist_ok=True)
        total = sum(stat.size for stat in stats)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        lines = [f"traced {total / 2**20:.1f} MiB in {len(stats)} sites, peak {peak:.1f} MiB"]
        lines += [
            f"gc generation {g}: {gc_count[g]} collections, {gc_time[g]:.3f} s" for g in range(3)
        ] + [f"gc objects now: {len(gc.get_objects())}"]
        lines += [f"{s.size / 2**20:8.2f} MiB {s.count:9d} {s.traceback[0]}" for s in stats[:60]]
        out.write_text("\n".join(lines) + "\n")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)


def _cprofile() -> None:
    import cProfile
    import io
    import pstats
    import signal
    from pathlib import Path

    profiler = cProfile.Profile()

    def start(signum, frame) -> None:
        profiler.enable()

    def dump(signum, frame) -> None:
        profiler.disable()
        out = Path(__file__).resolve().parents[1] / "profiles" / f"cprofile-{os.getpid()}"
        out.parent.mkdir(exist_ok=True)
        profiler.dump_stats(f"{out}.prof")
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(60)
        Path(f"{out}.txt").write_text(text.getvalue())

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)


def _gc_time() -> None:
    import gc
    import signal
    from pathlib import Path

    totals = [[0, 0.0] for _ in range(3)]
    state = {"on": False, "started": 0.0}

    def timer(phase, info) -> None:
        if not state["on"]:
            return
        if phase == "start":
            state["started"] = time.perf_counter()
        else:
            totals[info["generation"]][0] += 1
            totals[info["generation"]][1] += time.perf_counter() - state["started"]

    def start(signum, frame) -> None:
        state["on"] = True

    def dump(signum, frame) -> None:
        state["on"] = False
        out = Path(__file__).resolve().parents[1] / "profiles" / f"gc-{os.getpid()}.txt"
        out.parent.mkdir(exist_ok=True)
        lines = [f"generation {g}: {n} collections, {t:.3f} s" for g, (n, t) in enumerate(totals)]
        lines.append(f"tracked objects now: {len(gc.get_objects())}")
        out.write_text("\n".join(lines) + "\n")

    gc.callbacks.append(timer)
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)


def _gc_thresholds() -> None:
    import gc

    gc.set_threshold(20_000, 10, 10)


def _right_sized_json() -> None:
    import orjson

    dumps = orjson.dumps

    def right_sized(*args, **kwargs) -> bytes:
        return bytes(memoryview(dumps(*args, **kwargs)))

    orjson.dumps = right_sized


def _after_import(name: str, patch) -> None:
    """Call `patch(module)` once `name` has been imported (it needs Django's apps first)."""
    import importlib.abc
    import importlib.util
    import sys

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            loader = spec.loader
            exec_module = loader.exec_module

            def patched(module) -> None:
                exec_module(module)
                patch(module)

            loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, Finder())


def _device_rows_per_second() -> None:
    def patch(store) -> None:
        upsert = store.upsert_devices
        written: dict[str, float] = {}

        def upsert_devices(updates, using) -> None:
            now = time.monotonic()
            due = {d: u for d, u in updates.items() if now - written.get(d, -10.0) >= 1.0}
            for device_id in due:
                written[device_id] = now
            upsert(due, using)

        store.upsert_devices = upsert_devices

    _after_import("devices.telemetry.store", patch)


def _switch_interval(module) -> None:
    module.SWITCH_INTERVAL = float(os.environ.get("BENCH_SWITCH_INTERVAL", "0.005"))


def _per_row_adapt() -> None:
    def patch(store) -> None:
        def _reading_params(rows, stamp):
            from django.db import connection

            adapt = connection.ops.adapt_datetimefield_value
            return [(d, metric, adapt(store._dt(ts)), v) for d, metric, ts, v in rows]

        store._reading_params = _reading_params

    _after_import("devices.telemetry.store", patch)


def _stall_trace() -> None:
    import asyncio.events
    import atexit
    import gc
    from pathlib import Path

    slow: list[tuple[float, float, float, float, str, list[tuple[int, float]]]] = []
    collections: list[tuple[int, float]] = []  # (generation, seconds) during the callback
    gc_start = [0.0]

    def gc_timer(phase, info) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            collections.append((info["generation"], time.perf_counter() - gc_start[0]))

    gc.callbacks.append(gc_timer)
    run = asyncio.events.Handle._run

    schedstat: list[int] = []  # the loop thread's /proc schedstat, opened on first use

    def queued() -> float:
        """Seconds this thread has waited on a run queue for a core (Linux schedstat)."""
        if not schedstat:
            schedstat.append(os.open("/proc/thread-self/schedstat", os.O_RDONLY))
        return int(os.pread(schedstat[0], 64, 0).split()[1]) / 1e9

    def _run(self) -> None:
        collections.clear()
        wall, cpu, runq = time.perf_counter(), time.thread_time(), queued()
        run(self)
        wall = time.perf_counter() - wall
        if wall > 0.002:
            cpu, runq = time.thread_time() - cpu, queued() - runq
            task = getattr(self._callback, "__self__", None)
            what = repr(task.get_coro()) if isinstance(task, asyncio.Task) else repr(self)
            slow.append((time.time(), wall, cpu, runq, what[:300], list(collections)))

    asyncio.events.Handle._run = _run

    def dump() -> None:
        out = Path(__file__).resolve().parents[1] / "profiles" / f"stalls-{os.getpid()}.txt"
        out.parent.mkdir(exist_ok=True)
        lines = [
            f"{at:.3f} wall {w * 1e3:6.1f} ms cpu {c * 1e3:6.1f} ms waiting for a core "
            f"{q * 1e3:6.1f} ms, else (the GIL) {(w - c - q) * 1e3:6.1f} ms gc {gcs} {what}"
            for at, w, c, q, what, gcs in slow
        ]
        total = [sum(x[k] for x in slow) * 1e3 for k in (1, 2, 3)]
        lines.append(
            f"total over {len(slow)} callbacks > 2 ms: wall {total[0]:.0f} ms, "
            f"cpu {total[1]:.0f} ms, waiting for a core {total[2]:.0f} ms, "
            f"else {total[0] - total[1] - total[2]:.0f} ms"
        )
        out.write_text("\n".join(lines) + "\n")

    atexit.register(dump)


if "amortized-clean" in _EXPERIMENTS:
    _amortize_clean()
if "no-deflate" in _EXPERIMENTS:
    _no_deflate()
if "tracemalloc" in _EXPERIMENTS:
    _tracemalloc()
if "cprofile" in _EXPERIMENTS:
    _cprofile()
if "gc-time" in _EXPERIMENTS:
    _gc_time()
if "gc-thresholds" in _EXPERIMENTS:
    _gc_thresholds()
if "right-sized-json" in _EXPERIMENTS:
    _right_sized_json()
if "device-rows-per-second" in _EXPERIMENTS:
    _device_rows_per_second()
if "stall-trace" in _EXPERIMENTS:
    _stall_trace()
if "switch-interval" in _EXPERIMENTS:
    _after_import("gateway.switching", _switch_interval)
if "per-row-adapt" in _EXPERIMENTS:
    _per_row_adapt()
