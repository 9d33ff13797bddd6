"""The real gateway as a child process, for end-to-end tests.

`GatewayProcess` makes a fresh database, migrates it, starts `manage.py rungateway` (or `runmqtt`)
on a free port, waits until it is ready, and on exit stops it with SIGTERM, asserting that it is
gone within 5 s. It logs in over real HTTP and opens the dashboard WebSocket with the session
cookie, as a browser would. `postgres_database()` lends a throwaway PostgreSQL database (on a
cluster of the test session's own); `run_on_postgres()` runs a script on one in a child process.

Over 400 lines on purpose: every end-to-end suite drives the gateway through this one harness
(start, readiness, login, WebSocket, history, rename, stop), so none of them copies it.
"""

from __future__ import annotations

import atexit
import contextlib
import http.cookiejar
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.servers import Mosquitto, Postgres, free_port
from tests.support.timing import allowance

ROOT = Path(__file__).resolve().parents[2]
#: Variables of the developer's shell that must not leak into the gateway under test.
SCRUBBED = ("DATABASE_URL", "REDIS_URL", "MQTT_URL", "SERIAL_PORTS", "GATEWAY_ID", "METRICS_TOKEN")
STOP_SECONDS = 5.0


class GatewayFailed(AssertionError):
    """The gateway did not start, answer or stop as expected; the message has its log tail."""


class GatewayProcess:
    """`manage.py rungateway` (default) or `runmqtt`, or `uvicorn` (the web tier alone), as a
    subprocess with its own database."""

    def __init__(
        self,
        mqtt_url: str,
        *,
        env: Mapping[str, str] | None = None,
        database_url: str | None = None,
        redis_url: str | None = None,
        port: int | None = None,
        command: str = "rungateway",
        args: Sequence[str] = (),
        wait_mqtt: bool = True,
        ready_log: str | None = None,
        ready_timeout: float = 30.0,
        log_level: str = "INFO",
    ) -> None:
        self.mqtt_url = mqtt_url
        self.command = command
        self.args = list(args)
        self.port = port or free_port()
        self.wait_mqtt = wait_mqtt
        self.ready_log = ready_log
        self.ready_timeout = ready_timeout
        self.gateway_id = f"test-{secrets.token_hex(4)}"
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-e2e-"))
        self.log_path = self.workdir / "gateway.log"
        self.database_url = database_url or f"sqlite:///{self.workdir / 'db.sqlite3'}"
        self.env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        self.env.update(
            {
                "DATABASE_URL": self.database_url,
                "GATEWAY_ID": self.gateway_id,
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
                "GATEWAY_LOG_LEVEL": log_level,
                "MQTT_URL": mqtt_url,
                "PYTHONUNBUFFERED": "1",
                "DJANGO_SETTINGS_MODULE": "gateway.settings",
            }
        )
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.shutdown_seconds: float | None = None

    def beside(
        self, command: str, *args: str, env: Mapping[str, str] | None = None
    ) -> GatewayProcess:
        """Another process of this deployment (`runserial`, `runmqtt`): the same broker, database,
        Redis, GATEWAY_ID and secret key (one environment, as deployed); not started."""
        return GatewayProcess(
            self.mqtt_url,
            command=command,
            args=args,
            database_url=self.database_url,
            redis_url=self.env.get("REDIS_URL"),
            env={
                "GATEWAY_ID": self.gateway_id,
                "DJANGO_SECRET_KEY": self.env["DJANGO_SECRET_KEY"],
                **(env or {}),
            },
        )

    # --- lifecycle ----------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def status_topic(self) -> str:
        """The gateway's own retained status topic (docs/interface.md §3)."""
        return f"gateway/{self.gateway_id}/status"

    def manage(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run another `manage.py` command against the same database; returns its output."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise GatewayFailed(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout + result.stderr

    def start(self, migrate: bool = True) -> None:
        """Migrate (unless told not to: a restart), start the process and wait until ready."""
        if migrate:
            self.manage("migrate", "--no-input", "-v", "0", timeout=120)
        cmd = [sys.executable, "manage.py", self.command]
        if self.command == "rungateway":
            cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--mqtt", self.mqtt_url, *self.args]
        if self.command == "uvicorn":  # the web tier alone (docs/interface.md §1)
            cmd = [sys.executable, "-m", "uvicorn", "gateway.asgi:application"]
            cmd += ["--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until /healthz answers (with mqtt connected when asked) or the ready log line shows."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            self._check_alive()
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise GatewayFailed(f"gateway not ready after {self.ready_timeout}s\n{self.tail()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        if self.ready_log is not None or self.command not in ("rungateway", "uvicorn"):
            return bool(re.search(self.ready_log or "bridge running", self.log_text()))
        try:
            status, body = self.http_get("/healthz")
        except OSError:
            return False
        if not self.wait_mqtt:
            return True
        return isinstance(body, dict) and body.get("mqtt") == "connected"

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise GatewayFailed(f"gateway exited with {self.proc.returncode}\n{self.tail()}")

    def stop(self, limit: float | None = None) -> int:
        """SIGTERM, then assert the process is gone within `limit` seconds (the documented
        `STOP_SECONDS`, stretched on a loaded machine: tests/support/timing.py); its exit code."""
        limit = allowance(STOP_SECONDS) if limit is None else limit
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        if proc.poll() is not None:
            return proc.returncode
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            tail = self.tail()
            raise GatewayFailed(f"gateway still running {limit}s after SIGTERM\n{tail}") from None
        self.shutdown_seconds = time.monotonic() - started
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown at all (the broker then publishes the gateway's Last Will)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> GatewayProcess:
        try:
            self.start()
        except BaseException:
            self.kill()
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                sys.stderr.write(f"--- gateway log tail ---\n{self.tail()}\n")
                self.kill()
            else:
                code = self.stop()
                if code != 0:
                    raise GatewayFailed(f"gateway exited with {code} after SIGTERM\n{self.tail()}")
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- logs ---------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Block until a log line matches `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            self._check_alive()
            if time.monotonic() > deadline:
                raise GatewayFailed(f"no log line matching {pattern!r}\n{self.tail()}")
            time.sleep(0.05)

    # --- users and HTTP -----------------------------------------------------------------
    def create_user(
        self, username: str, password: str, *, staff: bool = True, perms: Sequence[str] = ()
    ) -> None:
        """Create (or reset) a user in the gateway's database; perms are "app_label.codename"."""
        script = (
            "import json, os\n"
            "from django.contrib.auth import get_user_model\n"
            "from django.contrib.auth.models import Permission\n"
            "spec = json.loads(os.environ['GW_TEST_USER'])\n"
            "user, _ = get_user_model().objects.get_or_create(username=spec['username'])\n"
            "user.is_staff = spec['staff']\n"
            "user.set_password(spec['password'])\n"
            "user.save()\n"
            "for perm in spec['perms']:\n"
            "    app, codename = perm.split('.', 1)\n"
            "    user.user_permissions.add(\n"
            "        Permission.objects.get(content_type__app_label=app, codename=codename))\n"
        )
        spec = {"username": username, "password": password, "staff": staff, "perms": list(perms)}
        env = {**self.env, "GW_TEST_USER": json.dumps(spec)}
        result = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise GatewayFailed(f"create_user failed:\n{result.stderr[-3000:]}")

    def rename_device(self, device_id: str, name: str) -> None:
        """Set the admin-editable `Device.name` in the gateway's database (waits for the device)."""
        script = (
            "import json, os, time\n"
            "from devices.models import Device\n"
            "spec = json.loads(os.environ['GW_RENAME'])\n"
            "for _ in range(200):\n"
            "    if Device.objects.filter(id=spec['id']).update(name=spec['name']):\n"
            "        break\n"
            "    time.sleep(0.05)\n"
            "else:\n"
            "    raise SystemExit('no device ' + spec['id'])\n"
        )
        self.env["GW_RENAME"] = json.dumps({"id": device_id, "name": name})
        try:
            self.manage("shell", "-c", script)
        finally:
            self.env.pop("GW_RENAME", None)

    def login(self, username: str, password: str) -> str:
        """Log in through /accounts/login/; returns the Cookie header (session + CSRF)."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(f"{self.base_url}/accounts/login/", timeout=10) as resp:
            resp.read()
        csrf = next((c.value for c in jar if c.name == "csrftoken"), None)
        if csrf is None:
            raise GatewayFailed("the login page set no csrftoken cookie")
        form = urllib.parse.urlencode(
            {"username": username, "password": password, "csrfmiddlewaretoken": csrf, "next": "/"}
        ).encode()
        request = urllib.request.Request(
            f"{self.base_url}/accounts/login/",
            data=form,
            headers={"Referer": f"{self.base_url}/accounts/login/"},
        )
        with opener.open(request, timeout=10) as resp:
            resp.read()
        cookies = {c.name: c.value for c in jar}
        if "sessionid" not in cookies:
            raise GatewayFailed(f"login as {username!r} failed (no session cookie)")
        return "; ".join(f"{k}={v}" for k, v in cookies.items())

    def http_request(
        self,
        method: str,
        path: str,
        *,
        cookie: str | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One HTTP request; returns (status, parsed JSON or text). Never raises on 4xx/5xx."""
        all_headers = dict(headers or {})
        data = None
        if cookie:
            all_headers["Cookie"] = cookie
            csrf = re.search(r"csrftoken=([^;]+)", cookie)
            if csrf and method not in ("GET", "HEAD"):
                all_headers["X-CSRFToken"] = csrf.group(1)
                all_headers.setdefault("Referer", f"{self.base_url}/")
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=all_headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, _decode(resp.read(), resp.headers.get_content_type())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read(), err.headers.get_content_type())

    def http_get(self, path: str, cookie: str | None = None) -> tuple[int, Any]:
        """GET path; (status, JSON or text)."""
        return self.http_request("GET", path, cookie=cookie)

    def history(self, cookie: str, device: str, metric: str) -> list[list[float]]:
        """A device's stored points of `metric` from the history API ([] while it is unknown)."""
        status, body = self.http_get(f"/api/devices/{device}/telemetry?metric={metric}", cookie)
        if status == 404:  # not written yet
            return []
        assert status == 200, body
        return body["points"]

    def ws_connect(self, cookie: str, path: str = "/ws/dashboard/", **kwargs: Any) -> Any:
        """A websockets client connection (use with `async with`) carrying cookie and Origin."""
        from websockets.asyncio.client import connect
        from websockets.typing import Origin

        return connect(
            f"ws://127.0.0.1:{self.port}{path}",
            additional_headers={"Cookie": cookie},
            origin=Origin(self.base_url),
            open_timeout=10,
            **kwargs,
        )

    def metric(self, name: str, labels: str = "") -> float:
        """A sample's value from /metrics (0.0 when the series does not exist yet)."""
        status, text = self.http_get("/metrics")
        if status != 200:
            raise GatewayFailed(f"/metrics answered {status}")
        series = f"{name}{{{labels}}}" if labels else name
        for line in str(text).splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0


def _decode(raw: bytes, content_type: str) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if content_type == "application/json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


# --- PostgreSQL ---------------------------------------------------------------------------
_postgres: Postgres | None = None


def split_deployment(
    mqtt_url: str, database_url: str, redis_url: str, env: Mapping[str, str] | None = None
) -> Callable[..., GatewayProcess]:
    """A factory of one split deployment's processes (`runmqtt` bridges, `uvicorn` web tiers)
    on one broker, database and Redis; a bridge is ready once it has subscribed."""

    def process(command: str, *args: str, **extra_env: str) -> GatewayProcess:
        return GatewayProcess(
            mqtt_url,
            command=command,
            args=args,
            database_url=database_url,
            redis_url=redis_url,
            env={**(env or {}), **extra_env},
            ready_log="MQTT bridge subscribed" if command == "runmqtt" else None,
        )

    return process


def postgres_admin_url() -> str:
    """The tests' PostgreSQL admin URL: a throwaway cluster started once per test session.

    ``GATEWAY_TEST_POSTGRES`` (an admin URL) points the tests at an existing server instead.
    Without PostgreSQL installed this raises, naming the package: the tests fail, never skip.
    """
    global _postgres
    external = os.environ.get("GATEWAY_TEST_POSTGRES")
    if external:
        return external
    if _postgres is None:
        server = Postgres()
        server.start()
        atexit.register(server.__exit__, None, None, None)
        _postgres = server
    return _postgres.url


@contextlib.contextmanager
def postgres_database(admin_url: str | None = None) -> Iterator[str]:
    """A uniquely named empty database for one test; yields its DATABASE_URL, drops it after."""
    import psycopg

    admin_url = admin_url or postgres_admin_url()
    name = f"gateway_test_{secrets.token_hex(6)}"
    with psycopg.connect(_dsn(admin_url, "postgres"), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _dsn(admin_url, name)
    finally:
        with psycopg.connect(
            _dsn(admin_url, "postgres"), autocommit=True, connect_timeout=5
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_on_postgres(script: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `script` in a child Python with Django set up on a throwaway, migrated database.

    The script's stdout/stderr come back as text; the database is dropped afterwards.
    """
    with postgres_database() as url:
        return run_django_child(script, url, timeout)


def run_on_sqlite(script: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`run_on_postgres` on a throwaway SQLite file (the gateway's settings: WAL, IMMEDIATE)."""
    with tempfile.TemporaryDirectory(prefix="gateway-sqlite-") as directory:
        return run_django_child(script, f"sqlite:///{directory}/db.sqlite3", timeout)


def run_django_child(
    script: str, database_url: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """`script` in a child Python with Django set up on `database_url`, migrated first."""
    setup = (
        "import django\n"
        "django.setup()\n"
        "from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0)\n"
    )
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "gateway.settings",
    }
    return subprocess.run(
        [sys.executable, "-c", setup + script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _dsn(admin_url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.contextmanager
def operator_and_viewer(password: str) -> Iterator[tuple[Mosquitto, GatewayProcess]]:
    """A broker and a gateway with a staff `operator` and a plain `viewer` (both `password`)."""
    with Mosquitto() as broker, GatewayProcess(broker.url) as gw:
        gw.create_user("operator", password, staff=True)
        gw.create_user("viewer", password, staff=False)
        yield broker, gw
