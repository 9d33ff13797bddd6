"""The embedded MQTT broker behind `rungateway --embedded-broker`.

When nothing answers at the broker URL, start one there: `mosquitto` as a child process when
the binary exists (anonymous, loopback only, config in a temp dir), else an in-process `amqtt`
broker (MQTT 3.1.1 only). When a broker already answers, it is used as it is.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Literal, Protocol

from gateway.exceptions import GatewayError
from gateway.mqtt.url import BrokerURL, parse_broker_url

logger = logging.getLogger("gateway.broker")

BrokerKind = Literal["auto", "mosquitto", "amqtt"]
#: `GATEWAY_EMBEDDED_BROKER=amqtt` forces the in-process broker even where mosquitto exists.
KIND_ENV = "GATEWAY_EMBEDDED_BROKER"
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerStartError(GatewayError):
    """The embedded broker could not be started (address not loopback, port taken, crash)."""


class EmbeddedBroker(Protocol):
    """A broker this process started; `protocol` is the newest MQTT version it speaks."""

    kind: str
    url: BrokerURL
    protocol: Literal["v5", "v311"]

    async def stop(self) -> None: ...


async def probe(host: str, port: int, wait: float = 0.5) -> bool:
    """True when something accepts TCP connections at host:port within `wait` seconds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: the only places an anonymous broker may bind."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


async def ensure_broker(url: str, kind: BrokerKind | None = None) -> EmbeddedBroker | None:
    """Start a broker at `url` unless one answers there; None means an existing one is used."""
    broker_url = parse_broker_url(url)
    if await probe(broker_url.host, broker_url.port):
        logger.info("a broker already answers at %s; using it", broker_url)
        return None
    if broker_url.tls:
        raise BrokerStartError(f"no broker at {broker_url}, and the embedded broker has no TLS")
    if not is_loopback(broker_url.host):
        raise BrokerStartError(
            f"no broker at {broker_url}; the embedded broker binds loopback addresses only"
        )
    kind = kind or os.environ.get(KIND_ENV, "auto") or "auto"  # type: ignore[assignment]
    if kind not in ("auto", "mosquitto", "amqtt"):
        raise BrokerStartError(f"{KIND_ENV} must be auto, mosquitto or amqtt, not {kind!r}")
    binary = mosquitto_binary()
    if kind == "mosquitto" and binary is None:
        raise BrokerStartError("mosquitto is not installed (apt-get install mosquitto)")
    if kind != "amqtt" and binary is not None:
        broker: EmbeddedBroker = await MosquittoBroker.start(broker_url, binary)
    else:
        broker = await AmqttBroker.start(broker_url)
    logger.info("embedded broker started: %s at %s", broker.kind, broker.url)
    return broker


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when this process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class MosquittoBroker:
    """mosquitto as a child process in its own session.

    Its own session keeps a terminal's Ctrl+C (sent to the whole foreground process group)
    from killing it before the gateway has published its retained ``offline``.
    """

    kind = "mosquitto"
    protocol: Literal["v5", "v311"] = "v5"

    def __init__(self, url: BrokerURL, proc: asyncio.subprocess.Process, workdir: Path) -> None:
        self.url = url
        self.proc = proc
        self.workdir = workdir

    @classmethod
    async def start(cls, url: BrokerURL, binary: str, wait: float = 10.0) -> MosquittoBroker:
        """Write a config, start mosquitto, and wait until it accepts connections."""
        workdir = Path(tempfile.mkdtemp(prefix="gateway-mosquitto-"))
        host = "127.0.0.1" if url.host == "localhost" else url.host
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {url.port} {host}\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        log = open(workdir / "mosquitto.log", "wb")  # noqa: ASYNC230 - a local file, once
        try:
            proc = await asyncio.create_subprocess_exec(
                binary, "-c", str(conf),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        finally:
            log.close()
        broker = cls(url, proc, workdir)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not await probe(url.host, url.port, wait=0.2):
            if proc.returncode is not None or loop.time() > deadline:
                tail = broker.log_tail()
                await broker.stop()
                raise BrokerStartError(f"mosquitto did not start on {url}: {tail}")
            await asyncio.sleep(0.05)
        return broker

    def log_tail(self, chars: int = 2000) -> str:
        """The end of mosquitto's log, for error messages."""
        try:
            return (self.workdir / "mosquitto.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self) -> None:
        """Terminate mosquitto (kill after 3 s) and remove its temp dir."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 3.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        logger.info("embedded mosquitto stopped")


class AmqttBroker:
    """An amqtt broker in this process's event loop (MQTT 3.1.1; no shared subscriptions)."""

    kind = "amqtt"
    protocol: Literal["v5", "v311"] = "v311"

    def __init__(self, url: BrokerURL, broker: object) -> None:
        self.url = url
        self.broker = broker

    @classmethod
    async def start(cls, url: BrokerURL) -> AmqttBroker:
        """Start amqtt listening on the URL's host and port, anonymous clients allowed."""
        from amqtt.broker import Broker

        # amqtt and its state machine log every connection at INFO; keep them to warnings.
        for name in ("amqtt", "transitions"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        host = "127.0.0.1" if url.host == "localhost" else url.host
        bind = f"[{host}]:{url.port}" if ":" in host else f"{host}:{url.port}"
        config = {
            "listeners": {"default": {"type": "tcp", "bind": bind}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as exc:
            raise BrokerStartError(f"amqtt did not start on {url}: {exc}") from exc
        return cls(url, broker)

    async def stop(self) -> None:
        """Shut the in-process broker down."""
        try:
            await asyncio.wait_for(self.broker.shutdown(), 3.0)  # type: ignore[attr-defined]
        except Exception:
            logger.exception("amqtt broker shutdown failed")
        logger.info("embedded amqtt stopped")
