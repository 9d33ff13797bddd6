"""Run the web tier and the bridges in one process and one event loop.

`rungateway` and `runmqtt` build a `GatewayRunner` and call `run()`. Sharing one loop is what
lets the in-memory channel layer carry device events to dashboards without Redis.

Lifecycle in three beats (as uvicorn `Server.serve`): startup (bind the HTTP socket, start the
bridges) → main loop (wait for SIGTERM/SIGINT, restart a bridge that crashed) → shutdown, within
`shutdown_timeout` seconds: stop accepting HTTP, shut the bridges down (the MQTT bridge
publishes its retained ``offline``), then run the shutdown hooks (flush pending telemetry).
A second signal during shutdown cancels whatever is still running.

Over 400 lines on purpose: one runner, startup to shutdown, and the few helpers every
management command shares to build it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from typing import Any, Protocol

import uvicorn

from gateway import runtime
from gateway.looplag import start_loop_lag_sampler, stop_loop_lag_sampler
from gateway.mqtt.url import parse_broker_url

logger = logging.getLogger("gateway.runner")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Backoff before restarting a bridge whose serve() raised: doubles per crash up to the max.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0

#: Called once at shutdown, after the bridges stopped, with the seconds it may take.
ShutdownHook = Callable[[float], Awaitable[None]]


class Bridge(Protocol):
    """An interface server the runner drives: MQTT now, serial later.

    ``serve()`` runs until ``shutdown()`` (reconnecting by itself); it must be callable again
    after it raised, since the runner restarts a crashed bridge.
    """

    @property
    def connected(self) -> bool: ...

    async def serve(self) -> None: ...

    async def shutdown(self, timeout: float = 4.0) -> None: ...  # noqa: ASYNC109 - bridge API


def bind_socket(host: str, port: int, send_timeout: float | None = None) -> socket.socket:
    """Bind the HTTP listening socket up front, so a busy port fails before anything starts.

    `send_timeout` (s): a connection whose peer acknowledges nothing of what we send for that
    long (gone, or a client that stopped reading: zero window) is aborted by the kernel
    (TCP_USER_TIMEOUT, inherited by accepted sockets). Closing such a socket politely would
    wait for its buffer to drain, forever: a dashboard the consumer gave up on would stay
    ESTABLISHED with megabytes queued.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose `proto` says
    # TCP, and accepted sockets inherit it. Without it every WebSocket frame written right after
    # another waited for the browser's delayed ACK (~40 ms per dashboard frame).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout * 1000))
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class GatewayRunner:
    """The web server (optional) beside named bridges, with signal-driven orderly shutdown."""

    def __init__(
        self,
        application: Any = None,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        web: bool = True,
        bridges: Mapping[str, Bridge] | None = None,
        shutdown_hooks: Sequence[ShutdownHook] = (),
        shutdown_timeout: float = 5.0,
        banner: Callable[[GatewayRunner], str] | None = None,
        access_log: bool = False,
        send_timeout: float | None = None,
    ) -> None:
        self.application = application
        self.host = host
        self.port = port
        self.web = web
        self.bridges: dict[str, Bridge] = dict(bridges or {})
        self.shutdown_hooks = list(shutdown_hooks)
        self.shutdown_timeout = shutdown_timeout
        self.banner = banner
        self.access_log = access_log
        self.send_timeout = send_timeout  # bind_socket(): abort connections that stall sends
        self.server: uvicorn.Server | None = None
        self.started = asyncio.Event()
        self.exit_code = 0
        self.shutdown_seconds: float | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._bridge_tasks: dict[str, asyncio.Task[None]] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._web_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None  # gateway_event_loop_lag_seconds

    # --- public -----------------------------------------------------------------------
    def run(self) -> int:
        """Run until a signal, in a new event loop; returns the process exit code."""
        return asyncio.run(self.serve())

    def request_shutdown(self, code: int = 0) -> None:
        """Begin the orderly shutdown (what SIGTERM/SIGINT do); a second call forces it."""
        self._signals += 1
        if self._signals > 1:
            logger.warning("second stop request: cancelling whatever is still running")
            if self.server is not None:
                self.server.force_exit = True
            for task in [*self._bridge_tasks.values(), *self._supervisors]:
                task.cancel()
            return
        self.exit_code = self.exit_code or code
        self._stop.set()

    @property
    def dashboard_url(self) -> str:
        """The URL the web tier answers on (after startup, with the real port)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def serve(self) -> int:
        """Startup → wait for a stop request → shutdown within `shutdown_timeout`."""
        loop = asyncio.get_running_loop()
        with self._signal_handlers(loop):
            try:
                await self._startup()
            except BaseException:
                await self._shutdown()
                raise
            self.started.set()
            await self._stop.wait()
            await self._shutdown()
        return self.exit_code

    # --- startup ----------------------------------------------------------------------
    async def _startup(self) -> None:
        self._lag_task = start_loop_lag_sampler()
        if self.web:
            sock = bind_socket(self.host, self.port, self.send_timeout)
            self.port = sock.getsockname()[1]
            config = uvicorn.Config(
                self.application,
                lifespan="off",
                ws="websockets-sansio",
                log_config=None,
                access_log=self.access_log,
                # Our whole shutdown has 5 s; open WebSockets get a short grace to close.
                timeout_graceful_shutdown=max(0.5, self.shutdown_timeout * 0.4),
                proxy_headers=False,
                server_header=False,
            )
            # uvicorn's serve() = startup → main_loop → shutdown inside capture_signals(), which
            # swaps in its own SIGINT/SIGTERM handlers and re-raises the signal on exit (killing
            # us before the bridges publish "offline"). So drive the three beats directly.
            self.server = uvicorn.Server(config)
            config.load()
            self.server.lifespan = config.lifespan_class(config)
            try:
                await self.server.startup(sockets=[sock])
            except BaseException:
                sock.close()
                raise
            self._web_task = asyncio.create_task(self._serve_web(sock), name="gateway.runner.web")
        for name, bridge in self.bridges.items():
            runtime.register(name, bridge)
            self._supervisors.append(
                asyncio.create_task(self._supervise(name, bridge), name=f"gateway.runner.{name}")
            )
        if self.banner is not None:
            logger.info("%s", self.banner(self))

    async def _serve_web(self, sock: socket.socket) -> None:
        assert self.server is not None
        try:
            await self.server.main_loop()
            await self.server.shutdown(sockets=[sock])
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("web server crashed; shutting down")
            self.request_shutdown(code=1)
            return
        finally:
            sock.close()
        if not self._stop.is_set():
            logger.error("web server stopped unexpectedly; shutting down")
            self.request_shutdown(code=1)

    async def _supervise(self, name: str, bridge: Bridge) -> None:
        """Run a bridge; if its serve() raises (a bug: it reconnects by itself), log, restart."""
        delay = RESTART_DELAY
        while not self._stop.is_set():
            task = asyncio.create_task(bridge.serve(), name=f"gateway.bridge.{name}")
            self._bridge_tasks[name] = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    task.cancel()
                raise
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("bridge %r crashed; restarting it in %.0f s", name, delay)
            else:
                if self._stop.is_set():
                    return
                logger.error("bridge %r returned unasked; restarting it in %.0f s", name, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, RESTART_DELAY_MAX)

    # --- shutdown ---------------------------------------------------------------------
    async def _shutdown(self) -> None:
        started = time.monotonic()
        deadline = started + self.shutdown_timeout
        self._stop.set()
        logger.info("shutting down (budget %.1f s)", self.shutdown_timeout)
        if self.server is not None:
            self.server.should_exit = True  # uvicorn closes its listener on the next tick
        # Bridges: MQTT publishes retained "offline" and retires its instances.
        bridge_budget = max(0.5, (deadline - time.monotonic()) * 0.5)
        await asyncio.gather(
            *(self._stop_bridge(name, b, bridge_budget) for name, b in self.bridges.items())
        )
        for hook in self.shutdown_hooks:
            budget = max(0.1, deadline - time.monotonic() - 0.5)
            await self._bounded(
                hook(budget), budget + 0.2, f"shutdown hook {getattr(hook, '__name__', hook)!r}"
            )
        if self._web_task is not None:
            await self._bounded_task(self._web_task, deadline - time.monotonic(), "web server")
        for task in self._supervisors:
            await self._bounded_task(task, 0.1, task.get_name())
        for name in self.bridges:
            runtime.unregister(name)
        if self._lag_task is not None:
            await stop_loop_lag_sampler(self._lag_task)
            self._lag_task = None
        self.shutdown_seconds = time.monotonic() - started
        logger.info("stopped in %.2f s", self.shutdown_seconds)

    async def _stop_bridge(self, name: str, bridge: Bridge, budget: float) -> None:
        await self._bounded(bridge.shutdown(timeout=budget), budget + 0.2, f"bridge {name!r}")
        task = self._bridge_tasks.get(name)
        if task is not None:
            await self._bounded_task(task, 0.2, f"bridge {name!r} serve()")

    @staticmethod
    async def _bounded(awaitable: Awaitable[None], budget: float, what: str) -> None:
        try:
            await asyncio.wait_for(awaitable, timeout=max(0.05, budget))
        except TimeoutError:
            logger.error("%s did not finish within %.1f s; abandoned", what, budget)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s failed during shutdown", what)

    @staticmethod
    async def _bounded_task(task: asyncio.Task[Any], budget: float, what: str) -> None:
        if task.done():
            if not task.cancelled() and task.exception() is not None:
                logger.debug("%s ended with %r", what, task.exception())
            return
        done, _ = await asyncio.wait({task}, timeout=max(0.05, budget))
        if not done:
            logger.warning("%s still running at the deadline; cancelling it", what)
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)

    @contextlib.contextmanager
    def _signal_handlers(self, loop: asyncio.AbstractEventLoop) -> Generator[None, None, None]:
        installed: list[signal.Signals] = []
        for sig in HANDLED_SIGNALS:
            try:
                loop.add_signal_handler(sig, self.request_shutdown)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
                pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


# --- Building blocks the management commands share ---------------------------------------
def mqtt_bridge(
    application: Any,
    url: str,
    *,
    shared_group: str | None = None,
    protocol: str = "v5",
    bridge_id: str | None = None,
) -> Bridge:
    """The MQTT bridge with this gateway's client id, retained status topic and session.

    The client id is fixed (`gateway-<GATEWAY_ID>`), so with `MQTT_SESSION_EXPIRY` > 0 the
    broker keeps the session (subscriptions, QoS 1 messages) while the gateway is down. Bridges
    of a shared group need distinct ids: `bridge_id` (default `GATEWAY_BRIDGE_ID`) names one
    stably; without it the id is per process and the session clean (nobody would resume it).
    """
    from django.conf import settings

    from gateway.mqtt.server import MqttServer

    cfg = settings.GATEWAY
    gateway_id = cfg["GATEWAY_ID"]
    client_id = f"gateway-{gateway_id}"
    session_expiry = max(0, cfg["MQTT_SESSION_EXPIRY"])
    if shared_group:
        # Several bridges in one group share GATEWAY_ID; equal client ids would evict each other.
        bridge_id = bridge_id or cfg["MQTT_BRIDGE_ID"]
        if bridge_id:
            client_id = f"{client_id}-{shared_group}-{bridge_id}"
        else:
            client_id = f"{client_id}-{shared_group}-{os.getpid()}"
            session_expiry = 0
    return MqttServer(
        application,
        url=url,
        client_id=client_id,
        status_topic=f"gateway/{gateway_id}/status",
        shared_group=shared_group,
        instance_queue=cfg["MQTT_INSTANCE_QUEUE"],
        idle_seconds=cfg["MQTT_INSTANCE_IDLE_SECONDS"],
        max_instances=cfg["MQTT_MAX_INSTANCES"],
        protocol=protocol,
        clean_start=session_expiry == 0,
        session_expiry=session_expiry,
        subscribe_qos=1,
    )


def serial_bridge(application: Any, specs: Sequence[str]) -> Bridge | None:
    """The serial bridge for these port SPECs, or None when there are none.

    Raises ValueError for a malformed SPEC (`gateway.serial.spec.parse_spec`).
    """
    if not specs:
        return None
    try:
        from gateway.serial.server import SerialServer
    except ImportError:  # pragma: no cover - only while the serial room had not landed
        logger.warning("serial ports are not yet supported; ignoring %s", " ".join(specs))
        return None
    return SerialServer(application, list(specs))


def modbus_bridge(application: Any, config_paths: Sequence[str]) -> Any:
    """The Modbus bridge for these config files, or None when there are none.

    Raises `gateway.modbus.config.ConfigError` (a ValueError) for a bad file or profile.
    """
    if not config_paths:
        return None
    from django.conf import settings

    from devices.conventions import modbus_units
    from gateway.modbus.config import load_configs
    from gateway.modbus.server import ModbusServer

    buses = load_configs(list(config_paths), settings.GATEWAY["MODBUS_PROFILE_DIRS"])
    modbus_units.remember(buses)  # the dashboard offers the writable points as buttons
    return ModbusServer(application, buses)


def modbus_option(parser: Any) -> None:
    """The ``--modbus FILE`` option of rungateway and runserial."""
    parser.add_argument(
        "--modbus",
        metavar="FILE",
        action="append",
        default=[],
        help="Modbus bus config file (JSON), repeatable; added to MODBUS_CONFIG",
    )


async def close_pipeline(budget: float) -> None:
    """Shutdown hook: flush pending telemetry writes and fan-out, then stop the pipeline."""
    from devices.telemetry.pipeline import current_pipeline

    pipeline = current_pipeline()
    if pipeline is not None:
        await pipeline.close(budget)


def describe_setup() -> dict[str, str]:
    """Channel layer and database in a few words, for the start-up line."""
    from django.conf import settings

    layer = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]
    if settings.REDIS_URL:
        layer += " (REDIS_URL)"
    db = settings.DATABASES["default"]
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    where = str(db.get("NAME", "")) if engine == "sqlite3" else db.get("HOST") or "local"
    return {"channel_layer": layer, "database": f"{engine} ({where})", "web": settings.HTTPS_MODE}


def in_memory_layer() -> bool:
    """True when the channel layer only reaches consumers inside this process."""
    from django.conf import settings

    return settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("InMemoryChannelLayer")


def broker_url_option(option: str | None) -> str:
    """A command's ``--mqtt`` value, else MQTT_URL, checked; CommandError when malformed."""
    from django.conf import settings
    from django.core.management.base import CommandError

    url = option or settings.GATEWAY["MQTT_URL"]
    try:
        parse_broker_url(url)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    return url
