"""Login throttling (django-axes): wrong passwords for one user from one address are refused.

After GATEWAY_LOGIN_FAILURE_LIMIT failures the (user name, address) pair gets 429, even with
the right password, on both login forms; other users and other addresses are unaffected; every
failure and the lockout are logged.
"""

from __future__ import annotations

import logging

import pytest
from django.conf import settings

pytestmark = pytest.mark.django_db

LOGIN_FORMS = ["/accounts/login/", "/admin/login/"]


@pytest.fixture
def users(django_user_model):
    django_user_model.objects.create_user("alice", password="right-horse-battery", is_staff=True)
    django_user_model.objects.create_user("bob", password="bob-staple-correct", is_staff=True)


def attempt(client, path: str, username: str, password: str, address: str = "192.0.2.10"):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.mark.parametrize("path", LOGIN_FORMS)
def test_a_guessed_password_is_refused_after_the_limit(client, users, path, caplog):
    caplog.set_level(logging.WARNING, logger="axes")
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        assert attempt(client, path, "alice", "guess").status_code == 200  # the form again
    assert attempt(client, path, "alice", "guess").status_code == 429  # the limit-th locks
    assert attempt(client, path, "alice", "right-horse-battery").status_code == 429
    assert attempt(client, path, "bob", "bob-staple-correct").status_code == 302, "other users"
    assert attempt(client, path, "alice", "right-horse-battery", "198.51.100.7").status_code == 302
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "Locking out" in logged and "192.0.2.10" in logged, "the lockout and the address"
    assert "alice" not in logged, "user names stay masked"


def test_a_success_before_the_limit_forgets_the_failures(client, users):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        attempt(client, "/accounts/login/", "alice", "guess")
    assert attempt(client, "/accounts/login/", "alice", "right-horse-battery").status_code == 302
    client.logout()
    for _ in range(limit - 1):
        assert attempt(client, "/accounts/login/", "alice", "guess").status_code == 200
