"""The README's first command, `bin/run`, from a clean state: its printed login works, a real
WebSocket client sees the simulated fleet (native, Tasmota, serial) and a command is acked,
and SIGINT stops everything. Isolated: its own SQLite file, secret-key file, broker port and
HTTP port; never port 1883 or the developer's db.sqlite3."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.gateway import ROOT, SCRUBBED, GatewayProcess
from tests.support.servers import free_port, nothing_listens, require_binary, wait_for_port

pytestmark = pytest.mark.timeout(180)

DEADLINE = 60.0  # seconds from launch until the fleet is seen and a command is acked
STOP_LIMIT = 10.0


class Output:
    """The demo's merged stdout/stderr, read by a thread, searchable while it runs."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            with self.changed:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def text(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, deadline: float, proc: subprocess.Popen[bytes]) -> re.Match:
        """The first match of `pattern` in the output, waiting until `deadline` (monotonic)."""
        regex = re.compile(pattern)
        with self.changed:
            while True:
                match = regex.search("\n".join(self.lines))
                if match:
                    return match
                if proc.poll() is not None and not self.thread.is_alive():
                    raise AssertionError(f"demo exited ({proc.returncode}):\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {pattern!r} in the demo's output:\n{self.tail()}")
                self.changed.wait(0.2)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


def processes_mentioning(needle: str) -> list[str]:
    """Command lines of live processes that contain `needle` (orphan check)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


async def watch(ws, started: float) -> dict:
    """Read dashboard frames until ≥10 devices (Tasmota and serial among them) sent telemetry,
    then command a Tasmota device and wait for its ack; returns what was seen and when."""
    snapshot = json.loads(await ws.recv())
    assert snapshot["type"] == "snapshot"
    seen: dict[str, float] = {}
    while not (
        len(seen) >= 10 and any(d.startswith("tasmota-") for d in seen) and "serial-1" in seen
    ):
        frame = json.loads(await ws.recv())
        if frame["type"] == "telemetry" and frame["metrics"]:
            seen.setdefault(frame["device"], time.monotonic() - started)
    target = sorted(d for d in seen if d.startswith("tasmota-"))[0]
    ref = secrets.token_hex(4)
    await ws.send(
        json.dumps(
            {
                "type": "command",
                "device": target,
                "name": "Power",
                "args": {"value": "TOGGLE"},
                "ref": ref,
            }
        )
    )
    command_id = None
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "error":
            raise AssertionError(f"command refused: {frame}")
        if frame["type"] != "command":
            continue
        if frame.get("ref") == ref:
            command_id = frame["id"]
        if frame["id"] == command_id and frame["status"] in ("acked", "failed", "timeout"):
            return {"seen": seen, "command": frame, "acked_after": time.monotonic() - started}


def run_demo(
    tmp_path: Path,
    mqtt_url: str,
    *,
    redis_url: str | None = None,
    ctrl_c: bool,
    root: Path = ROOT,
    logged_in: Callable[[str, str, int], None] | None = None,
    deadline_s: float = DEADLINE,
    env_extra: dict[str, str] | None = None,
) -> str:
    """Launch `root`'s `bin/run` isolated in `tmp_path`, check the acceptance scenario, stop it
    with SIGINT (to the process, or to its whole process group as a terminal's Ctrl-C does) and
    check that everything exited; returns the demo's output. `logged_in(user, password, port)`
    runs once the printed login has been seen; `env_extra` is added to its environment.
    Outside this checkout (`root` a fresh clone) the database and secret key are the clone's
    own defaults, as a newcomer gets them."""
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in (*SCRUBBED, "DJANGO_SECRET_KEY")}
    env.update(
        {
            "MQTT_URL": mqtt_url,
            "GATEWAY_ID": f"demo-test-{secrets.token_hex(4)}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if root == ROOT:  # never the developer's db.sqlite3 or .secret_key
        env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
        env["GATEWAY_SECRET_KEY_FILE"] = str(tmp_path / "secret_key")
    else:  # nothing of this checkout's virtualenv leaks into the clone's own
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "GATEWAY_SECRET_KEY_FILE"):
            env.pop(name, None)
        venv = str(ROOT / ".venv")
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(venv)
        )
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(env_extra or {})
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(root / "bin" / "run"), "--port", str(http_port)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, like a shell job
    )
    out = Output(proc)
    client = GatewayProcess(mqtt_url, port=http_port)  # only its HTTP/WebSocket helpers
    try:
        deadline = started + deadline_s
        url = out.wait_for(r"demo: dashboard\s+(\S+)", deadline, proc).group(1)
        assert url == f"http://127.0.0.1:{http_port}/"
        login = out.wait_for(r"Dashboard login \(\w+\): (\S+) / (\S+)", deadline, proc)
        user, password = login.group(1), login.group(2)
        assert len(password) >= 12
        assert out.text().count(password) == 1  # printed once
        cookie = client.login(user, password)
        if logged_in is not None:
            logged_in(user, password, http_port)

        async def scenario() -> dict:
            async with asyncio.timeout(deadline - time.monotonic()):
                async with client.ws_connect(cookie) as ws:
                    return await watch(ws, started)

        result = asyncio.run(scenario())
        seen, command = result["seen"], result["command"]
        assert command["status"] == "acked", command
        assert command["result"] in ({"POWER": "ON"}, {"POWER": "OFF"})
        assert any(d.startswith("sim-") for d in seen)
        first = min(seen.values())
        print(
            f"demo: first telemetry {first:.1f} s after launch, {len(seen)} devices by "
            f"{max(seen.values()):.1f} s, command acked at {result['acked_after']:.1f} s"
        )

        stop_began = time.monotonic()
        if ctrl_c:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(STOP_LIMIT)
        stopped_after = time.monotonic() - stop_began
        out.thread.join(5)
        print(f"demo: stopped {stopped_after:.2f} s after SIGINT")
        assert code == 0, out.tail()
        text = out.text()
        assert re.search(r"demo: stopped in [\d.]+ s \(gateway exit code 0\)", text), out.tail()
        assert "Traceback" not in text, out.tail(200)
        # No orphans: nothing serves the HTTP port, no process names our broker URL.
        assert nothing_listens(http_port), "something still listens"
        assert processes_mentioning(f"--port {http_port}") == []
        return text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.thread.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        client._cleanup()


def test_bin_run_demo_end_to_end(tmp_path):
    """From nothing: the embedded broker starts at MQTT_URL and goes away with the demo."""
    mqtt_port = free_port()
    text = run_demo(tmp_path, f"mqtt://127.0.0.1:{mqtt_port}", ctrl_c=False)
    assert "embedded broker started" in text and "InMemoryChannelLayer" in text
    assert nothing_listens(mqtt_port), "something still listens"
    assert processes_mentioning(f"127.0.0.1:{mqtt_port}") == []


def test_bin_run_demo_with_existing_broker_and_redis(tmp_path, mosquitto, redis_server):
    """MQTT_URL and REDIS_URL point at running services: used as they are, left running, and
    the broker holds the same retained messages afterwards (the demo says so and cleans up);
    Ctrl-C as a terminal sends it (SIGINT to the whole process group) stops the demo."""
    from firmware_sim.demo import retained_topics

    subprocess.run(
        [require_binary("mosquitto_pub", "mosquitto-clients"), "-p", str(mosquitto.port)]
        + ["-t", "home/keep", "-m", "x", "-r"],
        check=True,
    )
    text = run_demo(tmp_path, mosquitto.url, redis_url=redis_server.url, ctrl_c=True)
    assert "embedded broker started" not in text
    assert "RedisPubSubChannelLayer" in text
    wait_for_port(mosquitto.port, timeout=1)  # our broker is still there
    assert "a broker already answers at" in text
    assert re.search(r"demo: removed [1-9]\d* retained messages", text), text[-2000:]
    assert asyncio.run(retained_topics(mosquitto.url)) == {"home/keep"}, "as it was before"
