"""Broker credentials and TLS: `mqtts://user:pass@host:port?cafile=…&certfile=…&keyfile=…`.

A real mosquitto with a password file (`mosquitto_passwd`) and a certificate from a CA this
test makes (with `cryptography`); a second broker also requires client certificates. The right
credentials over TLS carry telemetry end to end through the real gateway; a wrong password, a
wrong CA or a missing client certificate leaves the bridge disconnected, says why in the log,
turns /healthz to 503 and crashes nothing. The /healthz probe (the web tier alone) logs in
with the same TLS files and credentials as the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import ipaddress
import json
import logging
import re
import secrets
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.mqtt.consumer import MqttConsumer
from gateway.mqtt.routing import TopicRouter, topic
from gateway.mqtt.server import MqttServer
from gateway.mqtt.url import parse_broker_url
from gateway.views import probe_broker
from tests.support.gateway import GatewayProcess
from tests.support.servers import Mosquitto, require_binary

# paho leaves the socket of a failed TLS handshake to the garbage collector (its
# `_ssl_wrap_socket` does not close it; CPython closes it when the error is dropped), which
# warns "unclosed <ssl.SSLSocket>" only where ResourceWarnings are shown, as here.
PAHO_TLS_LEAK = (
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
pytestmark = [pytest.mark.filterwarnings(PAHO_TLS_LEAK)]

GATEWAY_USER, GATEWAY_PASSWORD = "gateway", f"gw:{secrets.token_urlsafe(8)}@/?"  # odd chars
DEVICE_USER, DEVICE_PASSWORD = "sensor", secrets.token_urlsafe(12)
WEB_PASSWORD = secrets.token_urlsafe(12)


# --- a small PKI, made here -----------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """File paths: our CA, the broker's certificate, a client certificate, and a stranger CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _certificate(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A CA certificate (self-signed when `issuer` is None) or a leaf for `usage`."""
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    """Our CA signs the broker's certificate (for 127.0.0.1) and the gateway's client one."""
    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("Test CA", ca_key, None)
    _write(folder / "ca.pem", None, ca)
    _write(folder / "other-ca.pem", None, _certificate("Stranger CA", other_key, None))
    for name, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(
            folder / f"{name}.pem", key, _certificate(name, key, (ca.subject, ca_key), usage=usage)
        )
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca=folder / "other-ca.pem",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_mosquitto(pki: Pki, *, require_certificate: bool) -> Mosquitto:
    """A mosquitto that speaks only TLS and lets in only the users of its password file."""
    passwords = pki.ca.parent / f"passwd-{secrets.token_hex(3)}"
    passwd = require_binary("mosquitto_passwd", "mosquitto")
    for index, (user, password) in enumerate(
        [(GATEWAY_USER, GATEWAY_PASSWORD), (DEVICE_USER, DEVICE_PASSWORD)]
    ):
        create = ["-c"] if index == 0 else []
        subprocess.run([passwd, *create, "-b", str(passwords), user, password], check=True)
    config = (
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"require_certificate {'true' if require_certificate else 'false'}\n"
        f"password_file {passwords}\n"
        # Started as root (CI), mosquitto would drop to its own user, which cannot read the
        # password file in pytest's private temporary folder; as another user this is a no-op.
        "user root\n"
    )
    return Mosquitto(config=config, anonymous=False, tls=True)


@pytest.fixture(scope="module")
def tls_broker(pki) -> Iterator[Mosquitto]:
    with tls_mosquitto(pki, require_certificate=False) as broker:
        yield broker


@pytest.fixture(scope="module")
def mtls_broker(pki) -> Iterator[Mosquitto]:
    with tls_mosquitto(pki, require_certificate=True) as broker:
        yield broker


def broker_url(
    broker: Mosquitto,
    *,
    password: str = GATEWAY_PASSWORD,
    cafile: Path | None = None,
    client: Pki | None = None,
) -> str:
    """The gateway's `mqtts://` URL for `broker`, with credentials and TLS files."""
    query = [f"cafile={cafile}"] if cafile else []
    if client is not None:
        query += [f"certfile={client.client_cert}", f"keyfile={client.client_key}"]
    userinfo = f"{GATEWAY_USER}:{quote(password, safe='')}"
    return f"mqtts://{userinfo}@127.0.0.1:{broker.port}" + ("?" + "&".join(query) if query else "")


@contextlib.asynccontextmanager
async def device(pki: Pki, broker: Mosquitto, *, client_cert: bool = False):
    """A device on the TLS broker with its own credentials (and the client certificate)."""
    context = ssl.create_default_context(cafile=pki.ca)
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username=DEVICE_USER,
        password=DEVICE_PASSWORD,
        tls_context=context,
        identifier=f"dev-{secrets.token_hex(3)}",
        timeout=5,
    ) as client:
        yield client


# --- end to end through the real gateway ------------------------------------------------------


def test_the_url_carries_tls_files_and_refuses_bad_ones(pki, tmp_path):
    parsed = parse_broker_url(broker_url(Mosquitto(), cafile=pki.ca, client=pki))
    assert (parsed.tls, parsed.username, parsed.password) == (True, GATEWAY_USER, GATEWAY_PASSWORD)
    assert (parsed.cafile, parsed.certfile, parsed.keyfile) == tuple(
        map(str, (pki.ca, pki.client_cert, pki.client_key))
    )
    assert GATEWAY_PASSWORD not in str(parsed)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for url, message in [
        (f"mqtt://h?cafile={pki.ca}", "need an mqtts:// URL"),
        (f"mqtts://h?cafile={tmp_path / 'missing.pem'}", "cannot use its TLS files"),
        (f"mqtts://h?cafile={not_pem}", "cannot use its TLS files"),
        (f"mqtts://h?keyfile={pki.client_key}", "keyfile without certfile"),
        ("mqtts://h?capath=/etc/ssl", "unknown or repeated"),
        (f"mqtts://h?cafile={pki.ca}&cafile={pki.ca}", "unknown or repeated"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_broker_url(url)


def test_right_credentials_over_tls_carry_telemetry_end_to_end(pki, tls_broker):
    url = broker_url(tls_broker, cafile=pki.ca)
    with GatewayProcess(url) as gw:  # ready = /healthz says the bridge is connected
        gw.create_user("viewer", WEB_PASSWORD, staff=False)
        cookie = gw.login("viewer", WEB_PASSWORD)

        async def publish() -> None:
            async with device(pki, tls_broker) as dev:
                body = {"temperature": 21.5, "ts": time.time()}
                await dev.publish("devices/tls-1/telemetry", json.dumps(body), qos=1)

        asyncio.run(publish())
        deadline = time.monotonic() + 10
        while True:
            status, devices = gw.http_get("/api/devices/", cookie)
            row = next((d for d in devices if d["id"] == "tls-1"), None) if status == 200 else None
            if row is not None and row["metrics"].get("temperature") == 21.5:
                break
            assert time.monotonic() < deadline, f"no telemetry over TLS: {status} {devices}"
            time.sleep(0.1)
        status, health = gw.http_get("/healthz")
        assert (status, health["mqtt"]) == (200, "connected")
        assert GATEWAY_PASSWORD not in gw.log_text()


def test_a_wrong_password_is_reported_and_survived(pki, tls_broker):
    url = broker_url(tls_broker, password="not-the-password", cafile=pki.ca)
    with GatewayProcess(url, wait_mqtt=False) as gw:
        gw.wait_for_log(r"mqtt broker .* unavailable: connect refused: .*(password|authori[sz]ed)")
        status, health = gw.http_get("/healthz")
        assert (status, health["mqtt"]) == (503, "disconnected")
        assert gw.http_get("/accounts/login/")[0] == 200  # the web tier serves on
        assert "not-the-password" not in gw.log_text()
    # Leaving the `with` asserted a clean exit (code 0) on SIGTERM: nothing crashed.


# --- the bridge and the probe in this process ---------------------------------------------------

RECEIVED: asyncio.Queue[tuple[str, bytes]]


class Telemetry(MqttConsumer):
    """Hands each telemetry message to the test."""

    async def mqtt_message(self, message):
        RECEIVED.put_nowait((message["topic"], message["payload"]))


class Reasons(logging.Handler):
    """Collects the bridge's warnings and wakes the test when one matches."""

    def __init__(self, pattern: str) -> None:
        super().__init__(logging.WARNING)
        self.pattern = re.compile(pattern)
        self.lines: list[str] = []
        self.matched = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if self.pattern.search(self.lines[-1]):
            self.matched.set()


@contextlib.asynccontextmanager
async def bridge(url: str, expect_log: str | None = None) -> AsyncIterator[MqttServer]:
    """The MQTT bridge on `url`; with `expect_log`, wait until it logs a matching warning."""
    global RECEIVED
    RECEIVED = asyncio.Queue()
    app = TopicRouter([topic("devices/{device_id}/telemetry", Telemetry.as_asgi())])
    server = MqttServer(app, url=url, client_id=f"gw-{secrets.token_hex(4)}", backoff_max=0.5)
    reasons = Reasons(expect_log or "$^")
    # The bridge's own line, and aiomqtt's for errors it sees first (a TLS 1.3 alert after
    # the handshake: the bridge itself only gives up when CONNACK does not come).
    logs = [logging.getLogger("gateway.mqtt"), logging.getLogger("aiomqtt")]
    for log in logs:
        log.addHandler(reasons)
    task = asyncio.create_task(server.serve())
    try:
        if expect_log:
            try:
                await asyncio.wait_for(reasons.matched.wait(), 10)
            except TimeoutError:
                raise AssertionError(f"no log line like {expect_log!r}: {reasons.lines}") from None
        else:
            await server.wait_connected(10)
        yield server
    finally:
        for log in logs:
            log.removeHandler(reasons)
        await server.shutdown(4)
        await asyncio.wait_for(task, 5)
        gc.collect()  # paho's sockets of failed handshakes (see PAHO_TLS_LEAK) go here


async def test_a_wrong_ca_is_a_tls_failure_and_the_probe_agrees(pki, tls_broker):
    url = broker_url(tls_broker, cafile=pki.other_ca)
    async with bridge(url, expect_log="unavailable: .*CERTIFICATE_VERIFY_FAILED") as server:
        assert not server.connected
        assert not await probe_broker(url)
    # The system's CAs do not know ours either.
    assert not await probe_broker(broker_url(tls_broker))


async def test_the_probe_logs_in_like_the_bridge(pki, tls_broker):
    assert await probe_broker(broker_url(tls_broker, cafile=pki.ca))
    assert not await probe_broker(broker_url(tls_broker, password="nope", cafile=pki.ca))
    no_credentials = f"mqtts://127.0.0.1:{tls_broker.port}?cafile={pki.ca}"
    assert not await probe_broker(no_credentials)
    assert not await probe_broker(f"mqtt://127.0.0.1:{tls_broker.port}")  # plain to a TLS port


@pytest.mark.django_db
def test_healthz_of_the_web_tier_alone_uses_the_tls_url(client, settings, pki, tls_broker):
    settings.GATEWAY = {**settings.GATEWAY, "MQTT_URL": broker_url(tls_broker, cafile=pki.ca)}
    response = client.get("/healthz")
    assert (response.status_code, response.json()["mqtt_check"]) == (200, "probe")
    settings.GATEWAY = {**settings.GATEWAY, "MQTT_URL": broker_url(tls_broker, password="x")}
    assert client.get("/healthz").status_code == 503


async def test_a_broker_requiring_client_certificates(pki, mtls_broker):
    with_cert = broker_url(mtls_broker, cafile=pki.ca, client=pki)
    async with bridge(with_cert) as server:
        assert server.connected and await probe_broker(with_cert)
        async with device(pki, mtls_broker, client_cert=True) as dev:
            await dev.publish("devices/cert-1/telemetry", b'{"t": 1}', qos=1)
        assert await asyncio.wait_for(RECEIVED.get(), 10) == (
            "devices/cert-1/telemetry",
            b'{"t": 1}',
        )

    without = broker_url(mtls_broker, cafile=pki.ca)
    async with bridge(without, expect_log="certificate required") as server:
        assert not server.connected
        assert not await probe_broker(without)
