"""`POST /api/devices/<id>/commands`, `GET /api/commands/<id>` and the Command admin, through
Django's full middleware stack (sessions, CSRF, auth) with the real database and channel layer."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission, User
from django.test import AsyncClient

from devices.commands import service as commands
from devices.models import Command, Device
from tests.support.checks import nothing_came_before

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/devices/d1/commands"


@pytest.fixture
async def device_channel(layer):
    """What device d1's consumer would receive (group ``device.d1``)."""
    await database_sync_to_async(Device.objects.create)(id="d1")
    channel = await layer.new_channel()
    await layer.group_add("device.d1", channel)
    return channel


def make_user(username: str, *, staff: bool = False, perm: bool = False) -> User:
    user = User.objects.create_user(username, password=f"pw-{username}-12345", is_staff=staff)
    if perm:
        user.user_permissions.add(Permission.objects.get(codename="send_command"))
    return user


async def client_for(username: str | None, *, csrf: bool = False, **kwargs) -> AsyncClient:
    client = AsyncClient(enforce_csrf_checks=csrf)
    if username is not None:
        user = await database_sync_to_async(make_user)(username, **kwargs)
        await client.aforce_login(user)
    return client


async def post(client: AsyncClient, body, url: str = URL, **kwargs):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return await client.post(url, data=data, content_type="application/json", **kwargs)


async def test_post_is_202_pending_and_reaches_the_device(layer, device_channel):
    client = await client_for("ops", staff=True)
    response = await post(client, {"name": "set_interval", "args": {"seconds": 5}})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "pending" and body["device"] == "d1"
    assert body["name"] == "set_interval"
    assert response["Location"] == body["url"] == f"/api/commands/{body['id']}"
    async with asyncio.timeout(5):
        assert await layer.receive(device_channel) == {"type": "device.command", "id": body["id"]}

    status = await client.get(body["url"])
    assert status.status_code == 200
    view = status.json()
    assert view["id"] == body["id"] and view["status"] == "pending"
    assert view["args"] == {"seconds": 5} and view["created_by"] == "ops"
    assert isinstance(view["created_at"], float)
    assert view["sent_at"] is None and view["finished_at"] is None
    assert view["result"] is None and view["error"] is None
    assert view["timeout"] == 10.0


async def test_status_follows_the_lifecycle(layer, device_channel):
    client = await client_for("ops", staff=True)
    body = (await post(client, {"name": "ping", "timeout": 2})).json()

    async def send(command: dict) -> None:
        pass

    assert await commands.deliver(body["id"], send)
    view = (await client.get(body["url"])).json()
    assert view["status"] == "sent" and view["sent_at"] >= view["created_at"]
    assert await commands.apply_ack("d1", body["id"], True, {"pong": 1}, "")
    view = (await client.get(body["url"])).json()
    assert (view["status"], view["result"], view["timeout"]) == ("acked", {"pong": 1}, 2.0)
    assert view["finished_at"] >= view["sent_at"]


async def test_anonymous_is_401(layer, device_channel):
    client = AsyncClient(enforce_csrf_checks=True)
    response = await post(client, {"name": "ping"})
    assert response.status_code == 401
    assert response.json()["error"] == "authentication required"
    assert (await client.get(f"/api/commands/{uuid.uuid4()}")).status_code == 401
    await nothing_came_before(layer, device_channel)


async def test_without_permission_is_403_and_nothing_reaches_the_device(layer, device_channel):
    client = await client_for("viewer")
    response = await post(client, {"name": "reboot"})
    assert response.status_code == 403
    assert response.json() == {"error": "you may not send commands", "code": "forbidden"}
    await nothing_came_before(layer, device_channel)
    assert await Command.objects.acount() == 0


async def test_the_permission_alone_is_enough(layer, device_channel):
    client = await client_for("operator", perm=True)
    assert (await post(client, {"name": "ping"})).status_code == 202


async def test_unknown_device_and_command_are_404(layer, device_channel):
    client = await client_for("ops", staff=True)
    response = await post(client, {"name": "ping"}, url="/api/devices/ghost/commands")
    assert response.status_code == 404 and response.json()["code"] == "unknown_device"
    for command_id in (uuid.uuid4(), "not-a-uuid"):
        assert (await client.get(f"/api/commands/{command_id}")).status_code == 404


@pytest.mark.parametrize(
    "body", [b"{not json", b"[1]", {"args": {}}, {"name": "a b"}, {"name": "x", "args": 5}]
)
async def test_bad_input_is_400(layer, device_channel, body):
    client = await client_for("ops", staff=True)
    response = await post(client, body)
    assert response.status_code == 400
    assert response.json()["code"] == "bad_request" and response.json()["error"]
    await nothing_came_before(layer, device_channel)


async def test_rate_limited_is_429_with_retry_after(layer, device_channel, settings):
    settings.GATEWAY = {**settings.GATEWAY, "COMMAND_RATE_COUNT": 2, "COMMAND_RATE_SECONDS": 30}
    client = await client_for("ops", staff=True)
    for _ in range(2):
        assert (await post(client, {"name": "ping"})).status_code == 202
    response = await post(client, {"name": "ping"})
    assert response.status_code == 429
    assert response.json()["code"] == "rate_limited"
    assert "at most 2 commands per 30 s" in response.json()["error"]
    assert 1 <= int(response["Retry-After"]) <= 30
    assert await Command.objects.acount() == 2


async def test_get_on_the_send_path_is_405(layer, device_channel):
    client = await client_for("ops", staff=True)
    response = await client.get(URL)
    assert response.status_code == 405 and response["Allow"] == "POST"


async def test_csrf_is_enforced_for_session_authenticated_posts(layer, device_channel):
    client = await client_for("ops", csrf=True, staff=True)
    refused = await post(client, {"name": "ping"})
    assert refused.status_code == 403
    assert refused.json()["code"] == "csrf_failed"
    assert "X-CSRFToken" in refused.json()["error"]
    await nothing_came_before(layer, device_channel)

    # What a script does: fetch a page that sets the csrftoken cookie, send it back as a header.
    await client.get("/accounts/login/")
    token = client.cookies["csrftoken"].value
    wrong = await post(client, {"name": "ping"}, headers={"X-CSRFToken": "x" * 32})
    assert wrong.status_code == 403
    accepted = await post(client, {"name": "ping"}, headers={"X-CSRFToken": token})
    assert accepted.status_code == 202, accepted.content


# --- the admin: a read-only audit trail -----------------------------------------------------


def _admin_setup() -> tuple[User, Command]:
    root = User.objects.create_superuser("root", password="pw-root-12345")
    Device.objects.create(id="d1")
    command = commands.create_command(root, "d1", {"name": "set_interval", "args": {"s": 5}})
    return root, command


async def test_admin_lists_commands_read_only(layer):
    root, command = await database_sync_to_async(_admin_setup)()
    client = AsyncClient()
    await client.aforce_login(root)
    listing = await client.get("/admin/devices/command/", {"q": "set_interval"})
    assert listing.status_code == 200
    text = listing.content.decode()
    change_url = f"/admin/devices/command/{command.id}/change/"
    assert change_url in text and "root" in text
    filtered = await client.get("/admin/devices/command/", {"status__exact": "acked"})
    assert filtered.status_code == 200 and change_url not in filtered.content.decode()
    detail = await client.get(change_url)
    assert detail.status_code == 200  # viewable
    assert (await client.get("/admin/devices/command/add/")).status_code == 403
    deleted = await client.post(f"/admin/devices/command/{command.id}/delete/", {"post": "yes"})
    assert deleted.status_code == 403
    assert await Command.objects.filter(pk=command.id).aexists()
