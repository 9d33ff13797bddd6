"""Every HTTP and WebSocket entry of the site refuses strangers; the command audit trail.

The URL tests walk Django's resolver and the WebSocket routes, so a view added tomorrow is checked
without anyone remembering to: anonymous callers are refused everywhere except the documented public
entries (docs/interface.md §5), and a logged-in POST without a CSRF token is refused everywhere.
(Per-view stories live in test_api.py, test_command_api.py, test_dashboard_*.py.)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve

from dashboard.routing import websocket_urlpatterns
from devices.commands import service as commands
from devices.models import Command, Device
from tests.support.servers import free_port

#: The only entries a stranger may use (docs/interface.md §5); static files are served by WhiteNoise
#: before the URLconf and are not in it.
PUBLIC = {"healthz", "metrics", "login", "admin:login", "favicon"}
#: Where a refused browser is sent.
LOGIN_PATHS = {"/accounts/login/", "/admin/login/"}
#: Values for path converters and regex groups when a route is turned into a sample URL.
SAMPLES = {"int": "1", "uuid": str(uuid.UUID(int=1)), "path": "x1", "str": "x1", "slug": "x1"}
REFUSED_STATUS = {401, 403}


def routes(patterns=None, prefix: str = "", namespace: str = "") -> Iterator[tuple[str, str]]:
    """(route as the resolver spells it, namespaced name) of every URL pattern of the site."""
    for entry in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(entry, URLResolver):
            ns = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            yield from routes(entry.url_patterns, prefix + str(entry.pattern), ns)
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), f"{namespace}{entry.name or ''}"


def _fill_group(match: re.Match[str]) -> str:
    inner = match.group(2)
    if re.fullmatch(r"[\w-]+(\|[\w-]+)*", inner):  # a choice of literals: take the first
        return inner.split("|")[0]
    if inner == "[0-9]+":
        return "1"
    return "nothing-here" if inner == ".*" else "x1"


def sample_url(route: str) -> str:
    """A concrete path that resolves to `route` (converters and groups filled with samples)."""
    url = re.sub(r"\(\?P<(\w+)>(.*?)\)(?=/|\$|$)", _fill_group, route)
    url = re.sub(r"<(?:(\w+):)?\w+>", lambda m: SAMPLES[m.group(1) or "str"], url)
    url = url.replace("^", "").replace("$", "").replace("/?", "/")
    return "/" + url


ROUTES = sorted(set(routes()))


def test_the_walk_finds_the_whole_site():
    """The walk itself: it sees every room, and each sample URL reaches its own route."""
    names = {name for _, name in ROUTES}
    assert {"dashboard:index", "dashboard:device", "admin:index", "login", "logout"} <= names
    assert {"devices:device-list", "devices:device-commands", "devices:command-status"} <= names
    assert PUBLIC <= names
    for route, _ in ROUTES:
        match = resolve(sample_url(route))
        assert match.route.replace("^", "") == route.replace("^", ""), route
        assert set(match.kwargs.values()) <= {*SAMPLES.values(), "auth", "nothing-here"}, route


def refused(response) -> bool:
    """Refused: 401/403, or sent (through any redirects) to a login page."""
    if response.status_code in REFUSED_STATUS:
        return True
    chain = getattr(response, "redirect_chain", [])
    return (
        bool(chain)
        and response.status_code == 200
        and response.request["PATH_INFO"] in (LOGIN_PATHS)
    )


@pytest.mark.django_db
@pytest.mark.parametrize(("route", "name"), [r for r in ROUTES if r[1] not in PUBLIC])
def test_strangers_are_refused_everywhere_but_the_public_entries(client: Client, route, name):
    url = sample_url(route)
    for method in ("get", "post"):
        response = getattr(client, method)(url, follow=True)
        expected = stranger_answer(name, method)
        if expected == "login":  # a page: the browser is sent to a login page
            assert refused(response) and response.redirect_chain, (name, method, response)
        else:
            assert response.status_code == expected, (name, method, response.status_code)
        if name in API_POSTS | API_NO_POST:  # the JSON API answers JSON, refusals included
            assert "error" in response.json(), (name, method, response.content[:200])
    assert not Command.objects.exists()


#: Pages that serve only POST (Django's LogoutView): a GET is 405, whoever asks.
POST_ONLY_PAGES = {"logout"}
#: The JSON API's entries that take a POST and no GET (§5.3, §8).
API_POST_ONLY = {"devices:device-commands", "alerts:acknowledge"}


def stranger_answer(name: str, method: str) -> int | str:
    """What an anonymous GET or POST to an entry gets (docs/interface.md §5): the JSON API 401
    for what it serves and 405 for what it does not (the method check first); a page sends
    the browser to log in ("login"), except the methods it does not serve (405)."""
    if name in API_POSTS or name in API_NO_POST:
        if name in API_POST_ONLY:
            served = {"post"}
        elif name in API_POSTS:  # a list that also creates (the alert rules)
            served = {"get", "post"}
        else:
            served = {"get"}
        return 401 if method in served else 405
    if name in POST_ONLY_PAGES and method == "get":
        return 405
    return "login"


@pytest.mark.django_db
@pytest.mark.parametrize(("route", "name"), [r for r in ROUTES if r[1] in PUBLIC])
def test_the_public_entries_answer_strangers(client: Client, settings, route, name):
    # No broker listens where this gateway looks: /healthz answers 503, the rest 200.
    settings.GATEWAY = {**settings.GATEWAY, "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}"}
    response = client.get(sample_url(route))
    assert response.status_code == {"healthz": 503, "favicon": 204}.get(name, 200), name


#: The JSON API's POST entries (docs/interface.md §5.1, §5.3, §8): a POST without the CSRF token
#: answers `403 {"error", "code": "csrf_failed"}`.
API_POSTS = {"devices:device-commands", "alerts:rules", "alerts:acknowledge"}
#: The JSON API's entries that take no POST: `405 {"error": "method not allowed…"}` (§5.1).
API_NO_POST = {
    "alerts:alert",
    "alerts:alert-list",
    "alerts:rule",
    "devices:device-list",
    "devices:device-telemetry",
    "devices:command-status",
    "devices:discovery",
}


def test_the_csrf_walk_knows_every_api_entry():
    api = {name for route, name in ROUTES if route.startswith("api/")}
    assert api == API_POSTS | API_NO_POST, "an /api/ entry this walk does not classify"


def forged_post(route: str):
    """A logged-in superuser's POST without the CSRF token to `route`; the client after it."""
    root = User.objects.create(username="root", is_staff=True, is_superuser=True)
    Device.objects.create(id="x1")
    client = Client(enforce_csrf_checks=True)
    client.force_login(root)
    return client.post(sample_url(route), {"name": "reboot"}), client


@pytest.mark.django_db
@pytest.mark.parametrize(("route", "name"), ROUTES)
def test_a_logged_in_post_without_csrf_token_is_refused_everywhere(route, name):
    """Session cookies ride along on cross-site requests; the CSRF token is what a forged
    form cannot have. A page refuses such a POST with 403 (Django's CSRF page); the JSON API
    with 403 `csrf_failed` where it takes a POST, else 405 (docs/interface.md §5.1)."""
    response, client = forged_post(route)
    assert not Command.objects.exists()
    assert client.get("/api/devices/").status_code == 200  # still logged in: nothing changed
    if name in API_NO_POST:
        assert response.status_code == 405, (name, response.status_code)
        assert response.json()["error"].startswith("method not allowed"), response.content
    elif name in API_POSTS:
        assert response.status_code == 403, (name, response.status_code)
        assert response.json()["code"] == "csrf_failed", response.content
    else:
        assert response.status_code == 403, (name, response.status_code)
        assert b"CSRF verification failed" in response.content, response.content[:200]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("route", [str(p.pattern) for p in websocket_urlpatterns])
async def test_anonymous_websocket_handshakes_are_refused_on_every_route(route):
    from gateway.asgi import application

    url = sample_url(route)
    communicator = WebsocketCommunicator(
        application, url, headers=[(b"host", b"testserver"), (b"origin", b"http://testserver")]
    )
    connected, _ = await communicator.connect(timeout=5)
    assert not connected, f"anonymous WebSocket {url} was accepted"
    await communicator.disconnect()


# --- the audit trail: who commanded what, in the admin ------------------------------------


def _audit_setup() -> tuple[User, User, Command, Command]:
    # No passwords: the tests log in with force_login, and hashing costs ~1 s per user.
    root = User.objects.create(username="root", is_staff=True, is_superuser=True)
    ops = User.objects.create(username="ops", is_staff=True)
    Device.objects.create(id="pump-1")
    by_root = commands.create_command(root, "pump-1", {"name": "relay", "args": {"state": True}})
    by_ops = commands.create_command(ops, "pump-1", {"name": "reboot", "args": {"delay": 7}})
    return root, ops, by_root, by_ops


@pytest.mark.django_db(transaction=True)
async def test_admin_shows_who_commanded_what_and_filters_by_user(layer):
    root, ops, by_root, by_ops = await database_sync_to_async(_audit_setup)()
    client = AsyncClient()
    await client.aforce_login(root)
    listing = (await client.get("/admin/devices/command/")).content.decode()
    for column in ("Created at", "Device", "Name", "Args", "Status", "Created by", "Sent at"):
        assert f">{column}<" in listing or f">{column}</a>" in listing, column
    assert "pump-1" in listing and "{&quot;delay&quot;: 7}" in listing

    # Filter by who sent it: only ops's command is listed.
    only_ops = await client.get("/admin/devices/command/", {"created_by__id__exact": ops.pk})
    text = only_ops.content.decode()
    assert only_ops.status_code == 200
    assert f"/admin/devices/command/{by_ops.id}/change/" in text
    assert f"/admin/devices/command/{by_root.id}/change/" not in text

    # The detail page shows every field and lets nobody edit one.
    detail = (await client.get(f"/admin/devices/command/{by_ops.id}/change/")).content.decode()
    for label in ("Device", "Name", "Args", "Status", "Created by", "Created at", "Finished at"):
        assert f">{label}:<" in detail, label
    assert 'name="_save"' not in detail and 'name="name"' not in detail  # no form, no save
    edit = await client.post(f"/admin/devices/command/{by_ops.id}/change/", {"name": "x"})
    assert edit.status_code == 403
    assert (await Command.objects.aget(pk=by_ops.id)).name == "reboot"


def test_redirects_to_login_carry_the_page_asked_for(client: Client, db):
    """A refused browser comes back where it wanted to go after logging in."""
    response = client.get("/devices/x1/")
    assert response.status_code == 302
    location = urlsplit(response["Location"])
    assert location.path == "/accounts/login/" and "next=/devices/x1/" in location.query
