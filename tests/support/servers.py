"""Real broker and Redis processes on free loopback ports, which tests may stop and restart."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nothing_listens(port: int, host: str = "127.0.0.1") -> bool:
    """True when a connection to host:port is refused at once (no process listens there)."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on host:port (used only in fixtures)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if not path:
        raise RuntimeError(f"{name} not found: install it with `apt-get install {package}`")
    return path


class ServerProcess:
    """A child server bound to a fixed port, so it can be stopped and started again there."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        log = open(self.workdir / "log.txt", "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Mosquitto(ServerProcess):
    """mosquitto on 127.0.0.1:<port>, anonymous; by default it keeps nothing across a restart.

    `config` adds lines for the listener (e.g. `cafile`, `certfile`, `keyfile`,
    `require_certificate true`, `password_file …`); `anonymous=False` refuses clients without
    credentials; `tls=True` makes `url` an `mqtts://` one. Without `keep_state` persistence is
    off, so `stop()`/`start()` or `kill()`/`start()` gives a broker that comes back empty
    (sessions, queued QoS 1 messages and retained messages gone), whoever runs the tests.
    `keep_state=True` persists them in a folder mosquitto can write (started as root it drops
    to its own user, which cannot write a root-only folder), as on a deployed broker: all of it
    on `stop()`, and every 2 s (`autosave_interval 1`, checked on whole seconds), so that a
    `kill()` (a crash) loses only what changed since the last save (`saved_at()`).
    """

    name = "mosquitto"

    def __init__(
        self,
        *,
        config: str = "",
        anonymous: bool = True,
        tls: bool = False,
        keep_state: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.anonymous = anonymous
        self.tls = tls
        self.keep_state = keep_state
        if keep_state:
            self.workdir.chmod(0o777)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def state_file(self) -> Path:
        """Where a broker with `keep_state` saves its state."""
        return self.workdir / "mosquitto.db"

    def saved_at(self) -> int:
        """The state file's modification time in ns (0 before the first save)."""
        try:
            return self.state_file.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        persistence = (
            f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1\n"
            if self.keep_state
            else "persistence false\n"
        )
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{self.config.strip()}\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            "set_tcp_nodelay true\n"
            f"{persistence}"
            "max_queued_messages 100000\n"
            "log_type error\nlog_type warning\n"
        )
        return [require_binary("mosquitto", "mosquitto"), "-c", str(conf)]


class Redis(ServerProcess):
    """redis-server on 127.0.0.1:<port>, nothing kept on disk."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            require_binary("redis-server", "redis-server"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]


class Postgres(ServerProcess):
    """A throwaway PostgreSQL cluster on 127.0.0.1:<port>: initdb once, trust auth, no fsync.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user
    that Debian's package creates, and its programs run as that user. `stop()`/`start()`
    restart the same cluster; `kill()` is a crash (SIGKILL), after which `start()` recovers.
    """

    name = "postgres"

    def __init__(self) -> None:
        super().__init__()
        self.bindir = postgres_bindir()
        self.data = self.workdir / "data"
        self._user: tuple[int, int] | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self._user = (entry.pw_uid, entry.pw_gid)
            os.chown(self.workdir, *self._user)
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            preexec_fn=self._drop_privileges,
        )

    @property
    def url(self) -> str:
        """The admin URL (database ``postgres``, user ``postgres``)."""
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _drop_privileges(self) -> None:
        if self._user:
            os.setgid(self._user[1])
            os.setuid(self._user[0])

    def command(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.workdir}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]

    def start(self) -> None:
        log = open(self.workdir / "log.txt", "ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=self._drop_privileges,
        )
        log.close()
        wait_for_port(self.port, timeout=30)
        self.wait_accepting(timeout=30)

    def wait_accepting(self, timeout: float) -> None:
        """Block until a session can be opened (the port opens before start-up or recovery ends)."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def postgres_bindir() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name)
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL not found: install it with `apt-get install postgresql`")
