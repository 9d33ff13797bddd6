"""Django settings for the gateway.

Every setting that an operator may change comes from the environment, here and nowhere else
(docs/interface.md §2). Other modules read ``django.conf.settings`` (mostly ``settings.GATEWAY``).

Over 400 lines on purpose: every setting lives here, by rule, each with the comment that
says what it does.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable ("1", "true", "yes", "on" are true)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def _admission_policy() -> str:
    from django.core.exceptions import ImproperlyConfigured

    policy = os.environ.get("GATEWAY_DEVICE_ADMISSION", "").strip().lower() or "open"
    if policy not in ("open", "known"):
        raise ImproperlyConfigured(f"GATEWAY_DEVICE_ADMISSION is open or known, not {policy!r}")
    return policy


def _secret_key() -> str:
    """DJANGO_SECRET_KEY, else a key generated once and kept in a git-ignored file."""
    key = os.environ.get("DJANGO_SECRET_KEY", "").strip()
    if key:
        return key
    path = Path(os.environ.get("GATEWAY_SECRET_KEY_FILE", BASE_DIR / ".secret_key"))
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(50)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        return key
    except FileExistsError:  # pragma: no cover - two processes racing on first start
        return path.read_text().strip()


def _gateway_id() -> str:
    """GATEWAY_ID, else the host name reduced to characters valid in an MQTT topic level."""
    raw = os.environ.get("GATEWAY_ID", "").strip() or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_-]", "-", raw)[:64] or "gateway"


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "*").replace(",", " ").split()
CSRF_TRUSTED_ORIGINS = os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").replace(",", " ").split()

# Daphne's app only swaps `manage.py runserver` for its ASGI one, and importing it loads Twisted
# (+27 MiB RSS in every gateway process): it is installed only for `runserver`. `rungateway`
# serves with uvicorn; `daphne gateway.asgi:application` needs no app (docs/interface.md §1).
_DAPHNE_APP = ["daphne"] if sys.argv[1:2] == ["runserver"] else []
INSTALLED_APPS = [
    *_DAPHNE_APP,
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    # Login throttling: failed logins counted per (user name, client address), then refused.
    "axes",
    "gateway",
    "devices",
    "dashboard",
    "alerts",
    # The simulated firmware and the demo (`manage.py demo`, `manage.py simulate`); the
    # gateway never imports it, it only lends its management commands.
    "firmware_sim",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Content-Security-Policy on every response (policy under "HTTPS, production" below).
    "csp.middleware.CSPMiddleware",
    # Refuses a locked-out login with 429 (last, as django-axes requires).
    "axes.middleware.AxesMiddleware",
]

# django-axes first, so a locked-out (user name, address) is refused before any password check.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# After GATEWAY_LOGIN_FAILURE_LIMIT wrong passwords for one user name from one address, that
# pair is refused (429) for GATEWAY_LOGIN_COOLOFF_MINUTES; every failure and lockout is logged.
# A pair, not the address alone: a household behind one NAT address is not locked out by one
# person's typos, and an attacker cannot lock a user out from everywhere.
AXES_FAILURE_LIMIT = max(1, env_int("GATEWAY_LOGIN_FAILURE_LIMIT", 5))
AXES_COOLOFF_TIME = timedelta(minutes=max(1, env_int("GATEWAY_LOGIN_COOLOFF_MINUTES", 15)))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
# The log names the client address (an operator acts on it); user names stay masked, as a
# mistyped one can be a password.
AXES_SENSITIVE_PARAMETERS = ["username"]

ROOT_URLCONF = "gateway.urls"
ASGI_APPLICATION = "gateway.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "gateway" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: DATABASE_URL, else a SQLite file in the project directory -----------------
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "").strip() or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web tier read while the telemetry writer writes; IMMEDIATE transactions
    # avoid "database is locked" upgrades; the timeout rides out short write bursts.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Tests use a file too, not Django's shared-cache in-memory database: there a second
    # connection (the telemetry writer's thread) gets "database table is locked" at once
    # instead of waiting, which is not how the gateway runs. One file per test process.
    DATABASES["default"]["TEST"] = {
        "NAME": str(Path(tempfile.gettempdir()) / f"gateway-test-{os.getpid()}.sqlite3")
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer: REDIS_URL → channels-redis, else in-memory ---------------------------
REDIS_URL = os.environ.get("REDIS_URL", "").strip()
# Ten years: Channels expires group memberships after a day by default, which would silently
# cut long-running device and dashboard consumers off their groups.
GROUP_EXPIRY = 10 * 365 * 86400
if REDIS_URL:
    # The pub/sub layer: ~6-7k group sends/s here where the list-based RedisChannelLayer did
    # ~1k and lost messages under load (STYLE.md, "Queues and hot paths").
    CHANNEL_LAYERS = {
        "default": {
            # Its subclass in gateway/layers.py asks dashboards to resync after a Redis restart.
            "BACKEND": "gateway.layers.ResyncingRedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "resync": {"dashboard": "dashboard.resync"}},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            # Channels' in-memory layer with its expiry sweep throttled (gateway/layers.py).
            "BACKEND": "gateway.layers.ThrottledInMemoryChannelLayer",
            # Default capacity is 100 and group_send drops silently past it; our fan-out sends
            # one batch per flush, so 1000 pending batches per channel is ample headroom.
            # Group memberships must outlive the default day: a device or dashboard consumer
            # joins its groups once and may run for months.
            "CONFIG": {"capacity": 1000, "expiry": 60, "group_expiry": GROUP_EXPIRY},
        }
    }

# --- Auth, sessions ----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# --- HTTPS, production, Content-Security-Policy ------------------------------------------
# DJANGO_HTTPS: the site is reached over HTTPS (usually a TLS-terminating proxy in front).
# An explicit choice: set it, or declare the TLS proxy's header (DJANGO_SECURE_PROXY_SSL_HEADER),
# which says so too. Naming the host is not enough: a Pi reached as http://pi.local:8000/ would
# redirect to an https:// that does not exist and HSTS would pin the browser to it. Off, a
# browser keeps the (non-Secure) cookies and logins work over plain HTTP. `manage.py check
# --deploy` passes with HTTPS on. `HTTPS_MODE` says which mode and why (logged at start).
_PROXY_SSL_HEADER = os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER", "").strip()
if os.environ.get("DJANGO_HTTPS", "").strip():
    HTTPS = env_bool("DJANGO_HTTPS")
    HTTPS_MODE = f"{'HTTPS' if HTTPS else 'plain HTTP'} (DJANGO_HTTPS={os.environ['DJANGO_HTTPS']})"
elif _PROXY_SSL_HEADER:
    HTTPS = True
    HTTPS_MODE = f"HTTPS behind a TLS proxy (DJANGO_SECURE_PROXY_SSL_HEADER={_PROXY_SSL_HEADER})"
else:
    HTTPS = False
    HTTPS_MODE = "plain HTTP (set DJANGO_HTTPS=1 when a TLS proxy serves the site)"
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = env_bool("DJANGO_SSL_REDIRECT", HTTPS)
# Probes and Prometheus scrape over plain HTTP from inside the host or cluster.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
# HSTS is only sent on HTTPS responses. One hour by default, so a mistake heals quickly;
# raise it (e.g. 31536000) once HTTPS is known good.
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 3600 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
# Preloading commits the whole domain in browsers' built-in lists: only its owner may opt in,
# so it is off unless asked for, and check --deploy's reminder (W021) is silenced until then.
SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
# Behind a proxy, the header it sets to "https" on TLS requests, e.g. X-Forwarded-Proto. Only
# set it when the proxy always sets (or strips) that header: a client could forge it otherwise.
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _PROXY_SSL_HEADER.upper().replace("-", "_"), "https") if _PROXY_SSL_HEADER else None
)


def _weak_secret(key: str) -> bool:
    """Django's own test for a guessable key (check --deploy, security.W009)."""
    return len(key) < 50 or len(set(key)) < 5 or key.startswith("django-insecure-")


if HTTPS and _weak_secret(SECRET_KEY):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is too weak for production (it needs 50+ random characters): "
        "unset it to use the generated .secret_key, or set a long random value"
    )

# No inline script, style or event handler anywhere: an injected `<img onerror=…>` cannot
# run even if escaping were missed. The admin is compatible (its scripts are files too).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],  # includes ws(s):// to the same host (CSP level 3)
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Static files: served by WhiteNoise so the gateway needs no other web server ---------
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Front-end packages from package.json (`npm ci`): only uPlot's dist folder is served, at
# /static/vendor/uplot/, so nothing else in node_modules is exposed.
STATICFILES_DIRS = [
    (prefix, path)
    for prefix, path in [("vendor/uplot", BASE_DIR / "node_modules" / "uplot" / "dist")]
    if path.is_dir()
]
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
# With WHITENOISE_USE_FINDERS the files are served from the apps and node_modules directly, so
# an uncollected STATIC_ROOT is normal here, not a mistake worth a warning on every start.
warnings.filterwarnings("ignore", message="No directory at", category=UserWarning)
# WhiteNoise serves static files through a sync iterator; under ASGI Django warns that it
# buffers them, once per file served: harmless for our small assets, noise in the log.
warnings.filterwarnings("ignore", message="StreamingHttpResponse must consume synchronous")

# --- The gateway's own settings ----------------------------------------------------------
GATEWAY = {
    # Broker the MQTT bridge connects to (docs/interface.md §2); `--mqtt` overrides.
    "MQTT_URL": os.environ.get("MQTT_URL", "").strip() or "mqtt://127.0.0.1:1883",
    # Names the gateway's status topic gateway/<id>/status and its MQTT client id.
    "GATEWAY_ID": _gateway_id(),
    # Space-separated serial SPECs (docs/interface.md §1); `--serial` adds to them.
    "SERIAL_PORTS": os.environ.get("SERIAL_PORTS", "").split(),
    # Space-separated Modbus config files (docs/interface.md §7); `--modbus` adds to them.
    "MODBUS_CONFIG": os.environ.get("MODBUS_CONFIG", "").split(),
    # Where shipped Modbus profiles live (referenced by NAME in a config).
    "MODBUS_PROFILE_DIRS": [BASE_DIR / "devices" / "conventions" / "modbus_profiles"],
    # When set, /metrics requires "Authorization: Bearer <token>".
    "METRICS_TOKEN": os.environ.get("METRICS_TOKEN", "").strip(),
    # Per-instance inbound queue of the MQTT bridge (events); QoS 0 dropped when full,
    # QoS 1/2 kept (the broker's in-flight window bounds them; other devices never wait).
    "MQTT_INSTANCE_QUEUE": env_int("GATEWAY_MQTT_INSTANCE_QUEUE", 256),
    # Device instances idle this long are retired (their state lives in the database).
    "MQTT_INSTANCE_IDLE_SECONDS": env_float("GATEWAY_MQTT_INSTANCE_IDLE_SECONDS", 600.0),
    # At most this many live instances (devices); past it the least recently active is retired.
    "MQTT_MAX_INSTANCES": env_int("GATEWAY_MQTT_MAX_INSTANCES", 50_000),
    # Persistent broker session (clean start off, fixed client id): the broker keeps our
    # subscriptions and queues QoS 1 messages for this many seconds while we are down.
    # 0 = a clean session each time (messages published while we are down are lost).
    "MQTT_SESSION_EXPIRY": env_int("GATEWAY_MQTT_SESSION_EXPIRY", 3600),
    # A `runmqtt --shared-group` bridge's stable name (unique per bridge), giving it a fixed
    # client id and so a persistent session; unset = a per-process id and a clean session.
    "MQTT_BRIDGE_ID": os.environ.get("GATEWAY_BRIDGE_ID", "").strip(),
    # Largest MQTT payload the gateway parses; larger ones are rejected (reason too_large).
    "MAX_PAYLOAD_BYTES": env_int("GATEWAY_MAX_PAYLOAD_BYTES", 64 * 1024),
    # Admission of new device ids over MQTT (devices/admission.py): "open" admits new devices
    # at this rate (a bucket of ten seconds' worth) up to the total; "known" only devices
    # created beforehand in the admin. Refused messages count as "not_admitted".
    "DEVICE_ADMISSION": _admission_policy(),
    "NEW_DEVICES_PER_SECOND": max(0.01, env_float("GATEWAY_NEW_DEVICES_PER_SECOND", 50.0)),
    "MAX_DEVICES": max(1, env_int("GATEWAY_MAX_DEVICES", 50_000)),
    # A web connection whose peer acknowledges nothing we send for this long (a dashboard that
    # stopped reading, a vanished phone) is aborted at the socket (TCP_USER_TIMEOUT, Linux).
    "HTTP_SEND_TIMEOUT": env_float("GATEWAY_HTTP_SEND_TIMEOUT", 60.0),
    # Home Assistant birth messages: the first republishes every discovery document at once,
    # later ones within this many seconds are coalesced into one more republish.
    "HA_REPUBLISH_SECONDS": env_float("HA_DISCOVERY_REPUBLISH_SECONDS", 10.0),
    # Distinct metric names one device may have (per gateway run); new names past it are
    # refused (`too_many_metrics`), the known ones still stored. With names of at most 200
    # characters this bounds a device's stored latest values to about 128 KiB.
    "DEVICE_MAX_METRICS": env_int("GATEWAY_DEVICE_MAX_METRICS", 500),
    # Longest metric name accepted (1-200 characters); a longer one rejects its message
    # (`bad_value`). With DEVICE_MAX_METRICS it bounds a device's stored latest values.
    "MAX_METRIC_NAME": min(200, max(1, env_int("GATEWAY_MAX_METRIC_NAME", 200))),
    # /healthz says 503 "ingest stalled" when un-acknowledged MQTT messages have waited this
    # long with no acknowledgement at all (the bridge is connected but nothing gets stored).
    "HEALTH_STALL_SECONDS": env_float("GATEWAY_HEALTH_STALL_SECONDS", 30.0),
    # Telemetry writes: one transaction per batch of at most this many readings, at most
    # this many seconds after the first pending one.
    "TELEMETRY_BATCH_SIZE": env_int("GATEWAY_TELEMETRY_BATCH_SIZE", 2000),
    "TELEMETRY_BATCH_DELAY": env_float("GATEWAY_TELEMETRY_BATCH_DELAY", 0.25),
    # Bound on readings waiting for the database; past it the oldest are dropped and counted.
    "TELEMETRY_BUFFER_LIMIT": env_int("GATEWAY_TELEMETRY_BUFFER_LIMIT", 200_000),
    # `manage.py prune_telemetry` (daily, deploy/systemd/gateway-prune.timer): raw readings
    # are kept this many days (0 = forever), then as hourly averages up to DOWNSAMPLE days
    # (0 = no averages: deleted at the retention).
    "TELEMETRY_RETENTION_DAYS": env_float("GATEWAY_TELEMETRY_RETENTION_DAYS", 30.0),
    "TELEMETRY_DOWNSAMPLE_DAYS": env_float("GATEWAY_TELEMETRY_DOWNSAMPLE_DAYS", 365.0),
    # A device whose latest rejected message is at most this many seconds old is "rejecting",
    # a problem on the dashboard (docs/interface.md §6.3): long enough that a device failing
    # one report in ten at a 60 s interval stays listed, short enough that a one-off glitch
    # clears itself without anyone acknowledging it.
    "REJECTING_SECONDS": max(1.0, env_float("GATEWAY_REJECTING_SECONDS", 600.0)),
    # Frames buffered per dashboard client; a client this far behind is closed (4008) and
    # resyncs from a fresh snapshot when it reconnects.
    "WS_BUFFER_FRAMES": env_int("GATEWAY_WS_BUFFER_FRAMES", 1000),
    # Serial devices' telemetry and status are also published to the broker (docs/interface.md §3).
    "SERIAL_MIRROR": env_bool("SERIAL_MIRROR", True),
    # Home Assistant MQTT discovery (docs/homeassistant.md): one retained document per device
    # on <prefix>/device/<id>/config, republished when Home Assistant announces itself.
    "HA_DISCOVERY": env_bool("HA_DISCOVERY", True),
    "HA_DISCOVERY_PREFIX": os.environ.get("HA_DISCOVERY_PREFIX", "").strip().strip("/")
    or "homeassistant",
    # Ingest other devices' Home Assistant discovery documents under the same prefix
    # (docs/conventions.md); at most DISCOVERY_MAX_ENTITIES entities, documents of at most
    # DISCOVERY_MAX_BYTES (Zigbee2MQTT's device list included).
    "HA_DISCOVERY_INGEST": env_bool("HA_DISCOVERY_INGEST", True),
    "DISCOVERY_MAX_ENTITIES": env_int("GATEWAY_DISCOVERY_MAX_ENTITIES", 10_000),
    "DISCOVERY_MAX_BYTES": env_int("GATEWAY_DISCOVERY_MAX_BYTES", 1024 * 1024),
    # Zigbee2MQTT's base topic (docs/conventions.md); empty = not ingested.
    "ZIGBEE2MQTT_BASE_TOPIC": os.environ.get("ZIGBEE2MQTT_BASE_TOPIC", "zigbee2mqtt")
    .strip()
    .strip("/"),
    # Commands: seconds to wait for an ack once sent (a command may ask for its own), how long
    # one is held for an offline device or a down broker before it times out, and the
    # per-user rate limit (COUNT commands per SECONDS).
    "COMMAND_TIMEOUT": env_float("GATEWAY_COMMAND_TIMEOUT", 10.0),
    "COMMAND_HOLD_SECONDS": env_float("GATEWAY_COMMAND_HOLD_SECONDS", 300.0),
    "COMMAND_RATE_COUNT": env_int("GATEWAY_COMMAND_RATE_COUNT", 30),
    "COMMAND_RATE_SECONDS": env_float("GATEWAY_COMMAND_RATE_SECONDS", 60.0),
    # Alerts (docs/alerts.md): Apprise URLs notified of every alert raised or cleared,
    # space-separated, besides each rule's own.
    "ALERT_NOTIFY_URLS": os.environ.get("GATEWAY_ALERT_NOTIFY_URLS", "").split(),
}

LOG_LEVEL = os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"no_traceback_for_403": {"()": "gateway.logs.NoTracebackFor403"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"level": "INFO" if LOG_LEVEL == "DEBUG" else LOG_LEVEL},
        # aiomqtt/paho are chatty at DEBUG; keep them at our level or WARNING.
        "aiomqtt": {"level": "WARNING"},
        # uvicorn's routine lines (server started, each WebSocket accepted or closed) are
        # noise beside the gateway's own start-up line; its errors still show.
        "uvicorn.error": {"level": "INFO" if LOG_LEVEL == "DEBUG" else "WARNING"},
        # A 403 is an answer, not an error: one line, without the PermissionDenied traceback.
        "django.request": {"filters": ["no_traceback_for_403"]},
    },
}
