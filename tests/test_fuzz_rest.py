"""Hostile REST callers, property-based: every answer is JSON, 4xx for bad input, never 500.

Through Django's full stack (sessions, auth, CSRF, the real database) a logged-in staff user
sends arbitrary history queries (``metric``, ``since``, ``until``, ``max_points``, odd device
ids) and arbitrary command bodies (bytes, broken, huge or deeply nested JSON, bad names, args
and timeouts). Well-formed requests must succeed and honour their bounds; anything else gets a
JSON ``{"error": …}`` with a 4xx status predicted by a model of docs/interface.md §5.
"""

from __future__ import annotations

import asyncio
import math
import string
import unicodedata
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import orjson
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import AsyncClient, override_settings
from hypothesis import example, given
from hypothesis import strategies as st

from devices.models import Device, Reading
from tests.support.fuzz import fuzz
from tests.support.runtime import stop_loop_services
from tests.test_fuzz_parsing import json_document, odd_text

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = "rest-1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
POINTS = 50  # readings of metric "t", one a minute from T0
NAME_CHARS = set(string.ascii_letters + string.digits + "_.:-")

utf8_text = st.text(st.characters(codec="utf-8"), max_size=40)
moment = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.timezones()
)
good_time = st.one_of(
    moment.map(lambda d: d.isoformat()),
    moment.map(lambda d: d.astimezone(UTC).isoformat().replace("+00:00", "Z")),
    moment.map(lambda d: repr(d.timestamp())),
    moment.map(lambda d: str(int(d.timestamp() * 1000))),
)
hostile_time = st.one_of(
    utf8_text,
    st.floats().map(repr),
    st.integers().map(str),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "nan",
            "inf",
            "1e400",
            "-1e20",
            " ",
            "2026-13-01",
            "2026-01-01T00:00:00+25:00",
            "1_700_000_000",
        ]
    ),
)
good_points = st.integers(1, 10_000).map(str)
hostile_points = st.one_of(
    utf8_text, st.integers().map(str), st.sampled_from(["0", "10001", "1e3", "٣", "9" * 5000])
)


def tagged(good, hostile):
    """(value, known_good) so the test knows when a 200 is owed."""
    return st.one_of(good.map(lambda v: (v, True)), hostile.map(lambda v: (v, False)))


def seconds(text: str) -> float:
    """A good time parameter as epoch seconds (the contract: ISO 8601 or epoch s, ms ≥ 1e11)."""
    try:
        number = float(text)
    except ValueError:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return number / 1000 if abs(number) >= 1e11 else number


def _routable(device: str) -> bool:
    """An id the URL pattern routes to our view (one non-empty path segment); others are
    Django's own 404 for an unknown path."""
    return bool(device) and "/" not in device


def create_history() -> None:
    Device.objects.create(id=DEVICE)
    Reading.objects.bulk_create(
        Reading(device_id=DEVICE, metric="t", ts=T0 + timedelta(minutes=i), value=float(i))
        for i in range(POINTS)
    )


@pytest.fixture
def staff(db) -> User:
    create_history()
    return User.objects.create_user("fuzz", password="x", is_staff=True)


class Caller:
    """A logged-in AsyncClient on one event loop shared by all examples."""

    def __init__(self, runner: asyncio.Runner, user: User) -> None:
        self.runner = runner
        self.client = AsyncClient()
        runner.run(self.client.aforce_login(user))

    def get(self, path: str, params: dict[str, str]):
        return self.runner.run(self.client.get(path, params))

    def post(self, path: str, body: bytes):
        return self.runner.run(self.client.post(path, body, content_type="application/json"))


def json_error(response, *statuses: int) -> dict:
    assert response.status_code in statuses, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    body = orjson.loads(response.content)
    assert isinstance(body, dict) and isinstance(body["error"], str)
    return body


def test_history_queries_are_answered_within_their_bounds_or_refused_with_400(staff):
    with asyncio.Runner() as runner:
        caller = Caller(runner, staff)
        try:
            history_examples(caller)
        finally:
            runner.run(stop_loop_services())


def history_examples(caller: Caller) -> None:
    @fuzz(60)
    @given(
        device=st.one_of(st.just(DEVICE), odd_text.filter(_routable)),
        metric=tagged(st.sampled_from(["t", "u", "t.x"]), st.one_of(utf8_text, st.just(""))),
        since=st.none() | tagged(good_time, hostile_time),
        until=st.none() | tagged(good_time, hostile_time),
        max_points=st.none() | tagged(good_points, hostile_points),
    )
    @example(DEVICE, ("t", True), ("0001-01-01T00:00:00+01:00", False), None, None)
    @example(DEVICE, ("t", True), None, ("9999-12-31T23:59:59-01:00", False), None)
    @example(DEVICE, ("t", True), None, None, ("9" * 5000, False))
    @example(DEVICE, ("t", True), None, None, ("1", False))  # a "hostile" draw that is valid
    @example(DEVICE, ("t\0", False), None, None, None)
    def check(device, metric, since, until, max_points):
        params = {"metric": metric[0]}
        for name, value in (("since", since), ("until", until), ("max_points", max_points)):
            if value is not None:
                params[name] = value[0]
        path = f"/api/devices/{quote(device, safe='')}/telemetry"
        response = caller.get(path, params)
        good = [v for v in (metric, since, until, max_points) if v is not None]
        ordered = (
            since is None
            or until is None
            or not (since[1] and until[1])
            or seconds(since[0]) <= seconds(until[0])
        )
        if device != DEVICE:
            json_error(response, 400, 404)
            return
        if any(unicodedata.category(c) == "Cc" for c in metric[0]) or len(metric[0]) > 200:
            json_error(response, 400)  # never a stored metric name
            return
        if not (all(known for _, known in good) and ordered):
            if response.status_code != 200:
                json_error(response, 400)
                return
        assert response.status_code == 200, (params, response.content[:300])
        body = orjson.loads(response.content)
        assert body["device"] == DEVICE and body["metric"] == metric[0]
        points = body["points"]
        # Answered 200: whatever was sent as max_points parsed as the server parses it (a
        # "hostile" draw may be a valid number such as "1").
        limit = int(max_points[0]) if max_points is not None and max_points[0].strip() else 1000
        assert len(points) <= limit
        assert [p[0] for p in points] == sorted(p[0] for p in points)
        assert all(math.isfinite(t) and math.isfinite(v) for t, v in points)
        if since is not None and since[1]:
            assert all(t >= seconds(since[0]) - 1e-3 for t, _ in points)
        if until is not None and until[1]:
            assert all(t <= seconds(until[0]) + 1e-3 for t, _ in points)
        if metric[0] == "t" and since is None and until is None and limit >= POINTS:
            assert points == [[(T0 + timedelta(minutes=i)).timestamp(), i] for i in range(POINTS)]

    check()


# --- POST /api/devices/<id>/commands ------------------------------------------------------

scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=6),
)
command_body = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(
            st.sampled_from(["reboot", "set_interval", "a" * 64, "a" * 65, "reboot\n"]),
            odd_text,
            scalar,
        ),
        "args": st.one_of(json_document(10), st.just({"seconds": 5}), st.just(None)),
        "timeout": st.one_of(scalar, st.floats(0, 4000), st.sampled_from([0.1, 3600, 0])),
    },
).map(lambda d: orjson.dumps({k: v for k, v in d.items() if not _non_finite(v)}))
#: Well-formed commands, fuzzed within the rules: any legal name, args, timeout.
good_command = st.fixed_dictionaries(
    {"name": st.text("".join(sorted(NAME_CHARS)), min_size=1, max_size=64)},
    optional={
        "args": st.dictionaries(st.text(max_size=8), json_document(10), max_size=4),
        "timeout": st.floats(0.1, 3600),
    },
)
bodies = st.one_of(
    command_body,
    good_command.map(orjson.dumps),
    command_body.map(lambda b: b"  " + b + b"\n"),
    st.binary(max_size=60),
    json_document(10).map(orjson.dumps),
    st.sampled_from(
        [
            b"",
            b"[" * 3000 + b"]" * 3000,
            b'{"name": "a", "args": ' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}",
            b'{"name": "a", "args": {"x": "' + b"y" * (17 * 1024) + b'"}}',
            b'{"name": "a", "pad": "' + b"y" * (65 * 1024) + b'"}',
            b'{"name": "a", "timeout": NaN}',
            b'{"name": "a", "timeout": 1e400}',
        ]
    ),
)


def _non_finite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def has_nul(value) -> bool:
    """Whether a decoded JSON value holds U+0000 in any key or string (PostgreSQL can't)."""
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    return isinstance(value, list) and any(has_nul(v) for v in value)


def expected_status(device: str, body: bytes) -> int:
    """docs/interface.md §5 and docs/architecture.md "Commands": what POSTing `body` must answer."""
    if len(body) > 64 * 1024:
        return 400
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 400
    if not isinstance(data, dict):
        return 400
    name, args, timeout = data.get("name"), data.get("args"), data.get("timeout")
    if not (isinstance(name, str) and 1 <= len(name) <= 64 and set(name) <= NAME_CHARS):
        return 400
    if args is not None:
        if not isinstance(args, dict):
            return 400
        try:
            if len(orjson.dumps(args)) > 16 * 1024:
                return 400
        except orjson.JSONEncodeError:
            return 400  # deeper than any JSON we store
        if has_nul(args):
            return 400
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if timeout is not None and not (number and 0.1 <= timeout <= 3600):
        return 400
    return 202 if device == DEVICE else 404


def test_command_bodies_are_accepted_exactly_when_well_formed_else_4xx_json(staff):
    unbounded = {**settings.GATEWAY, "COMMAND_RATE_COUNT": 10**6, "COMMAND_HOLD_MAX": 10**6}
    with override_settings(GATEWAY=unbounded), asyncio.Runner() as runner:
        caller = Caller(runner, staff)
        try:
            command_examples(caller)
        finally:
            runner.run(stop_loop_services())


def command_examples(caller: Caller) -> None:
    @fuzz(60)
    @given(st.one_of(st.just(DEVICE), st.just("ghost"), odd_text.filter(_routable)), bodies)
    @example(DEVICE, b'{"name": "reboot\\n"}')
    @example(DEVICE, b'{"name": "a", "args": {"x": "\\u0000"}}')
    @example(DEVICE, b'{"name": "a", "args": {"x": "\\\\u0000"}}')  # text, not a NUL
    @example("ws\0", b'{"name": "a"}')
    def check(device, body):
        response = caller.post(f"/api/devices/{quote(device, safe='')}/commands", body)
        status = expected_status(device, body)
        if status == 202:
            assert response.status_code == 202, response.content[:300]
            answer = orjson.loads(response.content)
            assert answer["status"] == "pending" and answer["device"] == DEVICE
            assert answer["name"] == orjson.loads(body)["name"]
        else:
            assert json_error(response, status)["code"]

    check()
