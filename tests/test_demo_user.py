"""`ensure_demo_user`: the demo login sees what the README promises in /admin/, read-only."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db

ADMIN_LISTS = [
    "/admin/devices/device/",
    "/admin/devices/reading/",
    "/admin/devices/command/",
    "/admin/alerts/alertrule/",
    "/admin/alerts/alert/",
]


def ensure(*args: str) -> str:
    out = io.StringIO()
    call_command("ensure_demo_user", *args, stdout=out)
    return out.getvalue()


def test_the_demo_login_views_every_admin_list_and_changes_nothing(client):
    password = re.search(r"demo / (\S+)", ensure()).group(1)
    assert (
        client.post("/accounts/login/", {"username": "demo", "password": password}).status_code
        == 302
    )
    for path in ADMIN_LISTS:
        assert client.get(path).status_code == 200, path
    assert client.get("/admin/devices/device/add/").status_code == 403
    assert client.get("/admin/auth/user/").status_code == 403, "users stay the superuser's"


def test_the_password_is_kept_unless_reset():
    first = re.search(r"demo / (\S+)", ensure()).group(1)
    assert "(unchanged)" in ensure() and first not in ensure()
    user = get_user_model().objects.get(username="demo")
    assert user.check_password(first)
    second = re.search(r"demo / (\S+)", ensure("--reset-password")).group(1)
    user.refresh_from_db()
    assert second != first and user.check_password(second)


def test_a_refused_admin_page_is_logged_in_one_line_without_a_traceback(client, caplog):
    password = re.search(r"demo / (\S+)", ensure()).group(1)
    client.post("/accounts/login/", {"username": "demo", "password": password})
    with caplog.at_level("WARNING", logger="django.request"):
        assert client.get("/admin/devices/device/add/").status_code == 403
    forbidden = [r for r in caplog.records if r.name == "django.request"]
    assert forbidden and all(r.exc_info is None for r in forbidden), "no PermissionDenied trace"


def test_the_readings_list_shows_stored_readings_and_nothing_to_change(client):
    """Readings are keyed by (device, metric, ts): the admin lists them, newest first within a
    series, with no change or delete page (devices/admin.py `ReadingAdmin`)."""
    from datetime import UTC, datetime

    from devices.models import Device, Reading

    device = Device.objects.create(id="d1")
    for second, value in ((1, 19.25), (2, 19.75)):
        Reading.objects.create(
            device=device, metric="t", ts=datetime(2026, 11, 27, 4, 46, second, tzinfo=UTC),
            value=value,
        )  # fmt: skip
    password = re.search(r"demo / (\S+)", ensure()).group(1)
    client.post("/accounts/login/", {"username": "demo", "password": password})
    page = client.get("/admin/devices/reading/?q=d1").content.decode()
    assert page.index("19.75") < page.index("19.25")
    assert "/admin/devices/reading/" in page and "/change/" not in page.split("result_list")[1]
    assert client.get("/admin/devices/reading/d1/change/").status_code == 404
