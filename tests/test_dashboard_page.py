"""The live page at `/` and the login page: login required, escaping, static assets."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.auth import AuthMiddlewareStack
from channels.layers import get_channel_layer
from channels.routing import ProtocolTypeRouter, URLRouter
from django.conf import settings
from django.urls import include, path, resolve

from dashboard import views
from dashboard.routing import websocket_urlpatterns
from devices.models import Device
from gateway.origin import SameOriginValidator
from tests.support.browser import CHROMIUM, watched_page
from tests.support.servers import free_port
from tests.support.web import run_server

# The site's URLconf minus the rooms this file does not test (gateway/urls.py has the same
# entries for "/" and "/accounts/").
urlpatterns = [
    path("", include("dashboard.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/alerts/", include("alerts.urls")),  # the page's alerts panel asks it
]
pytestmark = [
    pytest.mark.urls(__name__),
]

XSS = "<img src=x onerror=alert(1)>"
STATIC = Path(settings.BASE_DIR) / "dashboard" / "static" / "dashboard"


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="correct horse battery")


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_anonymous_is_sent_to_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"


@pytest.mark.django_db
def test_login_page_renders_and_logs_in(client, user):
    response = client.get("/accounts/login/?next=/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="username"' in html and 'name="password"' in html
    assert "csrfmiddlewaretoken" in html
    assert "/static/dashboard/app.css" in html
    response = client.post(
        "/accounts/login/",
        {"username": "alice", "password": "correct horse battery", "next": "/"},
    )
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200


@pytest.mark.django_db
def test_wrong_password_shows_an_error(client, user):
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert 'class="form-error" role="alert"' in response.content.decode()


@pytest.mark.django_db
def test_dashboard_is_a_shell_without_device_rows_for_a_logged_in_user(logged_in):
    """The rows come one page at a time over the WebSocket: the page's size is the fleet's."""
    Device.objects.create(
        id="weather-1", name="Roof", online=True, metrics={"temperature": 21.5, "humidity": 40}
    )
    Device.objects.create(id="serial-2", transport="serial")
    response = logged_in.get("/")
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0")
    html = response.content.decode()
    assert "data-device" not in html and "Roof" not in html and "21.5" not in html
    assert 'id="count-total"' in html and 'id="filter"' in html and 'data-page-size="50"' in html
    assert 'src="/static/dashboard/app.js"' in html
    assert 'id="conn"' in html
    assert "Content-Security-Policy" in html and "script-src 'self'" in html
    assert "<script>" not in html  # no inline script: the CSP forbids it
    assert 'id="empty" hidden' in html  # app.js says so once the snapshot says it is empty


@pytest.mark.django_db
def test_logout_is_a_post_form(logged_in):
    html = logged_in.get("/").content.decode()
    assert 'action="/accounts/logout/"' in html
    response = logged_in.post("/accounts/logout/")
    assert response.status_code == 302
    assert logged_in.get("/").status_code == 302


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["app.js", "live.js", "device.js", "app.css"])
def test_static_assets_are_served(client, name):
    response = client.get(f"/static/dashboard/{name}")
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert body == (STATIC / name).read_bytes()


@pytest.mark.parametrize("name", ["app.js", "live.js", "device.js"])
def test_scripts_never_use_html_sinks(name):
    source = (STATIC / name).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source
    for sink in ("new Function", 'setAttribute("style', 'setTimeout("', 'setInterval("'):
        assert sink not in source
    assert "textContent" in source


def test_the_socket_follows_the_page_scheme():
    source = (STATIC / "live.js").read_text()
    assert "location.protocol" in source and "/ws/dashboard/" in source


def test_templates_never_mark_data_safe():
    for template in [
        *Path(settings.BASE_DIR, "dashboard", "templates").rglob("*.html"),
        *Path(settings.BASE_DIR, "gateway", "templates").rglob("*.html"),
    ]:
        text = template.read_text()
        assert "|safe" not in text and "autoescape off" not in text, template


def test_styles_follow_the_system_colour_scheme():
    assert "prefers-color-scheme: dark" in (STATIC / "app.css").read_text()


@pytest.mark.urls("gateway.urls")
def test_the_site_routes_to_the_dashboard():
    assert resolve("/").func is views.index


# --- in a real browser (Debian's Chromium) against uvicorn serving the web tier ------------


@contextlib.asynccontextmanager
async def serve(port: int):
    """uvicorn with the web tier of gateway/asgi.py (HTTP + dashboard WebSocket) in this loop."""
    from django.core.asgi import get_asgi_application

    app = ProtocolTypeRouter(
        {
            "http": get_asgi_application(),
            "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
    async with run_server(app, port):
        yield


@pytest.mark.e2e
# WhiteNoise hands Django's ASGI handler a sync file iterator; Django warns on every static file.
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
@pytest.mark.django_db(transaction=True)
async def test_live_page_in_a_browser(user):
    from playwright.async_api import expect

    await sync_to_async(Device.objects.create)(id="evil", name=XSS, metrics={XSS: 1})
    # On the page before its first reading: a paged list shows the frames of its rows only.
    await sync_to_async(Device.objects.create)(id="roof-1")
    layer = get_channel_layer()
    await layer.flush()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with watched_page(base, None) as (page, problems):
        async with serve(port):
            await page.goto(base + "/")
            assert page.url == base + "/accounts/login/?next=/"
            await page.fill("#id_username", "alice")
            await page.fill("#id_password", "correct horse battery")
            await page.click("button[type=submit]")
            await page.wait_for_url(base + "/")

            conn = page.locator("#conn")
            await expect(conn).to_have_text("live")
            evil = page.locator('tr[data-device="evil"]')
            await expect(evil.locator(".name")).to_have_text(XSS)  # text, not markup
            await expect(evil.locator(".metric-name")).to_have_text(XSS)
            assert await page.locator("#devices img").count() == 0

            frames = [
                {
                    "type": "telemetry",
                    "device": "roof-1",
                    "ts": time.time(),
                    "metrics": {"temperature": 21.5, XSS: 2},
                },
                {"type": "status", "device": "roof-1", "online": True, "ts": time.time()},
            ]
            await layer.group_send("dashboard", {"type": "dashboard.events", "events": frames})
            roof = page.locator('tr[data-device="roof-1"]')
            await expect(roof.locator(".badge")).to_have_text("online")
            await expect(roof.locator(".metric")).to_have_count(2)
            await expect(roof.locator(".metric", has_text="temperature")).to_contain_text("21.5")
            await expect(roof.locator(".seen time")).to_contain_text("s ago")
            assert await page.locator("#devices img").count() == 0

        # The server goes away: the page says so, and comes back by itself.
        await expect(conn).to_have_class("conn conn-disconnected")
        async with serve(port):
            await expect(conn).to_have_text("live", timeout=15_000)
            # The fresh snapshot has only what the database knows.
            await expect(page.locator('tr[data-device="roof-1"] .metric')).to_have_count(0)
            await expect(page.locator('tr[data-device="evil"]')).to_have_count(1)
    await layer.flush()
    assert problems == []


# --- the device page ----------------------------------------------------------------------


@pytest.mark.django_db
def test_device_page_shows_the_command_panel_only_to_permitted_users(client, django_user_model):
    Device.objects.create(id="tasmota-7", name=XSS, metrics={XSS: 1, "POWER": True})
    viewer = django_user_model.objects.create_user("viewer", password="x" * 20)
    client.force_login(viewer)
    html = client.get("/devices/tasmota-7/").content.decode()
    assert 'id="no-permission"' in html and 'id="command-form"' not in html
    assert "quick-btn" not in html and 'data-can-command="0"' in html
    assert XSS not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    operator = django_user_model.objects.create_user("op", password="x" * 20, is_staff=True)
    client.force_login(operator)
    html = client.get("/devices/tasmota-7/").content.decode()
    assert 'id="command-form"' in html and 'data-can-command="1"' in html
    assert 'data-name="Power"' in html and "Power TOGGLE" in html  # Tasmota's buttons
    assert "/static/vendor/uplot/uPlot.iife.min.js" in html and "<script>" not in html


@pytest.mark.django_db
def test_device_page_for_unknown_and_invalid_ids(logged_in):
    # Not stored yet (the gateway batches writes): the page renders and waits for frames.
    assert logged_in.get("/devices/not-yet-1/").status_code == 200
    assert logged_in.get("/devices/bad%20id/").status_code == 404


@pytest.mark.django_db
def test_native_devices_get_only_the_free_form_form(client, django_user_model):
    """A native device's commands are its firmware's own: no guessed buttons, the form only."""
    Device.objects.create(id="sim-0001", metrics={"temperature": 20, "relay": True})
    client.force_login(django_user_model.objects.create_superuser("root", password="x" * 20))
    html = client.get("/devices/sim-0001/").content.decode()
    assert 'id="command-form"' in html and "quick-btn" not in html


@pytest.mark.skipif(
    not (Path(settings.BASE_DIR) / "node_modules" / "uplot").is_dir(), reason="needs npm ci"
)
@pytest.mark.django_db
def test_only_uplot_dist_is_served_from_node_modules(client):
    response = client.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    response.close()
    assert b"uPlot" in body
    assert client.get("/static/uplot/package.json").status_code == 404
    assert client.get("/static/vendor/uplot/../package.json").status_code == 404


@pytest.mark.django_db
def test_a_modbus_unit_is_offered_its_writable_points_and_a_tasmota_row_its_convention(
    client, django_user_model, monkeypatch, tmp_path
):
    """A Modbus config file naming the unit (docs/interface.md §7) gives its page a button
    per coil state; the list names each device's convention and folds Tasmota's diagnostics."""
    from devices.conventions import modbus_units

    config = tmp_path / "bus.json"
    config.write_text(
        '{"buses": [{"port": "tcp://127.0.0.1:1502", "units": '
        '[{"unit": 1, "device": "relays", "profile": "waveshare-relay-8ch"}]}]}'
    )
    monkeypatch.setitem(settings.GATEWAY, "MODBUS_CONFIG", [str(config)])
    monkeypatch.setattr(modbus_units, "_units", {})
    monkeypatch.setattr(modbus_units, "_loaded", False)  # read MODBUS_CONFIG afresh
    Device.objects.create(id="relays", transport="modbus", metrics={"relay1": False})
    Device.objects.create(id="plug", metrics={"POWER": True, "Wifi.RSSI": 80, "Heap": 25})
    client.force_login(django_user_model.objects.create_superuser("root", password="x" * 20))

    html = client.get("/devices/relays/").content.decode()
    assert 'data-name="relay8" data-args="{&quot;value&quot;: false}"' in html
    assert "relay1 on" in html and "Modbus" in html
    # The list's rows (convention, diagnostics folded) are app.js's:
    # tests/test_dashboard_fleet_browser.py.
