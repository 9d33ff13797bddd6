"""Hostile dashboard clients, property-based: one socket, any frames, one clear answer each.

A logged-in staff user's `/ws/dashboard/` socket (real auth stack, session, database, channel layer)
receives arbitrary binary and text frames: bytes, broken and huge JSON, odd unicode, commands with
bad devices, names, args, timeouts and refs. Each frame gets exactly one answer, predicted by a
model written from docs/interface.md §6 and docs/architecture.md: an ``error`` frame with the right
code (echoing a usable ``ref``), or, for a valid command, its ``pending`` ``command`` frame. The
socket is never closed and never raises.
"""

from __future__ import annotations

import asyncio
import math
import string

import orjson
import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client, override_settings
from hypothesis import example, given
from hypothesis import strategies as st

from devices.models import Device
from tests.support.fuzz import fuzz
from tests.support.runtime import stop_loop_services
from tests.test_dashboard_consumer import websocket_app, ws_headers
from tests.test_fuzz_parsing import json_document, odd_text
from tests.test_fuzz_rest import good_command, has_nul

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = "ws-1"
NAME_CHARS = set(string.ascii_letters + string.digits + "_.:-")
MAX_INBOUND_CHARS = 64 * 1024  # docs/interface.md §6: larger frames get an error frame

scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=6)
)
command_frame = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["command", "Command", "snapshot", "", None, 1]),
        "device": st.one_of(
            st.sampled_from([DEVICE, DEVICE.upper(), "", "ghost"]), odd_text, scalar
        ),
        "name": st.one_of(
            st.sampled_from(["reboot", "set_interval", "a" * 64, "a" * 65, "reboot\n", "re boot"]),
            odd_text,
            scalar,
        ),
        "args": st.one_of(json_document(10), st.just({"seconds": 5})),
        "timeout": st.one_of(scalar, st.floats(0, 4000), st.sampled_from([0.1, 3600, 3600.5, 0])),
        "ref": st.one_of(scalar, st.text(min_size=195, max_size=205), st.just("r-1")),
    },
)
command_frame = command_frame.map(
    lambda d: {k: v for k, v in d.items() if not (isinstance(v, float) and not math.isfinite(v))}
)
frames = st.one_of(
    st.builds(
        lambda d, ref: ("text", orjson.dumps({**d, "type": "command", "device": DEVICE, **ref})),
        good_command,
        st.fixed_dictionaries({}, optional={"ref": st.one_of(scalar, st.just("r-1"))}),
    ).map(lambda kv: (kv[0], kv[1].decode())),
    st.binary(max_size=50).map(lambda b: ("bytes", b)),
    st.just(("text", "")),
    st.text(max_size=50).map(lambda s: ("text", s)),
    json_document(10).map(lambda v: ("text", orjson.dumps(v).decode())),
    command_frame.map(lambda d: ("text", orjson.dumps(d).decode())),
    command_frame.map(lambda d: ("text", orjson.dumps({**d, "type": "command"}).decode())),
    st.sampled_from(
        [
            ("text", "x" * (MAX_INBOUND_CHARS + 1)),
            ("text", "[" * 2000 + "]" * 2000),
            ("text", '{"type": "command", "device": "ws-1", "name": "a", "timeout": NaN}'),
            ("text", '{"type": "command"' + ', "x": 1' * 9000 + "}"),
        ]
    ),
)


def usable_ref(content: dict):
    ref = content.get("ref")
    if isinstance(ref, bool) or not isinstance(ref, str | int | float):
        return None
    return None if isinstance(ref, str) and len(ref) > 200 else ref


def expected_answer(kind: str, data) -> tuple[str, str | None, object]:
    """("error", code, ref) or ("command", name, ref): the contract's answer to one frame."""
    if kind == "bytes" or len(data) > MAX_INBOUND_CHARS:
        return "error", "bad_request", None
    try:
        content = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "error", "bad_request", None
    if not isinstance(content, dict):
        return "error", "bad_request", None
    ref = usable_ref(content)
    device, name = content.get("device"), content.get("name")
    args, timeout = content.get("args"), content.get("timeout")
    if content.get("type") != "command" or not isinstance(device, str) or not device:
        return "error", "bad_request", ref
    if not (isinstance(name, str) and 1 <= len(name) <= 64 and set(name) <= NAME_CHARS):
        return "error", "bad_request", ref
    if not (args is None or isinstance(args, dict)) or has_nul(args):
        return "error", "bad_request", ref
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0.1 <= timeout <= 3600
    ):
        return "error", "bad_request", ref
    if device != DEVICE:
        return "error", "unknown_device", ref
    return "command", name, ref


@pytest.fixture
def session_cookie(django_user_model) -> str:
    user = django_user_model.objects.create_user("fuzz", password="x", is_staff=True)
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def test_every_client_frame_gets_exactly_its_one_answer_and_the_socket_stays_open(
    session_cookie,
):
    Device.objects.create(id=DEVICE)
    unbounded = {**settings.GATEWAY, "COMMAND_RATE_COUNT": 10**6, "COMMAND_HOLD_MAX": 10**6}
    with override_settings(GATEWAY=unbounded), asyncio.Runner() as runner:
        comm = WebsocketCommunicator(
            websocket_app(), "/ws/dashboard/", headers=ws_headers(session_cookie)
        )

        async def open_socket() -> None:
            await get_channel_layer().flush()
            connected, _ = await comm.connect(timeout=5)
            assert connected
            assert (await comm.receive_json_from(timeout=5))["type"] == "snapshot"

        runner.run(open_socket())
        try:
            run_examples(runner, comm)
            # Sentinel: a frame sent now gets the next answer, so the last example had one.
            runner.run(comm.send_input({"type": "websocket.receive", "text": "sentinel"}))
            answer = runner.run(comm.receive_json_from(timeout=5))
            assert (answer["type"], answer["code"]) == expected_answer("text", "sentinel")[:2]
        finally:
            runner.run(close(comm))


def run_examples(runner: asyncio.Runner, comm: WebsocketCommunicator) -> None:
    @fuzz(60)
    @given(frames)
    @example(("text", '{"type": "command", "device": "ws-1", "name": "reboot\\n"}'))
    @example(("text", '{"type": "command", "device": "ws-1\\u0000", "name": "reboot"}'))
    @example(("text", '{"type": "command", "device": "ws-1", "name": "a", "ref": 1e308}'))
    @example(("text", '{"type": "command", "device": "ws-1", "name": "a", "timeout": 1e400}'))
    @example(("text", "\ud800"))
    @example(("text", '{"type": "command", "device": "ws-1", "name": "a", "args": {"\\u0000": 1}}'))
    def check(frame):
        kind, data = frame
        # As the server hands it over (send_to refuses empty frames, which clients can send).
        runner.run(comm.send_input({"type": "websocket.receive", kind: data}))
        answer = runner.run(comm.receive_json_from(timeout=5))
        what, detail, ref = expected_answer(kind, data)
        assert answer["type"] == what, (answer, frame)
        if what == "error":
            assert answer["code"] == detail and isinstance(answer["message"], str)
        else:
            assert answer["status"] == "pending" and answer["name"] == detail
            assert answer["device"] == DEVICE
        assert answer.get("ref") == ref

    check()


async def close(comm: WebsocketCommunicator) -> None:
    await comm.disconnect()
    await stop_loop_services()
