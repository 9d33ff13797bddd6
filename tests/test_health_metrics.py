"""/healthz and /metrics (docs/interface.md §5) against a real broker, database and registry."""

from __future__ import annotations

import socket
import time

import pytest
from django.urls import path, resolve
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from gateway import runtime, views
from gateway.metrics import SERIAL_FRAMES
from tests.support.timing import allowance

# The two routes exactly as gateway/urls.py has them, without the rest of the site's URLconf.
urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics, name="metrics"),
]
pytestmark = [
    pytest.mark.urls(__name__),
]


class Bridge:
    """What gateway.runtime needs of an interface server: a `connected` flag (and a stall)."""

    def __init__(self, connected: bool) -> None:
        self.connected = connected
        self.stalled_for = 0.0


@pytest.fixture
def mqtt_bridge():
    bridges = []

    def register(connected: bool) -> Bridge:
        bridge = Bridge(connected)
        runtime.register("mqtt", bridge)
        bridges.append(bridge)
        return bridge

    yield register
    runtime.unregister("mqtt")


@pytest.fixture
def broker_url(settings):
    def use(url: str) -> None:
        settings.GATEWAY = {**settings.GATEWAY, "MQTT_URL": url}

    return use


@pytest.mark.django_db
def test_healthy_with_a_connected_bridge(client, mqtt_bridge, settings):
    mqtt_bridge(True)
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "mqtt": "connected",
        "mqtt_check": "bridge",
        "database": "ok",
        "ingest": "ok",
        "gateway_id": settings.GATEWAY["GATEWAY_ID"],
    }


@pytest.mark.django_db
def test_a_connected_bridge_that_acknowledges_nothing_is_unhealthy(client, mqtt_bridge, settings):
    settings.GATEWAY = {**settings.GATEWAY, "HEALTH_STALL_SECONDS": 30.0}
    bridge = mqtt_bridge(True)
    bridge.stalled_for = 29.0  # messages wait, but the last ack is recent enough
    assert client.get("/healthz").status_code == 200
    bridge.stalled_for = 31.0
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["mqtt"] == "connected"
    assert response.json()["ingest"] == "stalled"
    assert response.json()["ingest_stalled_seconds"] == 31.0


@pytest.mark.django_db
def test_unhealthy_with_a_disconnected_bridge(client, mqtt_bridge, mosquitto, broker_url):
    broker_url(mosquitto.url)  # reachable, but the in-process bridge's word counts
    bridge = mqtt_bridge(False)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["mqtt"] == "disconnected"
    assert response.json()["database"] == "ok"
    bridge.connected = True
    assert client.get("/healthz").status_code == 200


@pytest.mark.django_db
def test_probe_follows_the_broker_up_and_down(client, mosquitto, broker_url):
    broker_url(mosquitto.url)
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["mqtt"] == "connected"
    assert response.json()["mqtt_check"] == "probe"

    mosquitto.stop()
    started = time.monotonic()
    response = client.get("/healthz")
    assert time.monotonic() - started < allowance(5.0)  # a refused connect: at once
    assert response.status_code == 503
    assert response.json()["mqtt"] == "disconnected"
    assert response.json()["database"] == "ok"

    mosquitto.start()
    assert client.get("/healthz").status_code == 200


@pytest.mark.django_db
def test_probe_gives_up_on_a_broker_that_never_answers(client, broker_url):
    # A listener whose accept queue is full: Linux drops further SYNs, so connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        broker_url(f"mqtt://127.0.0.1:{port}")
        started = time.monotonic()
        response = client.get("/healthz")
        elapsed = time.monotonic() - started
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert response.status_code == 503
    assert response.json()["mqtt"] == "disconnected"
    # It waited for the probe timeout (1 s), and no longer (stretched under load).
    assert 0.5 < elapsed < allowance(5.0)


@pytest.mark.django_db
def test_bad_broker_url_is_unhealthy_not_an_error(client, broker_url):
    broker_url("http://not-a-broker")
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["mqtt"] == "disconnected"


def test_unreachable_database_is_unhealthy(client, mqtt_bridge):
    # No django_db mark: pytest-django refuses every connection attempt, from any thread,
    # which is what a database that is down looks like to the view.
    mqtt_bridge(True)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["database"] == "error"
    assert response.json()["mqtt"] == "connected"


def test_healthz_needs_no_login_and_is_not_cached(client, mqtt_bridge):
    mqtt_bridge(True)
    response = client.get("/healthz")
    assert response.status_code != 302
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_healthz_is_read_only(client):
    assert client.post("/healthz").status_code == 405


INTERFACE_METRICS = {
    # sample name → the label it must carry (docs/interface.md §5)
    "gateway_mqtt_connected": None,
    "gateway_mqtt_messages_received_total": None,
    "gateway_messages_rejected_total": "reason",
    "gateway_telemetry_stored_total": None,
    "gateway_ws_clients": None,
    "gateway_commands_total": "status",
    "gateway_serial_frames_total": "port",
    "gateway_event_loop_lag_seconds_bucket": "le",
}


def test_metrics_has_every_contract_name(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "METRICS_TOKEN": ""}
    SERIAL_FRAMES.labels(port="loop://")  # port labels exist once a port has been opened
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    for name, label in INTERFACE_METRICS.items():
        assert name in samples, f"{name} missing from /metrics"
        if label is not None:
            assert all(label in labels for labels in samples[name]), name
    reasons = {labels["reason"] for labels in samples["gateway_messages_rejected_total"]}
    assert {"bad_json", "bad_device_id", "too_large"} <= reasons  # zero before the first one
    statuses = {labels["status"] for labels in samples["gateway_commands_total"]}
    assert statuses == {"pending", "sent", "acked", "failed", "timeout"}


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Basic czNjcjN0", 401),
        ("s3cr3t", 401),
        ("Bearer s3cr3t", 200),
        ("bearer s3cr3t", 200),
    ],
)
def test_metrics_token(client, settings, header, status):
    settings.GATEWAY = {**settings.GATEWAY, "METRICS_TOKEN": "s3cr3t"}
    headers = {"Authorization": header} if header else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"gateway_" not in response.content
    else:
        assert b"gateway_ws_clients" in response.content


def test_metrics_needs_no_login_without_token(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "METRICS_TOKEN": ""}
    assert client.get("/metrics").status_code == 200


@pytest.mark.urls("gateway.urls")
def test_the_site_routes_to_these_views():
    assert resolve("/healthz").func is views.healthz
    assert resolve("/metrics").func is views.metrics
