"""Production settings: `check --deploy` is clean, HTTPS is enforced, plain-HTTP LANs still work.

The decision (gateway/settings.py, README): DJANGO_HTTPS says the site is reached over HTTPS
and turns on Secure cookies, the HTTPS redirect and HSTS. It is an explicit choice: set it, or
declare the TLS proxy's header (DJANGO_SECURE_PROXY_SSL_HEADER); naming the host is not
enough, so a Pi reached over plain http://pi.local:8000/ keeps working.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import secrets
import subprocess
import sys
from types import ModuleType

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.support.gateway import ROOT, SCRUBBED, GatewayProcess

STRONG_KEY = secrets.token_urlsafe(50)
PRODUCTION = {"DJANGO_DEBUG": "0", "DJANGO_ALLOWED_HOSTS": "gw.example.com", "DJANGO_HTTPS": "1"}
SHOWN = [
    "DEBUG",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
]


def clean_env(tmp_path, **extra: str) -> dict[str, str]:
    """This process's environment without the gateway's and Django's own variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SCRUBBED and not k.startswith(("DJANGO_", "GATEWAY_"))
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "gateway.settings",
            "GATEWAY_SECRET_KEY_FILE": str(tmp_path / "secret_key"),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        }
    )
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def settings_in(monkeypatch, env: dict[str, str]) -> ModuleType:
    """gateway/settings.py evaluated afresh under `env` (Django's live settings untouched)."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("settings_probe", ROOT / "gateway/settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_production_settings_pass_check_deploy_with_no_warning(tmp_path):
    env = clean_env(tmp_path, DJANGO_SECRET_KEY=STRONG_KEY, **PRODUCTION)
    result = manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_the_generated_secret_is_good_enough_for_production(tmp_path, monkeypatch):
    """No DJANGO_SECRET_KEY: a key generated once into a 0600 file, kept across restarts."""
    env = clean_env(tmp_path, **PRODUCTION)
    key = settings_in(monkeypatch, env).SECRET_KEY
    key_file = tmp_path / "secret_key"
    assert key_file.read_text() == key and key_file.stat().st_mode & 0o077 == 0
    assert settings_in(monkeypatch, env).SECRET_KEY == key  # sessions survive restarts
    elsewhere = clean_env(tmp_path / "other", **PRODUCTION)
    (tmp_path / "other").mkdir()
    assert settings_in(monkeypatch, elsewhere).SECRET_KEY != key  # never a fixed secret
    result = manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("key", ["short", "django-insecure-" + "x" * 60, "ab" * 40])
def test_production_refuses_a_guessable_secret(tmp_path, monkeypatch, key):
    with pytest.raises(ImproperlyConfigured, match="DJANGO_SECRET_KEY is too weak"):
        settings_in(monkeypatch, clean_env(tmp_path, DJANGO_SECRET_KEY=key, **PRODUCTION))
    # Out of the box (no hosts named) the same key is accepted: a LAN or development setup.
    assert settings_in(monkeypatch, clean_env(tmp_path, DJANGO_SECRET_KEY=key)).SECRET_KEY == key


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # Out of the box: plain HTTP works (cookies without Secure, no redirect, no HSTS).
        ({}, (False, False, False, 0, None)),
        (
            {"DJANGO_DEBUG": "1", "DJANGO_ALLOWED_HOSTS": "gw.example.com"},
            (True, False, False, 0, None),
        ),
        # A configured deployment: HTTPS everywhere.
        (PRODUCTION, (False, True, True, 3600, None)),
        # A Pi on a LAN with its name configured but no TLS: plain HTTP unless told otherwise.
        ({**PRODUCTION, "DJANGO_HTTPS": "0"}, (False, False, False, 0, None)),
        ({"DJANGO_DEBUG": "0", "DJANGO_ALLOWED_HOSTS": "pi.local"}, (False, False, False, 0, None)),
        # Declaring the TLS proxy's header says the site is served over HTTPS.
        (
            {"DJANGO_DEBUG": "0", "DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto"},
            (False, True, True, 3600, ("HTTP_X_FORWARDED_PROTO", "https")),
        ),
        (
            {
                **PRODUCTION,
                "DJANGO_HSTS_SECONDS": "31536000",
                "DJANGO_SSL_REDIRECT": "0",
                "DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
            },
            (False, True, False, 31536000, ("HTTP_X_FORWARDED_PROTO", "https")),
        ),
    ],
)
def test_https_settings_follow_the_environment(tmp_path, monkeypatch, extra, expected):
    module = settings_in(monkeypatch, clean_env(tmp_path, DJANGO_SECRET_KEY=STRONG_KEY, **extra))
    seen = {name: getattr(module, name) for name in SHOWN}
    debug, secure, redirect, hsts, proxy = expected
    assert seen["DEBUG"] is debug
    assert seen["SESSION_COOKIE_SECURE"] is secure and seen["CSRF_COOKIE_SECURE"] is secure
    assert seen["SECURE_SSL_REDIRECT"] is redirect
    assert seen["SECURE_HSTS_SECONDS"] == hsts
    assert seen["SECURE_PROXY_SSL_HEADER"] == proxy
    assert seen["SECURE_HSTS_PRELOAD"] is False  # only its domain's owner may opt in


def get(gw: GatewayProcess, path: str, headers: dict[str, str] | None = None):
    """One plain-HTTP GET, redirects not followed; (status, headers as a multi-dict)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status, response.headers
    finally:
        conn.close()


def test_a_production_gateway_behind_a_tls_proxy(mosquitto):
    """The real gateway with production settings, its TLS proxy played by X-Forwarded-Proto:
    plain HTTP is redirected except the probes; HTTPS answers carry Secure cookies and HSTS."""
    env = {
        "DJANGO_DEBUG": "0",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
        "DJANGO_SECRET_KEY": STRONG_KEY,
    }
    with GatewayProcess(mosquitto.url, env=env) as gw:
        assert "| web HTTPS behind a TLS proxy (DJANGO_SECURE_PROXY_SSL_HEADER" in gw.log_text()
        status, headers = get(gw, "/accounts/login/")
        assert status == 301
        assert headers["Location"] == f"https://127.0.0.1:{gw.port}/accounts/login/"
        for probe in ("/healthz", "/metrics"):  # scraped over plain HTTP inside the host
            assert get(gw, probe)[0] == 200, probe

        status, headers = get(gw, "/accounts/login/", {"X-Forwarded-Proto": "https"})
        assert status == 200
        cookie = next(c for c in headers.get_all("Set-Cookie") if c.startswith("csrftoken="))
        assert "Secure" in cookie and "SameSite=Lax" in cookie
        assert headers["Strict-Transport-Security"] == "max-age=3600; includeSubDomains"
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        # No debug pages: an unknown page is a plain 404, not Django's technical page.
        status, headers = get(gw, "/no-such-page", {"X-Forwarded-Proto": "https"})
        assert status == 404
